"""The one place that builds and sends webhook requests, and reads what comes back.

A work item (a row of ``claim_tasks`` / ``claim_deliveries``) becomes one HTTP request:
the action's verb; its URL with ``handle=<HOST_URL>/task/<task_id>`` added to the query;
its JSON body and headers, plus ``X-Task-Id``, ``X-Task-Trigger``, an
``Idempotency-Key`` (the delivery id, stable across retries), ``traceparent`` (a new span
of the batch's trace, when the batch has one: ``taskrunner.tracing``), and with
``WEBHOOK_SIGNING_SECRET`` set a ``Webhook-Signature`` of the request as sent
(``taskrunner.signing``). Redirects are never
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
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from taskrunner import netguard, signing, tracing
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
    batch_id: uuid.UUID | None = None
    # the batch's stored trace context: the parent of this webhook's span
    trace: tracing.TraceContext | None = None

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
            batch_id=row.get("batch_id"),
            trace=tracing.parse(row.get("traceparent"), row.get("tracestate")),
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


def build_request(
    client: httpx.AsyncClient,
    item: WorkItem,
    host_url: str,
    secrets: Sequence[str] = (),
    trace: tracing.TraceContext | None = None,
) -> httpx.Request:
    """The HTTP request for a work item, signed with ``secrets`` when there are any,
    carrying ``trace`` (this webhook's own span, a child of the batch's) as
    ``traceparent``/``tracestate`` in place of any the action's headers name."""
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
    request = client.build_request(item.verb.upper(), url, headers=headers, **content)
    if trace is not None:
        request.headers.update(trace.headers())  # case-insensitive: replaces the action's
    if secrets:
        # of the request as httpx will send it: its normalised URL, its encoded body
        request.headers[signing.HEADER] = signing.sign(
            secrets, request.method, str(request.url), request.content
        )
    return request


async def call(client: httpx.AsyncClient, item: WorkItem, config: Config) -> WebhookResult:
    """Make one attempt; never raises (but for cancellation): whatever the target, the
    URL or the answer throws becomes this attempt's failed outcome, so one hostile target
    can fail only its own delivery. The attempt is a span of the batch's trace: an
    OpenTelemetry CLIENT span when spans are on, else just a new span id."""
    started_at = datetime.now(UTC)
    span = None
    if tracing.enabled():
        facts = _span_facts(item)
        span = tracing.start_span(
            f"webhook {item.event}", kind="client", parent=item.trace, attributes=facts
        )
    if span is not None:
        trace = tracing.context_of(span, item.trace.tracestate if item.trace else None)
    else:
        trace = item.trace.child() if item.trace else None
    try:
        result = await _attempt(client, item, config, started_at, trace)
    except Exception as exc:  # a case none of the handlers below foresaw; retry it
        log.warning(
            "delivery %s: unexpected error",
            item.delivery_id,
            exc_info=True,
            extra={"delivery_id": str(item.delivery_id), "task_id": str(item.task_id)},
        )
        result = _failed(started_at, f"unexpected error: {describe_exception(exc)}")
    except BaseException:  # cancelled (shutdown): the span still ends
        tracing.end_span(span, error="cancelled")
        raise
    tracing.end_span(span, {"http.response.status_code": result.status_code}, error=result.error)
    return result


def _span_facts(item: WorkItem) -> dict[str, Any]:
    """A webhook span's attributes: never the query string or headers (they may carry
    the target's secrets)."""
    try:
        parts = urlsplit(item.url)
        host, path = parts.hostname, parts.path or "/"
    except ValueError:  # the attempt fails on it, with its reason; the span still starts
        host = path = None
    return {
        "http.request.method": item.verb.upper(),
        "server.address": host,
        "url.path": path,
        "http.request.resend_count": item.attempt - 1 if item.attempt > 1 else None,
        "taskrunner.task_id": str(item.task_id),
        "taskrunner.delivery_id": str(item.delivery_id),
        "taskrunner.batch_id": str(item.batch_id) if item.batch_id else None,
        "taskrunner.event": item.event,
    }


def _failed(started_at: datetime, error: str, *, retryable: bool = True, **fields) -> WebhookResult:
    return WebhookResult(
        ok=False, started_at=started_at, error=error, retryable=retryable, **fields
    )


async def _attempt(
    client: httpx.AsyncClient,
    item: WorkItem,
    config: Config,
    started_at: datetime,
    trace: tracing.TraceContext | None,
) -> WebhookResult:
    try:
        secrets = config.webhook_signing_secrets
        request = build_request(client, item, config.host_url, secrets, trace)
    except httpx.InvalidURL as exc:
        # never sent, and no later attempt can fix it
        return _failed(started_at, f"invalid URL: {exc}", retryable=False)
    except Exception as exc:  # e.g. a header value httpx cannot encode; never sent either
        return _failed(started_at, f"invalid request: {describe_exception(exc)}", retryable=False)
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
        return _failed(started_at, f"blocked: {exc.reason}", retryable=False)
    except (TimeoutError, httpx.TimeoutException):
        return _failed(started_at, "timeout")
    except httpx.HTTPError as exc:
        return _failed(started_at, describe_error(exc))
    if not response.is_success:
        status = response.status_code
        return _failed(started_at, f"HTTP {status}", status_code=status)
    policy = netguard.Policy.from_config(config)
    try:
        actions = start_response_actions(body, item.task_id, policy)
    except Invalid as exc:
        # what the target asks us to register breaks the on_cancel rules: the start fails
        # (another attempt would get the same answer)
        error = f"invalid cancel actions in the start response: {_summary(exc.details)}"
        return _failed(started_at, error, retryable=False, status_code=response.status_code)
    except Exception as exc:
        # the target answered, but with something we cannot read or store
        error = f"bad response: {describe_exception(exc)}"
        return _failed(started_at, error, retryable=False, status_code=response.status_code)
    return WebhookResult(
        ok=True, started_at=started_at, status_code=response.status_code, cancel_actions=actions
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
    return describe_exception(exc)


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters, storable (no NUL)."""
    lines = str(exc).splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return storable(text[:500])


def storable(text: str) -> str:
    """``text`` without NUL characters, which PostgreSQL cannot store in text or jsonb."""
    return text.replace("\x00", "\\u0000")


def _root_os_error(exc: BaseException) -> OSError | None:
    """The innermost OSError behind an exception (httpx wraps the socket error twice)."""
    found = None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def start_response_actions(
    body: bytes, task_id: uuid.UUID | str, policy: netguard.Policy | None = None
) -> list[dict] | None:
    """``parse_cancel_actions``, refusing actions PostgreSQL could not store (a NUL
    character anywhere in them): ValueError, so the start fails with the reason."""
    actions = parse_cancel_actions(body, task_id, policy)
    if actions and _holds_nul(actions):
        raise ValueError(
            "the cancel actions hold a NUL character (\\u0000), which cannot be stored"
        )
    return actions


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


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
