"""For webhook targets (the services taskrunner calls): read an incoming webhook, report
back through the task's handle.

::

    from taskrunner.target import parse_webhook

    def on_post(self, req, resp):                 # Falcon; any WSGI/ASGI framework works
        hook = parse_webhook(req)                 # task_id, trigger, handle, idempotency_key
        if hook.trigger == "Start":
            task = hook.task()                    # token: API_TOKEN unless given
            task.progress(success=10)             # PATCH {"new_success": 10}: also a heartbeat
            task.succeed()                        # or task.fail("disk full")

What a webhook carries (``taskrunner/worker/webhooks.py`` builds it): headers
``X-Task-Id``, ``X-Task-Trigger`` (``Start``, ``End`` or ``Cancel``) and
``Idempotency-Key`` (the delivery id: the same on every retry of one delivery), and the
query parameter ``handle`` (``<HOST_URL>/task/<id>``: where to report).

Signatures: with ``WEBHOOK_SIGNING_SECRET`` set, webhooks carry ``Webhook-Signature``
(``taskrunner.signing``). ``parse_webhook(..., verify=check)`` calls
``check(headers, method, url, body)`` (headers in lower case, the raw body) and refuses
the webhook (``InvalidWebhook``) when it raises or returns False; pass
``verify=taskrunner.signing.verifier(["<secret>"])`` to refuse forged or replayed calls.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.util import request_uri

from taskrunner.client import AsyncClient, Client
from taskrunner.vocabulary import TRIGGERS

Verifier = Callable[[Mapping[str, str], str, str, bytes], object]


class InvalidWebhook(ValueError):
    """Not a taskrunner webhook (a header missing or wrong), or ``verify`` refused it."""


@dataclass(frozen=True)
class Webhook:
    """One incoming webhook: ``headers`` in lower case, ``body`` the raw bytes."""

    task_id: str
    trigger: str
    handle: str | None
    idempotency_key: str | None
    method: str = "POST"
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON; None when empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    def task(self, token: str | None = None, **client_options: Any) -> TaskHandle:
        """A handle to report on this task (blocking calls)."""
        return TaskHandle(self._handle(), Client(_base(self._handle()), token, **client_options))

    def async_task(self, token: str | None = None, **client_options: Any) -> TaskHandle:
        """A handle whose methods are awaited (on an ``AsyncClient``)."""
        client = AsyncClient(_base(self._handle()), token, **client_options)
        return TaskHandle(self._handle(), client)

    def _handle(self) -> str:
        if not self.handle:
            raise InvalidWebhook("the webhook has no handle query parameter")
        return self.handle


class TaskHandle:
    """Reports on one task through its handle URL, with the client's token. With an
    ``AsyncClient`` every method returns an awaitable. Each call is a heartbeat."""

    def __init__(self, handle: str, client: Client | AsyncClient) -> None:
        self.handle = handle
        self.task_id = urlsplit(handle).path.rstrip("/").rsplit("/", 1)[-1]
        self.client = client

    def progress(self, success: int = 0, failures: int = 0) -> Any:
        """Add to the task's counters (``new_success``/``new_failures``)."""
        return self.client.update_task(self.task_id, new_success=success, new_failures=failures)

    def heartbeat(self) -> Any:
        """Say the task is alive, so its ``timeout`` starts again."""
        return self.client.update_task(self.task_id)

    def succeed(self, metadata: Mapping[str, Any] | None = None) -> Any:
        return self.client.update_task(self.task_id, status="Success", metadata=metadata)

    def fail(
        self, reason: str, metadata: Mapping[str, Any] | None = None, retryable: bool = True
    ) -> Any:
        """Report Failure: with runs left the task is retried, unless ``retryable=False``."""
        return self.client.update_task(
            self.task_id,
            status="Failure",
            failure_reason=reason,
            metadata=metadata,
            retryable=None if retryable else False,
        )

    def close(self) -> Any:
        """Close the client (awaitable for an ``AsyncClient``)."""
        closer = getattr(self.client, "aclose", None) or self.client.close
        return closer()


def _base(handle: str) -> str:
    """The API's base URL: the handle without its ``/task/<id>``."""
    path = urlsplit(handle).path.rstrip("/")
    if "/task/" not in path:
        raise InvalidWebhook(f"handle {handle!r} is not a task URL")
    return handle[: handle.rindex("/task/")]


# -- reading a request ---------------------------------------------------------------------


@dataclass
class _Raw:
    method: str
    url: str
    headers: dict[str, str]
    query: dict[str, list[str]]
    body: bytes


def parse_webhook(
    request: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, Any] | str | None = None,
    body: bytes | str | None = None,
    method: str | None = None,
    url: str | None = None,
    verify: Verifier | None = None,
) -> Webhook:
    """The webhook in ``request``: a WSGI environ, an ASGI scope, a Falcon request (WSGI or
    ASGI), or any object with ``headers`` and ``args``/``GET``/``query_params``/``params``
    (Flask, Django, Starlette...). The keyword arguments supply or override its parts;
    ASGI frameworks read the body asynchronously, so pass ``body=await request.body()``.
    For a WSGI environ or Falcon request the body is read here (a WSGI environ gets it
    back as ``wsgi.input``; with Falcon use ``webhook.body``/``webhook.json()``)."""
    raw = _read(request, body is None)
    if headers is not None:
        raw.headers = {k.lower(): v for k, v in headers.items()}
    if query is not None:
        raw.query = _query(query)
    if body is not None:
        raw.body = body.encode() if isinstance(body, str) else bytes(body)
    raw.method, raw.url = (method or raw.method).upper(), url or raw.url
    return _webhook(raw, verify)


def _webhook(raw: _Raw, verify: Verifier | None) -> Webhook:
    task_id, trigger = raw.headers.get("x-task-id"), raw.headers.get("x-task-trigger")
    if not task_id:
        raise InvalidWebhook("X-Task-Id header missing")
    if trigger not in TRIGGERS:
        raise InvalidWebhook(f"X-Task-Trigger: expected one of {', '.join(TRIGGERS)}")
    if verify is not None:
        try:
            accepted = verify(raw.headers, raw.method, raw.url, raw.body)
        except Exception as exc:
            raise InvalidWebhook(f"signature refused: {exc}") from exc
        if accepted is False:
            raise InvalidWebhook("signature refused")
    handle = (raw.query.get("handle") or [None])[0]
    return Webhook(
        task_id=task_id,
        trigger=trigger,
        handle=handle,
        idempotency_key=raw.headers.get("idempotency-key"),
        method=raw.method,
        url=raw.url,
        headers=raw.headers,
        body=raw.body,
    )


def _read(request: Any, read_body: bool) -> _Raw:
    if request is None:
        return _Raw("POST", "", {}, {}, b"")
    if isinstance(request, dict) and "REQUEST_METHOD" in request:
        return _from_wsgi(request, read_body)
    if isinstance(request, dict) and request.get("type") == "http":
        return _from_asgi(request)
    if isinstance(getattr(request, "env", None), dict):  # falcon.Request (WSGI)
        raw = _from_wsgi(request.env, read_body=False)
        raw.body = request.bounded_stream.read() if read_body else b""
        return raw
    if isinstance(getattr(request, "scope", None), dict):  # Starlette, falcon.asgi
        return _from_asgi(request.scope)
    return _from_object(request, read_body)


def _from_wsgi(cgi: dict[str, Any], read_body: bool) -> _Raw:
    """From a WSGI environ (``cgi``: its CGI-style variables)."""
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in cgi.items()
        if key.startswith("HTTP_")
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if cgi.get(key):
            headers[key.replace("_", "-").lower()] = cgi[key]
    body = b""
    if read_body:
        body = cgi["wsgi.input"].read(int(cgi.get("CONTENT_LENGTH") or 0))
        cgi["wsgi.input"] = io.BytesIO(body)  # the application can read it again
    query = parse_qs(cgi.get("QUERY_STRING", ""), keep_blank_values=True)
    return _Raw(cgi["REQUEST_METHOD"], request_uri(cgi), headers, query, body)


def _from_asgi(scope: dict[str, Any]) -> _Raw:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    host = headers.get("host") or "{}:{}".format(*(scope.get("server") or ("localhost", 80)))
    qs = scope.get("query_string", b"").decode("latin-1")
    url = f"{scope.get('scheme', 'http')}://{host}{scope.get('path', '')}" + (
        f"?{qs}" if qs else ""
    )
    return _Raw(scope.get("method", "POST"), url, headers, query, b"")


def _from_object(request: Any, read_body: bool) -> _Raw:
    """Flask/werkzeug (``args``, ``get_data``), Django (``GET``, ``body``), Starlette-like
    (``query_params``) or anything with ``headers`` and ``params``."""
    headers = {str(k).lower(): str(v) for k, v in dict(request.headers).items()}
    for name in ("args", "GET", "query_params", "params"):
        if getattr(request, name, None) is not None:
            source = getattr(request, name)
            break
    else:
        source = {}
    body = b""
    if read_body:
        if callable(getattr(request, "get_data", None)):
            body = request.get_data()
        elif isinstance(getattr(request, "body", None), bytes | str):
            body = request.body
    body = body.encode() if isinstance(body, str) else body
    url = str(getattr(request, "url", "") or "")
    return _Raw(str(getattr(request, "method", "POST")), url, headers, _query(source), body)


def _query(source: Mapping[str, Any] | str) -> dict[str, list[str]]:
    """Query parameters as lists, from a string or any mapping (a MultiDict's ``getlist``
    keeps repeated ones)."""
    if isinstance(source, str):
        return parse_qs(source.lstrip("?"), keep_blank_values=True)
    getlist = getattr(source, "getlist", None) or getattr(source, "get_all", None)
    out: dict[str, list[str]] = {}
    for key in source:
        values = getlist(key) if getlist else source[key]
        out[key] = [str(v) for v in (values if isinstance(values, list | tuple) else [values])]
    return out
