"""The one place that builds and sends webhook requests, and reads what comes back.

A work item (a row of ``claim_tasks`` / ``claim_deliveries``) becomes one HTTP request:
the action's verb; its URL with ``handle=<HOST_URL>/task/<task_id>`` added to the query;
its JSON body and headers, plus ``X-Task-Id``, ``X-Task-Trigger`` and an
``Idempotency-Key`` (the delivery id, stable across retries). Redirects are never
followed: a 3xx is a failure like any other non-2xx answer. Every connection goes through
the SSRF guard (``taskrunner.netguard``); a refused URL is a final failure
(``blocked: <reason>``), never retried. Cancel actions in a start's response are checked
by the code that checks ``on_cancel`` at creation; a response that breaks those rules
fails the start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from taskrunner import netguard
from taskrunner.api.validation import Invalid, cancel_actions_input
from taskrunner.config import Config
from taskrunner.vocabulary import TRIGGER_LABELS

log = logging.getLogger(__name__)

# A start response bigger than this is not read for cancel actions (the start still counts).
MAX_RESPONSE_BYTES = 1 << 20


@dataclass(frozen=True)
class WorkItem:
    """One webhook call to make, as returned by the claim functions."""

    delivery_id: uuid.UUID
    task_id: uuid.UUID
    event: str
    attempt: int
    url: str
    verb: str
    body: Any
    headers: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkItem:
        return cls(
            delivery_id=row["delivery_id"],
            task_id=row["task_id"],
            event=row["event"],
            attempt=row["attempt"],
            url=row["url"],
            verb=row["verb"],
            body=row["body"],
            headers=row["headers"] or {},
        )


@dataclass(frozen=True)
class WebhookResult:
    """The outcome of one attempt, in the shape ``finish_delivery`` records."""

    ok: bool
    started_at: datetime
    status_code: int | None = None
    error: str | None = None
    cancel_actions: list[dict[str, Any]] | None = None
    # False when another attempt cannot help (the SSRF guard refused the URL, or it is invalid)
    retryable: bool = True


def create_client(config: Config) -> httpx.AsyncClient:
    """The HTTP client every webhook goes through: per-phase timeout, no redirects, the
    SSRF guard on every connection, no proxies from the environment (a proxy would
    resolve and connect where the guard cannot see)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    return httpx.AsyncClient(
        timeout=config.webhook_timeout,
        follow_redirects=False,
        trust_env=False,
        transport=netguard.transport(config, limits),
    )


def with_handle(url: str, handle: str) -> str:
    """``url`` with ``handle=<handle>`` appended to its query (existing params kept)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + [("handle", handle)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def build_request(client: httpx.AsyncClient, item: WorkItem, host_url: str) -> httpx.Request:
    """The HTTP request for a work item."""
    headers = {str(k): str(v) for k, v in item.headers.items()}
    headers.update(
        {
            "X-Task-Id": str(item.task_id),
            "X-Task-Trigger": TRIGGER_LABELS[item.event],
            "Idempotency-Key": str(item.delivery_id),
        }
    )
    content = {} if item.body is None else {"json": item.body}
    url = with_handle(item.url, f"{host_url}/task/{item.task_id}")
    return client.build_request(item.verb.upper(), url, headers=headers, **content)


async def call(client: httpx.AsyncClient, item: WorkItem, config: Config) -> WebhookResult:
    """Make one attempt; never raises for anything the remote side does."""
    started_at = datetime.now(UTC)
    try:
        request = build_request(client, item, config.host_url)
    except httpx.InvalidURL as exc:
        # never sent, and no later attempt can fix it
        return WebhookResult(
            ok=False, started_at=started_at, error=f"invalid URL: {exc}", retryable=False
        )
    try:
        # httpx's timeout is per phase; this bounds the whole exchange, so the claim's
        # lease (2 * webhook_timeout + 10 s) always outlives an attempt.
        async with asyncio.timeout(config.webhook_timeout):
            response = await client.send(request, stream=True)
            try:
                body = await _read_capped(response) if item.event == "start" else b""
            finally:
                await response.aclose()
    except netguard.Blocked as exc:
        return WebhookResult(
            ok=False, started_at=started_at, error=f"blocked: {exc.reason}", retryable=False
        )
    except (TimeoutError, httpx.TimeoutException):
        return WebhookResult(ok=False, started_at=started_at, error="timeout")
    except httpx.HTTPError as exc:
        return WebhookResult(ok=False, started_at=started_at, error=describe_error(exc))
    if not response.is_success:
        return WebhookResult(
            ok=False,
            started_at=started_at,
            status_code=response.status_code,
            error=f"HTTP {response.status_code}",
        )
    try:
        cancel_actions = parse_cancel_actions(
            body, item.task_id, netguard.Policy.from_config(config)
        )
    except Invalid as exc:
        # the target answered, but what it asks us to register breaks the on_cancel rules:
        # the start fails (another attempt would get the same answer)
        return WebhookResult(
            ok=False,
            started_at=started_at,
            status_code=response.status_code,
            error=f"invalid cancel actions in the start response: {_summary(exc.details)}",
            retryable=False,
        )
    return WebhookResult(
        ok=True,
        started_at=started_at,
        status_code=response.status_code,
        cancel_actions=cancel_actions,
    )


def _summary(details: list[str], most: int = 5) -> str:
    """The first few problems, for an error text that stays readable."""
    more = f"; (and {len(details) - most} more)" if len(details) > most else ""
    return "; ".join(details[:most]) + more


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            log.info(
                "start response over %d bytes; not read for cancel actions", MAX_RESPONSE_BYTES
            )
            return b""
        chunks.append(chunk)
    return b"".join(chunks)


def describe_error(exc: httpx.HTTPError) -> str:
    """A short error text for a transport failure (e.g. ``connection refused``)."""
    if isinstance(exc, httpx.ConnectError):
        cause = _root_os_error(exc)
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        return f"connection failed: {cause or exc}"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _root_os_error(exc: BaseException) -> OSError | None:
    """The innermost OSError behind an exception (httpx wraps the socket error twice)."""
    found = None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def parse_cancel_actions(
    body: bytes, task_id: uuid.UUID | str, policy: netguard.Policy | None = None
) -> list[dict[str, Any]] | None:
    """The cancel actions in a start response: a webhook action or a list of them.

    Entries that are not webhook actions (not an object, another ``kind``, neither
    ``kind`` nor ``params``) are not meant for us and are ignored; None when nothing is
    left. The webhook actions must pass the rules of a task's ``on_cancel`` at creation
    (``validation.cancel_actions_input``: count, URL, verb, headers); any problem refuses
    them all (raises Invalid, ``[n]`` counting the webhook actions of the response).
    """
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    entries = parsed if isinstance(parsed, list) else [parsed]
    actions = [e for e in entries if _is_webhook_action(e)]
    if len(actions) < len(entries):
        log.info(
            "task %s: ignoring %d entries of the start response that are not webhook actions",
            task_id,
            len(entries) - len(actions),
        )
    return cancel_actions_input(actions, policy) if actions else None


def _is_webhook_action(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    kind = entry.get("kind")
    return "params" in entry if kind is None else str(kind).lower() == "webhook"


def retry_delay_ms(attempt: int, config: Config) -> int | None:
    """Delay before the next attempt: exponential backoff with full jitter.

    None once ``attempt`` reached ``webhook_max_attempts`` (the SQL then gives up). At
    least 1 ms, so a retry is always scheduled strictly after the failed attempt.
    """
    if attempt >= config.webhook_max_attempts:
        return None
    cap = min(config.webhook_backoff_max, config.webhook_backoff_base * 2 ** (attempt - 1))
    return max(1, int(random.uniform(0, cap) * 1000))
