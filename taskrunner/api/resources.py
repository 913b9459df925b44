"""The HTTP resources: one class per route family, dependencies through ``__init__``.

Each responder reads and validates its input, calls one SQL function through the
``Store`` and writes JSON. Path ids that are not UUIDs are a 404 naming ``id``: no task or
delivery can have such an id.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon
import psycopg

from taskrunner import metrics, tracing
from taskrunner.api import serialize
from taskrunner.api.counters import CounterBuffer
from taskrunner.api.errors import ApiError, bad_request, not_found
from taskrunner.api.spans import request_trace
from taskrunner.api.store import Store
from taskrunner.api.validation import (
    LIMITS,
    batch_input,
    counter_updates,
    list_filters,
    parse_uuid,
    update_input,
)
from taskrunner.db import DomainError
from taskrunner.netguard import Policy
from taskrunner.vocabulary import status_label

log = logging.getLogger("taskrunner.api")


def read_json(req: falcon.Request) -> Any:
    """The request body as JSON: 415 unless it says it is JSON, 413 above the size limit."""
    mimetype = (req.content_type or "").split(";", 1)[0].strip().lower()
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "unsupported media type", ["Content-Type: must be application/json"])
    limit = LIMITS["body_bytes"]
    too_large = ApiError(413, "body too large", [f"body: must be at most {limit} bytes"])
    if (req.content_length or 0) > limit:
        raise too_large
    raw = req.bounded_stream.read(limit + 1)
    if len(raw) > limit:
        raise too_large
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request([f"body: {exc}"], "malformed JSON") from exc


def _uuid_param(raw: str, what: str) -> str:
    parsed = parse_uuid(raw)
    if parsed is None:
        raise not_found(f"{what} not found", [f"id: {raw!r} is not a UUID"])
    return parsed


def _send(resp: falcon.Response, body: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = serialize.dumps(body)


def _requester(req: falcon.Request) -> str | None:
    requester = req.get_header("X-Requester")
    if requester is not None and len(requester) > LIMITS["requester_chars"]:
        raise bad_request([f"X-Requester: must be at most {LIMITS['requester_chars']} characters"])
    if requester is not None and "\x00" in requester:
        raise bad_request(["X-Requester: must not contain NUL characters"])
    return requester


def _batch_trace(req: falcon.Request) -> tracing.TraceContext | None:
    """The parent of a new batch's webhooks: this request's span when spans are on, else
    the request's own ``traceparent`` (a malformed one is ignored, as W3C asks)."""
    incoming = request_trace(req)
    span = req.context.get("span")
    if span is not None:
        return tracing.context_of(span, incoming.tracestate if incoming else None)
    return incoming


def _trace_params(trace: tracing.TraceContext) -> dict[str, Any]:
    return {"traceparent": trace.traceparent, "tracestate": trace.tracestate}


def _log_task(row: dict, what: str) -> None:
    """The info line of a change the API made to a task: ``task X updated -> Success``."""
    task_id = str(row["id"])
    status = status_label(str(row["status"]))
    extra = {"task_id": task_id, "batch_id": str(row["batch_id"])}
    log.info("task %s %s -> %s", task_id, what, status, extra=extra)


class TaskCollection:
    """``/task``: create a batch (POST), list (GET), add counters (PUT). ``url_policy``
    refuses webhook URLs the SSRF guard would block for sure (literal private addresses);
    ``default_max_attempts`` is TASK_RETRY_MAX_ATTEMPTS, for tasks that set no retry."""

    def __init__(
        self,
        store: Store,
        counters: CounterBuffer,
        url_policy: Policy | None = None,
        default_max_attempts: int = 1,
    ) -> None:
        self.store = store
        self.counters = counters
        self.url_policy = url_policy
        self.default_max_attempts = default_max_attempts

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tasks = batch_input(read_json(req), self.url_policy, self.default_max_attempts)
        trace = _batch_trace(req)
        before = [("set_batch_trace", _trace_params(trace))] if trace else []
        rows = self.store.call(
            "create_batch", {"tasks": json.dumps(tasks), "requester": _requester(req)}, before
        )
        if not rows:  # dedupe skipped every task
            log.info("batch of %d tasks: every task deduplicated, none created", len(tasks))
            resp.status = 204
            return
        batch_id = str(rows[0]["batch_id"])
        log.info(
            "batch %s created: %d tasks (requester %s)",
            batch_id,
            len(rows),
            rows[0].get("requester"),
            extra={"batch_id": batch_id, "trace_id": trace.trace_id if trace else None},
        )
        resp.set_header("X-Batch-ID", batch_id)
        _send(resp, [serialize.task(r) for r in rows], 201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        filters = list_filters({name: req.get_param(name) for name in req.params})
        (rows,) = self.store.read(("list_tasks", filters))
        _send(resp, [serialize.task(r) for r in rows])

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        updates = counter_updates(read_json(req))
        self.counters.add(updates)
        _send(resp, {"accepted": len(updates)}, 202)


class TaskItem:
    """``/task/{id}``: read (GET), update a running task (PATCH), cancel (DELETE), add
    counters (PUT, the alias of PUT /task)."""

    def __init__(self, store: Store, counters: CounterBuffer) -> None:
        self.store = store
        self.counters = counters

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        p = {"id": _uuid_param(id, "task")}
        task, deps, actions, deliveries, attempts, why = self.store.read(
            ("get_task", p),
            ("task_dependencies", p),
            ("task_actions", p),
            ("task_deliveries", p),
            ("task_attempts", p),
            ("why_not_running", p),
        )
        if not task:
            raise not_found("task not found", [f"id: no task {p['id']}"])
        body = serialize.task_detail(task[0], deps, actions, deliveries, attempts)
        body["why_not_running"] = serialize.why_not_running(why[0]["why"])
        _send(resp, body)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        task_id = _uuid_param(id, "task")
        params = update_input(read_json(req))
        (row,) = self.store.call("update_task", {"id": task_id, **params})
        _log_task(row, "updated")
        _send(resp, serialize.task(row))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        (row,) = self.store.call("cancel_task", {"id": _uuid_param(id, "task")})
        _log_task(row, "canceled")
        _send(resp, serialize.task(row))

    def on_put(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        updates = counter_updates(read_json(req), task_id=_uuid_param(id, "task"))
        self.counters.add(updates)
        _send(resp, {"accepted": len(updates)}, 202)


class TaskMove:
    """``PATCH /task/pause/{id}`` and ``PATCH /task/resume/{id}``: one SQL function each."""

    def __init__(self, store: Store, query: str) -> None:
        self.store = store
        self.query = query

    def on_patch(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        (row,) = self.store.call(self.query, {"id": _uuid_param(id, "task")})
        _log_task(row, self.query.split("_", 1)[0] + "d")  # "paused", "resumed"
        _send(resp, serialize.task(row))


class Rerun:
    """``POST /task/{id}/rerun`` and ``POST /batch/{id}/rerun``: a failed or canceled task
    (or every one of a batch) and the tasks downstream that failed because of it run again
    (``rerun_task``/``rerun_batch``); the answer lists what changed, by role."""

    def __init__(self, store: Store, what: str) -> None:
        self.store = store
        self.what = what  # "task" or "batch"

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        target = _uuid_param(id, self.what)
        rows = self.store.call(f"rerun_{self.what}", {"id": target})
        body = serialize.rerun(rows)
        log.info(
            "%s %s rerun: %d tasks rerun, %d downstream, %d waiting again",
            self.what,
            target,
            *(len(body[role]) for role in serialize.RERUN_ROLES),
            extra={f"{self.what}_id": target},
        )
        _send(resp, body)


class DeliveryRetry:
    """``POST /delivery/{id}/retry``: queue again a webhook delivery that gave up."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        delivery_id = _uuid_param(id, "delivery")
        (row,) = self.store.call("retry_delivery", {"delivery_id": delivery_id})
        log.info(
            "delivery %s queued again (%s)",
            delivery_id,
            status_label(str(row.get("status"))),
            extra={"delivery_id": delivery_id, "task_id": str(row.get("task_id"))},
        )
        _send(resp, serialize.delivery(row))


class Metrics:
    """``GET /metrics``: Prometheus text (all processes of this host in multiprocess mode)
    and the gauges read from the database at each scrape (``metrics_snapshot``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            ((snapshot,),) = self.store.read(("metrics_snapshot", {}))
        except (DomainError, psycopg.Error):
            snapshot = None  # database_up 0; the process's own metrics still answer
        resp.data, resp.content_type = metrics.render(metrics.database_families(snapshot))


class OpenApi:
    """``GET /openapi.json``: the OpenAPI document (taskrunner/api/openapi.py)."""

    def __init__(self, document: dict) -> None:
        self.text = serialize.dumps(document)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.text


class Health:
    """``GET /health``: liveness; never touches the database."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send(resp, {"status": "ok"})


class Ready:
    """``GET /ready``: the database answers and has the newest migration applied."""

    def __init__(self, store: Store, expected_version: str | None) -> None:
        self.store = store
        self.expected_version = expected_version

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            ((row,),) = self.store.read(("ready", {}))
        except (DomainError, psycopg.Error) as exc:
            raise ApiError(503, "not ready", [f"database: {exc}"]) from exc
        version = row["version"]
        if self.expected_version and (version or "") < self.expected_version:
            raise ApiError(
                503,
                "not ready",
                [f"migrations: database is at {version}, expected {self.expected_version}"],
            )
        _send(resp, {"status": "ready", "migration": version})
