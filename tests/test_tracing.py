"""W3C trace context and OpenTelemetry spans (issue 11 item 5).

A batch keeps the ``traceparent`` of the request that created it; every webhook of its
tasks carries a child of it (same trace id, a new span id per request). With spans on
(the SDK's in-memory exporter here), API requests, claims and webhooks are spans of that
trace. Without the ``otel`` endpoint nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from conftest import create_batch, task_spec, webhook
from falcon import testing
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from procs import Sink as ProcSink
from procs import service, wait_for
from test_worker import (  # noqa: F401 (sink and start_worker are fixtures)
    Hit,
    sink,
    start_worker,
    wait_until,
)

from taskrunner import tracing
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer
from taskrunner.config import Config
from taskrunner.db import QUERIES

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


# -- parsing -----------------------------------------------------------------------------


def test_parse_reads_a_traceparent_and_its_tracestate() -> None:
    ctx = tracing.parse(f" {TRACEPARENT}\t", TRACESTATE)
    assert ctx == tracing.TraceContext(TRACE, SPAN, "01", TRACESTATE)
    assert ctx.traceparent == TRACEPARENT
    assert tracing.parse(TRACEPARENT.replace("-01", "-00")).flags == "00"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        TRACEPARENT.upper(),  # hex must be lower case
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN}-1",  # short flags
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE}-{SPAN}-01\x00",
    ],
)
def test_parse_ignores_a_malformed_traceparent_and_its_tracestate(value: str) -> None:
    assert tracing.parse(value, TRACESTATE) is None


def test_parse_reads_a_higher_version_by_its_first_four_fields() -> None:
    ctx = tracing.parse(f"01-{TRACE}-{SPAN}-01-what-comes-next")
    assert ctx is not None and ctx.traceparent == TRACEPARENT  # sent on as version 00
    assert tracing.parse(f"01-{TRACE}-{SPAN}-01what") is None  # a field must follow a "-"


@pytest.mark.parametrize("state", ["x" * 513, "a=b\x01", "a=\u00e9", " "])
def test_a_tracestate_too_long_or_not_printable_is_dropped(state: str) -> None:
    assert tracing.parse(TRACEPARENT, state).tracestate is None


def test_a_child_keeps_the_trace_and_its_flags_and_draws_a_new_span_id() -> None:
    parent = tracing.parse(TRACEPARENT, TRACESTATE)
    children = {parent.child() for _ in range(50)}
    assert {(c.trace_id, c.flags, c.tracestate) for c in children} == {(TRACE, "01", TRACESTATE)}
    assert len({c.span_id for c in children}) == 50 and SPAN not in {c.span_id for c in children}


# -- storing it with the batch, handing it to the worker ----------------------------------


def traced_batch(
    conn: psycopg.Connection, specs: list[dict], traceparent: str, tracestate: str | None = None
) -> dict:
    """``create_batch`` after ``set_batch_trace`` in one transaction, as the API runs them."""
    with conn.transaction():
        conn.execute(
            QUERIES["set_batch_trace"], {"traceparent": traceparent, "tracestate": tracestate}
        )
        return create_batch(conn, specs)


def batch_trace(conn: psycopg.Connection, batch_id: Any) -> tuple[str | None, str | None]:
    row = conn.execute(
        "SELECT traceparent, tracestate FROM taskrunner.batch WHERE batch_id = %s", (batch_id,)
    ).fetchone()
    return row["traceparent"], row["tracestate"]


def test_a_batch_keeps_its_trace_and_the_claims_hand_it_out(conn) -> None:
    actions = [webhook(), webhook("success")]
    traced = traced_batch(conn, [task_spec("a", actions=actions)], TRACEPARENT, TRACESTATE)["a"]
    # the settings were local to that transaction: the next batch on the connection has none
    plain = create_batch(conn, [task_spec("b")])["b"]
    assert batch_trace(conn, traced["batch_id"]) == (TRACEPARENT, TRACESTATE)
    assert batch_trace(conn, plain["batch_id"]) == (None, None)

    claims = conn.execute(QUERIES["claim_tasks"], {"worker": "w", "max": 5, "lease_seconds": 60})
    by_task = {r["task_id"]: r for r in claims.fetchall()}
    assert by_task[traced["id"]]["traceparent"] == TRACEPARENT
    assert by_task[traced["id"]]["tracestate"] == TRACESTATE
    assert by_task[traced["id"]]["batch_id"] == traced["batch_id"]
    assert by_task[plain["id"]]["traceparent"] is None
    assert by_task[plain["id"]]["batch_id"] == plain["batch_id"]

    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (traced["id"],))
    (end,) = conn.execute(
        QUERIES["claim_deliveries"], {"worker": "w", "max": 5, "lease_seconds": 60}
    ).fetchall()
    assert (end["event"], end["traceparent"], end["tracestate"]) == (
        "success",
        TRACEPARENT,
        TRACESTATE,
    )
    assert end["batch_id"] == traced["batch_id"]


def test_a_malformed_traceparent_set_by_hand_is_refused(conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        traced_batch(conn, [task_spec("a")], TRACEPARENT.upper())
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.task").fetchone()["n"] == 0


@pytest.fixture
def client(pool) -> Iterator[testing.TestClient]:
    buffer = CounterBuffer(pool, interval=3600)
    yield testing.TestClient(create_app(Config(), pool, buffer))
    buffer.close()


def post_batch(client: testing.TestClient, **headers: str) -> str:
    body = [{"id": "a", "name": "a", "kind": "k", "on_start": _hook("http://example.com/")}]
    resp = client.simulate_post("/task", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.headers["X-Batch-ID"]


def _hook(url: str) -> dict:
    return {"kind": "Webhook", "params": {"url": url, "verb": "Post"}}


def test_post_task_stores_a_valid_traceparent_and_ignores_a_malformed_one(client, conn) -> None:
    traced = post_batch(client, traceparent=TRACEPARENT, tracestate=TRACESTATE)
    assert batch_trace(conn, traced) == (TRACEPARENT, TRACESTATE)
    # W3C: a receiver ignores a traceparent it cannot parse (and then its tracestate)
    malformed = post_batch(client, traceparent=TRACEPARENT.upper(), tracestate=TRACESTATE)
    assert batch_trace(conn, malformed) == (None, None)
    assert batch_trace(conn, post_batch(client)) == (None, None)


def test_every_webhook_carries_a_new_span_of_the_batch_trace(conn, sink, start_worker) -> None:  # noqa: F811
    first_try = threading.Event()

    def start(hit: Hit) -> tuple[int, Any]:  # fails once, then reports success
        if not first_try.is_set():
            first_try.set()
            return 503, None
        with psycopg.connect(conn.info.dsn, autocommit=True) as c:
            c.execute("SELECT taskrunner.update_task(%s, 'success')", (hit.headers["x-task-id"],))
        return 200, None

    sink.routes["/start"] = start
    # an action's own traceparent header gives way to the batch's
    own = {"Traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}
    actions = [webhook(url=sink.url("/start"), headers=own), webhook("success", sink.url("/done"))]
    traced_batch(conn, [task_spec("a", actions=actions)], TRACEPARENT, TRACESTATE)
    create_batch(conn, [task_spec("plain", actions=[webhook(url=sink.url("/plain"))])])
    start_worker()

    wait_until(lambda: sink.hits_for("/done") and sink.hits_for("/plain"), "the webhooks")
    hits = sink.hits_for("/start") + sink.hits_for("/done")
    assert len(hits) == 3  # two start attempts and the success webhook
    sent = [[v for k, v in h.raw_headers if k.lower() == "traceparent"] for h in hits]
    assert all(len(values) == 1 for values in sent), sent  # one each, the action's replaced
    contexts = [tracing.parse(values[0]) for values in sent]
    assert {(c.trace_id, c.flags) for c in contexts} == {(TRACE, "01")}
    span_ids = [c.span_id for c in contexts]
    assert len(set(span_ids)) == 3 and SPAN not in span_ids  # a new span per request
    assert {h.headers["tracestate"] for h in hits} == {TRACESTATE}
    (plain,) = sink.hits_for("/plain")
    assert "traceparent" not in plain.headers and "tracestate" not in plain.headers


# -- OpenTelemetry spans ------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    yield exporter
    tracing.disable()
    provider.shutdown()


def _hex(span_id: int) -> str:
    return f"{span_id:016x}"


def test_an_api_request_is_a_span_in_the_callers_trace_and_parents_the_batch(
    spans, pool, conn
) -> None:
    buffer = CounterBuffer(pool, interval=3600)
    client = testing.TestClient(create_app(Config(), pool, buffer))  # spans on: middleware
    try:
        batch_id = post_batch(client, traceparent=TRACEPARENT, tracestate=TRACESTATE)
        assert client.simulate_get("/task/not-a-uuid").status_code == 404
    finally:
        buffer.close()

    post, get = spans.get_finished_spans()
    assert (post.name, post.kind) == ("POST /task", SpanKind.SERVER)
    assert f"{post.context.trace_id:032x}" == TRACE and _hex(post.parent.span_id) == SPAN
    assert post.attributes["http.response.status_code"] == 201
    assert post.attributes["http.route"] == "/task"
    # the batch's webhooks will be children of the API's span, in the caller's trace
    stored = f"00-{TRACE}-{_hex(post.context.span_id)}-01"
    assert batch_trace(conn, batch_id) == (stored, TRACESTATE)
    # a request without a traceparent starts a trace of its own
    assert get.name == "GET /task/{id}" and get.parent is None
    assert get.attributes["http.response.status_code"] == 404


def test_claims_and_webhooks_are_spans_of_the_batch_trace(spans, conn, sink, start_worker):  # noqa: F811
    actions = [webhook(url=sink.url("/start?token=secret"))]
    task = traced_batch(conn, [task_spec("a", actions=actions)], TRACEPARENT)["a"]
    sink.routes["/start"] = lambda hit: (502, None)
    start_worker(webhook_max_attempts=1)
    (hit,) = wait_until(lambda: sink.hits_for("/start"), "the start webhook")

    def finished() -> list:
        return [s for s in spans.get_finished_spans() if s.name == "webhook start"]

    (call,) = wait_until(finished, "the webhook span")
    (claim,) = [s for s in spans.get_finished_spans() if s.name == "claim_tasks"]
    for span in (claim, call):
        assert f"{span.context.trace_id:032x}" == TRACE and _hex(span.parent.span_id) == SPAN
        assert span.attributes["taskrunner.task_id"] == str(task["id"])
    assert claim.attributes["taskrunner.worker"] == "w0"
    assert claim.start_time <= claim.end_time <= call.start_time
    # the webhook's traceparent is the webhook span itself
    assert hit.headers["traceparent"] == f"00-{TRACE}-{_hex(call.context.span_id)}-01"
    assert call.kind == SpanKind.CLIENT
    assert call.attributes["http.response.status_code"] == 502
    assert call.attributes["url.path"] == "/start"
    assert "secret" not in json.dumps(dict(call.attributes))  # no query string
    assert not call.status.is_ok and call.status.description == "HTTP 502"


def test_spans_stay_off_and_unimported_without_an_otlp_endpoint() -> None:
    code = """
import sys
from taskrunner import tracing
from taskrunner.api import app
from taskrunner.worker import worker
tracing.configure("test")
assert not tracing.enabled()
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_otlp_endpoint_turns_spans_on(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-runner")
    tracing.configure("taskrunner-api")
    try:
        assert tracing.enabled()
        resource = tracing._provider.resource.attributes
        assert resource["service.name"] == "billing-runner"
    finally:
        tracing._provider.shutdown()
        tracing.disable()


# -- end to end: the API under gunicorn, a worker process, OTLP over HTTP ----------------


class Collector:
    """An OTLP/HTTP trace receiver: keeps every span the processes export."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def named(self, name: str) -> list[Any]:
        return [s for s in list(self.spans) if s.name == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_callers_trace_runs_through_api_claims_and_webhooks(db_url: str, tmp_path) -> None:
    collector, target = Collector(), ProcSink()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    tasks = [
        {
            "id": "a",
            "name": "a",
            "kind": "k",
            "on_start": _hook(f"{target.url}/start"),
            "on_success": [_hook(f"{target.url}/done")],
        },
        {
            "id": "b",
            "name": "b",
            "kind": "k",
            "on_start": _hook(f"{target.url}/start"),
            "dependencies": [{"id": "a", "requires_success": True}],
        },
    ]
    try:
        with service(db_url, tmp_path, worker_processes=1, API_PROCESSES="1", **otel) as svc:
            svc.post(tasks, headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
            wait_for(lambda: len(target.requests) == 3, message="three webhooks")
            wait_for(lambda: len(collector.named("webhook start")) == 2, message="the spans")
            wait_for(lambda: collector.named("webhook success"), message="the end webhook span")
        sent = [tracing.parse(r["headers"]["traceparent"]) for r in target.requests]
        (api,) = collector.named("POST /task")
        webhooks = collector.named("webhook start") + collector.named("webhook success")
        claims = collector.named("claim_tasks") + collector.named("claim_deliveries")
    finally:
        target.close()
        collector.close()

    assert api.trace_id.hex() == TRACE and api.parent_span_id.hex() == SPAN
    # every webhook: the caller's trace, a span id of its own, the API's span as parent
    assert {c.trace_id for c in sent} == {TRACE}
    assert {c.span_id for c in sent} == {s.span_id.hex() for s in webhooks}
    assert len(claims) == 3
    for span in webhooks + claims:
        assert span.trace_id.hex() == TRACE and span.parent_span_id == api.span_id
    assert {r["headers"]["tracestate"] for r in target.requests} == {TRACESTATE}
