"""Signed webhooks: the ``Webhook-Signature`` header the worker adds, and its check.

With ``WEBHOOK_SIGNING_SECRET`` set (a comma-separated list, newest first, for rotation)
every webhook carries::

    Webhook-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]

one ``v1`` per secret, each the HMAC-SHA256 under that secret of
``"<t>.<METHOD>.<URL>.".encode() + body``: the method in capitals, the URL exactly as
requested (with the ``handle`` parameter), the body's raw bytes. A target keeps the
secrets it trusts and calls ``verify``: a signature that matches none of them (forged or
changed on the way) or a timestamp outside ``tolerance`` (a replay) is refused. The
scheme is the one payment and chat platforms use (Stripe, Slack), so their libraries'
habits apply; this module has no dependency but the standard library, to be copied freely.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

HEADER = "Webhook-Signature"
DEFAULT_TOLERANCE = 300  # seconds a signature stays valid either side of the target's clock


def parse_secrets(value: str | None) -> list[str]:
    """``WEBHOOK_SIGNING_SECRET`` as a list: comma-separated, blanks dropped."""
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def _digest(secret: str, timestamp: int, method: str, url: str, body: bytes) -> str:
    message = f"{timestamp}.{method.upper()}.{url}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(
    secrets: Iterable[str], method: str, url: str, body: bytes, timestamp: int | None = None
) -> str:
    """The ``Webhook-Signature`` value for one request, signed with every secret."""
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}"] + [f"v1={_digest(s, t, method, url, body)}" for s in secrets])


def verify(
    headers: Mapping[str, str],
    method: str,
    url: str,
    body: bytes,
    secrets: Iterable[str],
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether ``headers`` carry a valid, fresh signature of this request by one of
    ``secrets``. ``url`` must be the URL the worker requested (scheme, host, path and
    query, as your public address reads), ``body`` the raw bytes received."""
    value = next((v for k, v in headers.items() if k.lower() == HEADER.lower()), None)
    if not value:
        return False
    fields = [part.strip().partition("=") for part in value.split(",")]
    stamps = [v for k, _, v in fields if k == "t"]
    given = [v for k, _, v in fields if k == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not given:
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = [_digest(s, t, method, url, body) for s in secrets]
    return any(hmac.compare_digest(e, g) for e in expected for g in given)


def verifier(secrets: Iterable[str], tolerance: float = DEFAULT_TOLERANCE):
    """``verify`` bound to ``secrets``: the ``verify=`` of ``taskrunner.target.parse_webhook``."""
    trusted = list(secrets)

    def check(headers: Mapping[str, str], method: str, url: str, body: bytes) -> bool:
        return verify(headers, method, url, body, trusted, tolerance)

    return check
