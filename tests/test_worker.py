"""The worker end to end: a real Worker (own thread, own event loop) against the test
database and a real HTTP server standing in for the remote side (the "sink").

Every assertion reads the database or the requests the sink recorded; waiting is done by
polling with a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from conftest import create_batch, status_of, task_spec, webhook

from taskrunner import metrics
from taskrunner.config import Config
from taskrunner.worker.worker import Worker

HOST_URL = "http://taskrunner.test"


# --- the remote side -----------------------------------------------------------------


@dataclass
class Hit:
    """One request the sink received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: Any
    raw_headers: list[tuple[str, str]] = field(default_factory=list)  # as sent, repeats too


Responder = Callable[[Hit], tuple[int, Any]]


class Sink:
    """An HTTP server in a thread: records requests, answers per path (default 200)."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.routes: dict[str, Responder] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in list(self.hits) if h.path == path]

    def answer(self, hit: Hit) -> tuple[int, Any]:
        self.hits.append(hit)
        responder = self.routes.get(hit.path)
        return responder(hit) if responder else (200, None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_for(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            hit = Hit(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=json.loads(raw) if raw else None,
                raw_headers=list(self.headers.items()),
            )
            status, body = sink.answer(hit)
            payload = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "/redirected")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def held(release: threading.Event, answer: tuple[int, Any] = (200, None)) -> Responder:
    """A responder that keeps the request open until ``release`` is set."""

    def respond(_: Hit) -> tuple[int, Any]:
        release.wait(30)
        return answer

    return respond


# --- running a worker ----------------------------------------------------------------


@dataclass
class RunningWorker:
    worker: Worker
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(20)
        assert not self.thread.is_alive(), "worker did not stop"
        assert not self.errors, f"worker crashed: {self.errors!r}"


def test_config(db_url: str, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "database_url": db_url,
        "host_url": HOST_URL,
        "worker_concurrency": 8,
        "poll_interval": 0.2,
        "tick_interval": 0.2,
        "webhook_timeout": 2.0,
        "webhook_max_attempts": 3,
        "webhook_backoff_base": 0.01,
        "webhook_backoff_max": 0.05,
        "shutdown_grace": 2.0,
        "webhook_allow_private": True,  # the sinks listen on 127.0.0.1
    }
    return Config(**(settings | overrides))


test_config.__test__ = False  # a helper, not a test


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


@pytest.fixture
def start_worker(db_url: str) -> Iterator[Callable[..., RunningWorker]]:
    running: list[RunningWorker] = []

    def start(**overrides: Any) -> RunningWorker:
        worker = Worker(test_config(db_url, **overrides), worker_id=f"w{len(running)}")
        errors: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(worker.run())
            except BaseException as exc:  # surfaced by RunningWorker.stop()
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        running.append(RunningWorker(worker, thread, errors))
        return running[-1]

    yield start
    for r in running:
        r.stop()


def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# --- database helpers ----------------------------------------------------------------


def task_row(conn: psycopg.Connection, task_id: Any) -> dict:
    return conn.execute("SELECT * FROM taskrunner.task WHERE id = %s", (task_id,)).fetchone()


def deliveries(conn: psycopg.Connection, task_id: Any, event: str) -> list[dict]:
    return conn.execute(
        "SELECT * FROM taskrunner.delivery WHERE task_id = %s AND event = %s ORDER BY created_at",
        (task_id, event),
    ).fetchall()


def attempts(conn: psycopg.Connection, delivery_id: Any) -> list[dict]:
    return conn.execute(
        "SELECT * FROM taskrunner.delivery_attempt WHERE delivery_id = %s ORDER BY attempt",
        (delivery_id,),
    ).fetchall()


def status_is(conn: psycopg.Connection, task_id: Any, status: str) -> Callable[[], bool]:
    return lambda: status_of(conn, task_id) == status


def started(conn: psycopg.Connection, task_id: Any) -> Callable[[], bool]:
    return lambda: task_row(conn, task_id)["started_at"] is not None


def one_task(conn: psycopg.Connection, *actions: dict, **extra: Any) -> Any:
    return create_batch(conn, [task_spec("t", actions=list(actions), **extra)])["t"]["id"]


def complete_from_remote(db_url: str, answer: tuple[int, Any] = (200, None)) -> Responder:
    """A target that reports success through SQL before it answers the start."""

    def respond(hit: Hit) -> tuple[int, Any]:
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute("SELECT taskrunner.update_task(%s, 'success')", (hit.headers["x-task-id"],))
        return answer

    return respond


# --- tests ---------------------------------------------------------------------------


def test_start_webhook_request_carries_handle_body_and_headers(conn, sink, start_worker):
    task_id = one_task(
        conn,
        webhook(
            url=sink.url("/start?x=1&y=two"),
            verb="PUT",
            body={"job": [1, 2]},
            headers={"X-Custom": "yes"},
        ),
    )
    start_worker()

    hit = wait_until(lambda: sink.hits_for("/start"), "the start webhook")[0]
    wait_until(started(conn, task_id), "the start to be recorded")
    (delivery,) = deliveries(conn, task_id, "start")
    assert hit.method == "PUT"
    assert hit.query == {"x": ["1"], "y": ["two"], "handle": [f"{HOST_URL}/task/{task_id}"]}
    assert hit.body == {"job": [1, 2]}
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["x-custom"] == "yes"
    assert hit.headers["x-task-id"] == str(task_id)
    assert hit.headers["x-task-trigger"] == "Start"
    assert hit.headers["idempotency-key"] == str(delivery["id"])
    assert delivery["status"] == "delivered"
    assert status_of(conn, task_id) == "running"


def test_null_body_sends_no_body(conn, sink, start_worker):
    one_task(conn, webhook(url=sink.url("/start"), verb="GET", body=None))
    start_worker()

    hit = wait_until(lambda: sink.hits_for("/start"), "the start webhook")[0]
    assert hit.method == "GET"
    assert hit.body is None
    assert "content-type" not in hit.headers


def test_cancel_action_from_start_response_fires_on_cancel(conn, sink, start_worker):
    cancel = {"kind": "webhook", "params": {"url": sink.url("/stop?job=7"), "verb": "delete"}}
    sink.routes["/start"] = lambda _: (200, [cancel, {"kind": "Email"}])
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    start_worker()

    wait_until(started(conn, task_id), "the start to be recorded")
    actions = conn.execute(
        "SELECT url, verb FROM taskrunner.action WHERE task_id = %s AND event = 'cancel'",
        (task_id,),
    ).fetchall()
    assert actions == [{"url": sink.url("/stop?job=7"), "verb": "DELETE"}]
    assert not sink.hits_for("/stop")

    conn.execute("SELECT taskrunner.cancel_task(%s)", (task_id,))
    hit = wait_until(lambda: sink.hits_for("/stop"), "the cancel webhook")[0]
    assert hit.method == "DELETE"
    assert hit.headers["x-task-trigger"] == "Cancel"
    assert hit.query["job"] == ["7"]


def _cancel_actions(conn: psycopg.Connection, task_id: Any) -> list[dict]:
    return conn.execute(
        "SELECT url, verb FROM taskrunner.action WHERE task_id = %s AND event = 'cancel'",
        (task_id,),
    ).fetchall()


def _start_refused(conn: psycopg.Connection, sink: Sink, answer: Any, start_worker) -> str:
    """Answer the start with ``answer``; the start must fail at once (no retry), its task
    must fail and no cancel action may be registered. Returns the recorded error."""
    sink.routes["/start"] = lambda _: (200, answer)
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    start_worker(webhook_max_attempts=3)

    wait_until(status_is(conn, task_id, "failure"), "the task to fail")
    (delivery,) = deliveries(conn, task_id, "start")
    assert delivery["status"] == "failed"
    (attempt,) = attempts(conn, delivery["id"])
    assert attempt["status_code"] == 200
    assert task_row(conn, task_id)["failure_reason"] == f"start webhook failed: {attempt['error']}"
    assert _cancel_actions(conn, task_id) == []
    return attempt["error"]


def test_start_response_registers_no_more_cancel_actions_than_on_cancel_allows(
    conn, sink, start_worker
):
    """Issue 13.8: one start response registered 5,000 cancel actions."""
    cancel = {"kind": "Webhook", "params": {"url": sink.url("/stop"), "verb": "POST"}}
    error = _start_refused(conn, sink, [cancel] * 5000, start_worker)
    assert (
        error == "invalid cancel actions in the start response: body: must have at most 100 items"
    )


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"url": "/stop"}, "[0].params.verb: is required"),
        ({"url": "/stop", "verb": "TRACE"}, "[0].params.verb: must be one of Get, Post, Put, "),
        ({"url": "ftp://x.test/", "verb": "Post"}, "[0].params.url: must be an absolute http"),
        (
            {"url": "/stop", "verb": "Post", "headers": {"X-A": "a\r\nb"}},
            "[0].params.headers.X-A: must be a header value",
        ),
        (
            {"url": "/stop", "verb": "Post", "headers": {f"H{i}": "v" for i in range(51)}},
            "[0].params.headers: must have at most 50 entries",
        ),
    ],
)
def test_start_response_cancel_actions_are_validated_like_on_cancel(
    conn, sink, start_worker, params, problem
):
    if params["url"].startswith("/"):
        params = params | {"url": sink.url(params["url"])}
    answer = [{"kind": "Webhook", "trigger": "Cancel", "params": params}]
    error = _start_refused(conn, sink, answer, start_worker)
    assert error.startswith(f"invalid cancel actions in the start response: {problem}"), error


def test_cancel_while_start_in_flight_still_cancels_remote(conn, sink, start_worker):
    release = threading.Event()
    cancel = {
        "kind": "Webhook",
        "trigger": "Cancel",
        "params": {"url": sink.url("/stop"), "verb": "POST"},
    }
    sink.routes["/start"] = held(release, (200, cancel))
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    start_worker()

    wait_until(lambda: sink.hits_for("/start"), "the start webhook")
    conn.execute("SELECT taskrunner.cancel_task(%s)", (task_id,))
    release.set()

    wait_until(lambda: sink.hits_for("/stop"), "the cancel webhook")
    assert status_of(conn, task_id) == "canceled"


def test_success_fires_on_success_webhooks(conn, sink, start_worker):
    task_id = one_task(
        conn,
        webhook(url=sink.url("/start")),
        webhook("success", url=sink.url("/done"), body={"ok": True}),
        webhook("failure", url=sink.url("/failed")),
    )
    start_worker()
    wait_until(started(conn, task_id), "the start to be recorded")

    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (task_id,))

    hit = wait_until(lambda: sink.hits_for("/done"), "the on_success webhook")[0]
    assert hit.headers["x-task-trigger"] == "End"
    assert hit.body == {"ok": True}
    wait_until(
        lambda: deliveries(conn, task_id, "success")[0]["status"] == "delivered",
        "the on_success delivery to be recorded",
    )
    assert not sink.hits_for("/failed")


def test_failed_attempt_is_retried_with_the_same_idempotency_key(conn, sink, start_worker):
    answers = iter([(503, None), (200, None)])
    sink.routes["/start"] = lambda _: next(answers)
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    start_worker()

    wait_until(started(conn, task_id), "the start to succeed on its second attempt")
    (delivery,) = deliveries(conn, task_id, "start")
    recorded = attempts(conn, delivery["id"])
    assert [(a["attempt"], a["status_code"], a["error"]) for a in recorded] == [
        (1, 503, "HTTP 503"),
        (2, 200, None),
    ]
    keys = {h.headers["idempotency-key"] for h in sink.hits_for("/start")}
    assert keys == {str(delivery["id"])}


def test_start_that_keeps_failing_fails_the_task(conn, sink, start_worker):
    sink.routes["/start"] = lambda _: (503, None)
    task_id = one_task(
        conn, webhook(url=sink.url("/start")), webhook("failure", url=sink.url("/failed"))
    )
    start_worker(webhook_max_attempts=3)

    wait_until(status_is(conn, task_id, "failure"), "the task to fail")
    assert "HTTP 503" in task_row(conn, task_id)["failure_reason"]
    (delivery,) = deliveries(conn, task_id, "start")
    assert delivery["status"] == "failed"
    assert [a["error"] for a in attempts(conn, delivery["id"])] == ["HTTP 503"] * 3
    assert len(sink.hits_for("/start")) == 3
    hit = wait_until(lambda: sink.hits_for("/failed"), "the on_failure webhook")[0]
    assert hit.headers["x-task-trigger"] == "End"


def test_a_start_failure_records_the_worker_as_its_author(conn, sink, start_worker):
    sink.routes["/start"] = lambda _: (503, None)
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    start_worker(webhook_max_attempts=1)

    wait_until(status_is(conn, task_id, "failure"), "the task to fail")
    role = conn.execute("SELECT session_user AS u").fetchone()["u"]
    assert task_row(conn, task_id)["status_reason"] == (
        f"set to Failure by taskrunner-worker (role {role})"
    )
    history = conn.execute(
        "SELECT actor, reason FROM taskrunner.task_history "
        "WHERE task_id = %s AND to_status = 'failure'",
        (task_id,),
    ).fetchone()
    assert history["actor"] == f"taskrunner-worker (role {role})"
    assert "HTTP 503" in history["reason"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("target", "expected_error"),
    [("redirect", "HTTP 302"), ("slow", "timeout"), ("closed", "connection refused")],
)
def test_transport_failures_are_recorded_as_errors(
    conn, sink, start_worker, target, expected_error
):
    release = threading.Event()
    sink.routes["/redirect"] = lambda _: (302, None)
    sink.routes["/slow"] = held(release)
    url = f"http://127.0.0.1:{_closed_port()}/" if target == "closed" else sink.url(f"/{target}")
    task_id = one_task(conn, webhook(url=url))
    start_worker(webhook_max_attempts=1, webhook_timeout=0.5)

    wait_until(status_is(conn, task_id, "failure"), "the task to fail")
    release.set()
    (delivery,) = deliveries(conn, task_id, "start")
    assert [a["error"] for a in attempts(conn, delivery["id"])] == [expected_error]
    assert task_row(conn, task_id)["failure_reason"].endswith(expected_error)
    assert not sink.hits_for("/redirected")


def test_chain_completed_by_the_remote_side_runs_to_the_end(db_url, conn, sink, start_worker):
    sink.routes["/start"] = complete_from_remote(db_url)
    hook = webhook(url=sink.url("/start"))
    tasks = create_batch(
        conn,
        [
            task_spec("a", actions=[hook]),
            task_spec("b", actions=[hook], deps=["a"]),
            task_spec("c", actions=[hook], deps=["b"]),
        ],
    )
    start_worker()

    wait_until(status_is(conn, tasks["c"]["id"], "success"), "the last task to succeed")
    started_ids = [h.headers["x-task-id"] for h in sink.hits_for("/start")]
    assert started_ids == [str(tasks[k]["id"]) for k in "abc"]
    assert all(status_of(conn, tasks[k]["id"]) == "success" for k in "abc")


def _listener_pid(conn: psycopg.Connection) -> int | None:
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN%%' AND state = 'idle'"
    ).fetchone()
    return row and row["pid"]


def _worker_waiting(conn: psycopg.Connection) -> bool:
    """Listening, and every worker connection idle for a while: it waits for a wake-up."""
    busy = conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()"
        " AND (state <> 'idle' OR state_change > now() - interval '200 ms')"
    ).fetchone()
    return _listener_pid(conn) is not None and not busy


def test_worker_wakes_on_notify_not_poll(conn, sink, start_worker):
    start_worker(poll_interval=30, tick_interval=30)
    wait_until(lambda: _worker_waiting(conn), "the worker to wait")

    one_task(conn, webhook(url=sink.url("/start")))

    wait_until(lambda: sink.hits_for("/start"), "the start webhook", timeout=5)


def test_stop_without_grace_releases_in_flight_start(conn, sink, start_worker):
    release = threading.Event()
    sink.routes["/start"] = held(release)
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    running = start_worker(shutdown_grace=0)
    wait_until(lambda: sink.hits_for("/start"), "the start webhook")

    running.stop()
    release.set()

    assert status_of(conn, task_id) == "pending"
    (delivery,) = deliveries(conn, task_id, "start")
    assert delivery["status"] == "expired"
    assert delivery["last_error"] == "released by worker shutdown"


def test_stop_lets_in_flight_webhooks_finish_within_grace(conn, sink, start_worker):
    release = threading.Event()
    sink.routes["/start"] = held(release)
    task_id = one_task(conn, webhook(url=sink.url("/start")))
    running = start_worker(shutdown_grace=20)
    wait_until(lambda: sink.hits_for("/start"), "the start webhook")

    running.worker.stop()
    release.set()
    running.stop()

    assert task_row(conn, task_id)["started_at"] is not None
    assert deliveries(conn, task_id, "start")[0]["status"] == "delivered"


def test_running_task_times_out_via_tick(conn, sink, start_worker):
    task_id = one_task(
        conn,
        webhook(url=sink.url("/start")),
        webhook("failure", url=sink.url("/failed")),
        timeout=1,
    )
    start_worker()

    wait_until(status_is(conn, task_id, "failure"), "the task to time out")
    assert task_row(conn, task_id)["failure_reason"] == "Timeout"
    wait_until(lambda: sink.hits_for("/failed"), "the on_failure webhook")


def test_worker_survives_losing_its_connections(conn, sink, start_worker):
    # no polling to fall back on: the LISTEN connection itself must come back
    start_worker(poll_interval=30, tick_interval=30)
    lost = wait_until(lambda: _listener_pid(conn), "the LISTEN connection")

    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    wait_until(lambda: _listener_pid(conn) not in (None, lost), "LISTEN on a new connection")
    task_id = one_task(conn, webhook(url=sink.url("/start")))

    wait_until(started(conn, task_id), "a start after the reconnect", timeout=5)


def test_worker_feeds_transition_stats_and_loop_durations(conn, sink, start_worker, monkeypatch):
    seen: list[str] = []
    loops: list[float] = []
    monkeypatch.setattr(metrics, "record_stats", seen.append)
    monkeypatch.setattr(metrics, "observe_worker_loop", loops.append)
    one_task(conn, webhook(url=sink.url("/start")), kind="stats-kind")
    start_worker()

    wait_until(
        lambda: any("pending>running>stats-kind>1;" in s for s in seen),
        "the claim's transition in the stats",
    )
    wait_until(lambda: loops, "a loop duration")
    assert all(seconds >= 0 for seconds in loops)


def test_concurrency_bounds_webhooks_in_flight(conn, sink, start_worker):
    release = threading.Event()
    sink.routes["/start"] = held(release)
    hook = webhook(url=sink.url("/start"))
    create_batch(conn, [task_spec(str(i), actions=[hook]) for i in range(5)])
    start_worker(worker_concurrency=2)

    wait_until(lambda: len(sink.hits_for("/start")) == 2, "two starts in flight")
    running = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task WHERE status = 'running'"
    ).fetchone()["n"]
    assert running == 2
    release.set()
    wait_until(lambda: len(sink.hits_for("/start")) == 5, "all five starts")


@pytest.mark.slow
def test_run_worker_process_exits_cleanly_on_sigterm(db_url, conn, sink):
    env = os.environ | {
        "DATABASE_URL": db_url,
        "HOST_URL": HOST_URL,
        "POLL_INTERVAL": "0.2",
        "SHUTDOWN_GRACE": "5",
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }
    code = (
        "from taskrunner.config import Config\n"
        "from taskrunner.worker.main import run_worker\n"
        "run_worker(Config.from_env())\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        task_id = one_task(conn, webhook(url=sink.url("/start")))
        wait_until(started(conn, task_id), "the process to start the task", timeout=20)
        assert task_row(conn, task_id)["claimed_by"] == f"{socket.gethostname()}:{process.pid}"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()


def test_worker_without_a_database_keeps_retrying_and_stops_cleanly(start_worker, caplog):
    caplog.set_level(logging.WARNING, logger="taskrunner.worker")
    running = start_worker(database_url=f"postgresql://127.0.0.1:{_closed_port()}/none")

    def outage_logged(message: str) -> Callable[[], bool]:
        return lambda: any(message in r.getMessage() for r in list(caplog.records))

    wait_until(outage_logged("database unavailable"), "the main loop to report the outage")
    wait_until(outage_logged("LISTEN connection lost"), "the listener to report the outage")
    assert running.thread.is_alive()
    running.stop()


def test_two_workers_start_each_task_exactly_once(db_url, conn, sink, start_worker):
    sink.routes["/start"] = complete_from_remote(db_url)
    hook = webhook(url=sink.url("/start"))
    tasks = create_batch(conn, [task_spec(str(i), actions=[hook]) for i in range(30)])
    start_worker(worker_concurrency=4)
    start_worker(worker_concurrency=4)

    wait_until(
        lambda: all(status_of(conn, t["id"]) == "success" for t in tasks.values()),
        "every task to succeed",
        timeout=20,
    )
    started_ids = sorted(h.headers["x-task-id"] for h in sink.hits_for("/start"))
    assert started_ids == sorted(str(t["id"]) for t in tasks.values())
    workers = conn.execute("SELECT DISTINCT claimed_by FROM taskrunner.task").fetchall()
    assert {w["claimed_by"] for w in workers} <= {"w0", "w1"}


def test_a_ready_task_costs_its_claim_only(db_url, conn, sink, start_worker):
    """Issue 12.2: a task becoming ready (NOTIFY taskrunner_task) wakes the worker for
    ``claim_tasks`` alone; ``claim_deliveries`` runs on its own notifications and on timer
    rounds, not on every hop of a chain (it cost the hop a transaction in every other
    round). Counted by PostgreSQL itself (``track_functions``)."""
    dbname = conn.info.dbname
    conn.execute(f"ALTER DATABASE \"{dbname}\" SET track_functions = 'all'")
    sink.routes["/start"] = complete_from_remote(db_url)
    hook = webhook(url=sink.url("/start"))
    hops = 12
    specs = [task_spec("0", actions=[hook])]
    specs += [task_spec(str(i), deps=[str(i - 1)], actions=[hook]) for i in range(1, hops)]
    tasks = create_batch(conn, specs)
    # timer rounds (poll, tick) every 30 s: within this test only notifications wake it
    running = start_worker(poll_interval=30.0, tick_interval=30.0)
    last = tasks[str(hops - 1)]["id"]
    wait_until(lambda: status_of(conn, last) == "success", "the end of the chain", timeout=20)
    running.stop()  # its backends exit and flush their function counts

    def calls() -> dict[str, int]:
        rows = conn.execute(
            "SELECT funcname, calls FROM pg_stat_user_functions"
            " WHERE schemaname = 'taskrunner' AND funcname IN ('claim_tasks', 'claim_deliveries')"
        ).fetchall()
        found = {r["funcname"]: r["calls"] for r in rows}
        return found if found.get("claim_tasks", 0) >= hops else {}

    counted = wait_until(calls, "the worker's function counts")
    # start-up and the LISTEN connection's first wake-up run both; every hop one claim
    assert counted.get("claim_deliveries", 0) <= 3, counted
