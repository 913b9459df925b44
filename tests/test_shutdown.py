"""Graceful shutdown with real processes.

SIGTERM to the API: every PUT /task increment it buffered is written before it exits.
SIGTERM to a worker: it stops claiming, waits up to SHUTDOWN_GRACE for its in-flight
webhooks (recording those that finish), and hands back the rest so another worker takes
them over.
"""

from __future__ import annotations

import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import create_batch, task_spec
from invariants import (
    assert_counters,
    assert_deliveries_settled,
    assert_history_consistent,
    assert_no_double_start,
)
from procs import (
    Reply,
    Sink,
    count,
    free_port,
    running,
    service_env,
    stop,
    wait_for,
    wait_healthy,
)

pytestmark = pytest.mark.slow


def test_sigterm_to_the_api_flushes_every_buffered_increment(db_url, conn, tmp_path):
    tasks = create_batch(conn, [task_spec(f"t{i}") for i in range(50)])
    ids = [str(t["id"]) for t in tasks.values()]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # never flushed by the timer: only the shutdown can write them
    env = service_env(db_url, port, tmp_path, API_PROCESSES="2", COUNTER_FLUSH_INTERVAL="3600")
    rng = random.Random(7)
    sent = [(rng.choice(ids), rng.randint(0, 5), rng.randint(0, 2)) for _ in range(2000)]

    def put(chunk: list[tuple[str, int, int]]) -> None:
        with httpx.Client(timeout=10) as client:
            for task_id, s, f in chunk:
                if s % 2:
                    body = {"task_id": task_id, "new_success": s, "new_failures": f}
                    resp = client.put(f"{base}/task", json=body)
                else:
                    body = {"new_success": s, "new_failures": f}
                    resp = client.put(f"{base}/task/{task_id}", json=body)
                assert resp.status_code == 202, resp.text

    with running(["api"], env) as api:
        wait_healthy(base)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, [sent[i::8] for i in range(8)]))
        written = count(conn, "SELECT count(*) AS n FROM taskrunner.task WHERE success > 0")
        code = stop(api)  # SIGTERM, as systemd or `up` would

    assert written == 0, "increments were flushed before the shutdown; the test proves nothing"
    assert code == 0
    want = {t: (0, 0) for t in ids}
    for task_id, s, f in sent:
        want[task_id] = (want[task_id][0] + s, want[task_id][1] + f)
    total = assert_counters(conn, want)
    print(f"\nAPI SIGTERM: {len(sent)} PUTs, {total} increments, all written at shutdown")


def _held_sink(release: threading.Event) -> Sink:
    """Start webhooks hang until ``release`` is set; then the sink completes the task."""

    def respond(req: dict) -> Reply:
        release.wait(60)
        return Reply()

    return Sink(respond=respond)


def test_sigterm_to_a_worker_releases_what_it_cannot_finish(db_url, conn, tmp_path):
    release = threading.Event()
    sink = _held_sink(release)
    hook = {"event": "start", "url": f"{sink.url}/start", "verb": "POST"}
    create_batch(conn, [task_spec(f"t{i}", actions=[hook]) for i in range(10)])
    port = free_port()
    env = service_env(
        db_url,
        port,
        tmp_path,
        WEBHOOK_TIMEOUT="30",
        SHUTDOWN_GRACE="1",
        WORKER_CONCURRENCY="4",
    )
    try:
        with running(["api"], env):
            with running(["worker"], env) as first:
                wait_for(lambda: len(sink.starts()) == 4, 30, message="4 starts in flight")
                code = stop(first, timeout=15)  # SIGTERM: grace 1 s, then release
            released = conn.execute(
                "SELECT d.status::text, d.last_error, t.status::text AS task"
                " FROM taskrunner.delivery d JOIN taskrunner.task t ON t.id = d.task_id"
            ).fetchall()
            claimed = count(
                conn,
                "SELECT count(*) AS n FROM taskrunner.task_history WHERE to_status = 'running'",
            )
            release.set()
            with running(["worker"], env):
                wait_healthy(f"http://127.0.0.1:{port}")
                wait_for(
                    lambda: (
                        count(
                            conn,
                            "SELECT count(*) AS n FROM taskrunner.task WHERE status = 'success'",
                        )
                        == 10
                    ),
                    60,
                    message="the second worker to finish everything",
                )
    finally:
        release.set()
        sink.close()

    assert code == 0
    assert claimed == 4, "the stopping worker claimed more after SIGTERM"
    assert len(released) == 4
    assert all(
        r["status"] == "expired"
        and r["last_error"] == "released by worker shutdown"
        and r["task"] == "pending"
        for r in released
    ), released
    starts = assert_no_double_start(conn)
    assert starts == {"claims": 14, "restarts": 4}
    assert_history_consistent(conn)
    print(f"\nworker SIGTERM (grace too short): 4 released and taken over, {starts}")


def test_sigterm_to_a_worker_waits_for_in_flight_webhooks_within_grace(db_url, conn, tmp_path):
    release = threading.Event()
    sink = _held_sink(release)
    hook = {"event": "start", "url": f"{sink.url}/start", "verb": "POST"}
    create_batch(conn, [task_spec(f"t{i}", actions=[hook]) for i in range(10)])
    port = free_port()
    env = service_env(
        db_url, port, tmp_path, WEBHOOK_TIMEOUT="30", SHUTDOWN_GRACE="30", WORKER_CONCURRENCY="4"
    )
    try:
        with running(["api"], env):
            with running(["worker"], env) as worker:
                wait_healthy(f"http://127.0.0.1:{port}")
                wait_for(lambda: len(sink.starts()) == 4, 30, message="4 starts in flight")
                worker.send_signal(signal.SIGTERM)
                # it stays up, waiting for them; they are still its own
                in_flight = count(
                    conn, "SELECT count(*) AS n FROM taskrunner.delivery WHERE status = 'in_flight'"
                )
                alive = worker.poll() is None
                release.set()
                code = worker.wait(30)
            wait_for(
                lambda: (
                    count(
                        conn, "SELECT count(*) AS n FROM taskrunner.task WHERE status = 'success'"
                    )
                    == 4
                ),
                30,
                message="the four started tasks to be completed by the remote side",
            )
    finally:
        release.set()
        sink.close()

    assert alive and in_flight == 4
    assert code == 0
    counts = conn.execute(
        "SELECT status::text, count(*) AS n FROM taskrunner.task GROUP BY 1"
    ).fetchall()
    assert {r["status"]: r["n"] for r in counts} == {"success": 4, "pending": 6}
    claims = count(
        conn, "SELECT count(*) AS n FROM taskrunner.task_history WHERE to_status = 'running'"
    )
    assert claims == 4, "nothing is claimed after SIGTERM"
    assert_no_double_start(conn)
    assert_deliveries_settled(conn, sink.received())
    assert_history_consistent(conn)
