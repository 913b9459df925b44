"""Faults with real processes: workers killed with SIGKILL while their webhooks are in
flight (repeatedly), an API process killed mid-request, and webhook targets that are
down, too slow, answering 5xx or closing the connection.

After each: nothing lost (every task ends where the promise says, every webhook its end
fires is queued once and delivered or given up), every delivery attempted and each
attempt recorded -- all read from task_history, delivery and delivery_attempt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections import Counter

import httpx
import pytest
from conftest import create_batch, task_spec
from invariants import (
    assert_deliveries_settled,
    assert_final_states,
    assert_history_consistent,
    assert_no_double_start,
    assert_rule_respected,
)
from procs import (
    Reply,
    Sink,
    children,
    count,
    hook,
    local_ids,
    running,
    service,
    wait_for,
)

from taskrunner import db
from taskrunner.api.store import Store

pytestmark = pytest.mark.slow


def _all_ended(conn) -> bool:
    return (
        count(
            conn,
            "SELECT count(*) AS n FROM taskrunner.task"
            " WHERE status NOT IN ('success', 'failure', 'canceled')",
        )
        == 0
        and count(
            conn,
            "SELECT count(*) AS n FROM taskrunner.delivery WHERE status IN ('queued', 'in_flight')",
        )
        == 0
    )


def test_kill_9_workers_with_webhooks_in_flight_repeatedly(db_url, conn, tmp_path):
    """Three times, SIGKILL the worker holding the most in-flight deliveries and start a
    replacement. Leases run out (WEBHOOK_TIMEOUT=1 -> 12 s), tick() puts the starts back
    to pending and requeues the end webhooks; everything still completes exactly once
    per claim, and the rule is never exceeded."""
    settings = {"WEBHOOK_TIMEOUT": "1", "WORKER_CONCURRENCY": "8"}
    # slow enough that a kill always finds webhooks in flight
    sink = Sink(respond=lambda req: Reply(delay=0.3))
    rule = {
        "Concurency": {
            "matcher": {"kind": "job", "status": "Running", "fields": ["tenant"]},
            "max_concurency": 4,
        }
    }
    n = 240
    batch = [
        {
            "id": f"t{i}",
            "name": f"t{i}",
            "kind": "job",
            "metadata": {"tenant": f"t{i % 3}"},
            "rules": [rule],
            "on_start": hook(f"{sink.url}/start"),
            "on_success": [hook(f"{sink.url}/done")],
        }
        for i in range(n)
    ]
    kills = 0
    try:
        with contextlib.ExitStack() as stack:
            svc = stack.enter_context(service(db_url, tmp_path, worker_processes=0, **settings))
            env = svc.env
            workers = [stack.enter_context(running(["worker"], env)) for _ in range(3)]
            expected = {t["id"]: "success" for t in svc.post(batch).json()}

            for _ in range(3):
                seen = len(sink.requests)
                wait_for(lambda s=seen: len(sink.requests) > s + 10, 30, message="progress")
                victim = _busiest_worker(conn, [p.pid for p in workers])
                proc = next(p for p in workers if p.pid == victim)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                workers.remove(proc)
                workers.append(stack.enter_context(running(["worker"], env)))

            wait_for(lambda: _all_ended(conn), 120, interval=0.2, message="every task to end")
    finally:
        sink.close()

    assert kills == 3
    assert_final_states(conn, expected)
    starts = assert_no_double_start(conn)
    settled = assert_deliveries_settled(conn, sink.received())
    assert_rule_respected(conn, "job", ["tenant"], 4)
    assert_history_consistent(conn)
    expired = count(
        conn,
        "SELECT count(*) AS n FROM taskrunner.delivery_attempt"
        " WHERE error = 'lease expired (worker gone?)'",
    )
    assert expired > 0, "the kills should have cut some deliveries short"
    done = Counter(r["headers"]["idempotency-key"] for r in sink.requests if r["path"] == "/done")
    assert len(done) == n  # one on_success delivery per task, each received at least once
    print(
        f"\nworker kills: {n} tasks, {kills} kills, {expired} leases expired, {starts}, {settled}"
    )


def _busiest_worker(conn, pids: list[int]) -> int:
    """Of the live workers ``pids``, the one with the most deliveries in flight (worker
    ids are host:pid; a killed worker's deliveries stay in flight until their lease ends)."""

    def busiest() -> int | None:
        rows = conn.execute(
            "SELECT worker, count(*) AS n FROM taskrunner.delivery WHERE status = 'in_flight'"
            " GROUP BY worker ORDER BY n DESC"
        ).fetchall()
        live = [int(r["worker"].rsplit(":", 1)[1]) for r in rows]
        return next((pid for pid in live if pid in pids), None)

    return wait_for(busiest, 30, message="deliveries in flight")


def test_kill_9_api_process_mid_request(db_url, conn, tmp_path):
    """Clients create 10-task batches in a loop while an API process is SIGKILLed twice.
    A request cut short may or may not have committed -- but a batch is all or nothing,
    every acknowledged one exists, and the master replaces the dead process by itself."""
    sink = Sink()
    acked: list[str] = []
    cut = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while not stop.is_set():
                batch = [
                    {
                        "id": f"t{i}",
                        "name": f"t{i}",
                        "kind": "api-kill",
                        "on_start": hook(f"{sink.url}/start"),
                        "dependencies": [{"id": f"t{i - 1}", "requires_success": True}]
                        if i
                        else [],
                    }
                    for i in range(10)
                ]
                try:
                    resp = c.post(f"{base}/task", json=batch)
                except httpx.TransportError as exc:
                    cut[type(exc).__name__] += 1
                    continue
                assert resp.status_code == 201, resp.text
                acked.append(resp.headers["X-Batch-ID"])

    kills = 0
    try:
        with service(db_url, tmp_path, API_PROCESSES="2") as svc:
            api, base = svc.api, svc.base
            wait_for(lambda: len(children(api.pid)) == 2, 30, message="2 API processes")
            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                for _ in range(2):
                    before = len(acked)
                    wait_for(lambda b=before: len(acked) > b + 5, 30, message="requests")
                    victim = children(api.pid)[0]
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    wait_for(
                        lambda v=victim: len(children(api.pid)) == 2 and v not in children(api.pid),
                        30,
                        message="gunicorn to replace the killed process",
                    )
                after = len(acked)
                wait_for(lambda: len(acked) > after + 5, 30, message="requests after the kills")
            finally:
                stop.set()
                for t in threads:
                    t.join()
            wait_for(lambda: _all_ended(conn), 120, interval=0.2, message="every task to end")
    finally:
        sink.close()

    sizes = conn.execute(
        "SELECT batch_id::text, count(*) AS n FROM taskrunner.task GROUP BY batch_id"
    ).fetchall()
    by_batch = {r["batch_id"]: r["n"] for r in sizes}
    assert set(acked) <= set(by_batch), "an acknowledged batch is missing"
    assert all(n == 10 for n in by_batch.values()), f"a partial batch: {by_batch}"
    assert len(by_batch) <= len(acked) + sum(cut.values())
    assert count(conn, "SELECT count(*) AS n FROM taskrunner.task WHERE status <> 'success'") == 0
    assert_no_double_start(conn)
    assert_deliveries_settled(conn, sink.received())
    assert_history_consistent(conn)
    print(
        f"\nAPI kills: {kills} kills, {len(acked)} batches acknowledged, {dict(cut)} cut "
        f"short, {len(by_batch)} in the database, {10 * len(by_batch)} tasks all succeeded"
    )


FAULTS = {
    # path: (how the target behaves, the error recorded for each attempt)
    "/down": (None, "connection refused"),
    "/slow": (Reply(delay=3, report=False), "timeout"),
    "/5xx": (Reply(status=503), "HTTP 503"),
    "/close": (Reply(close=True), "RemoteProtocolError"),
}


def test_webhook_targets_down_slow_5xx_or_closing(db_url, conn, tmp_path):
    """Each fault, for a start and for an end webhook: every attempt is made and recorded
    with its error, the delivery gives up after WEBHOOK_MAX_ATTEMPTS, a start that gave up
    fails its task (its on_failure still delivered), an end that gave up is visible as
    failed -- and healthy tasks run beside them untouched."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        settings = {
            "WEBHOOK_TIMEOUT": "2",
            "WEBHOOK_MAX_ATTEMPTS": "3",
            "WEBHOOK_BACKOFF_BASE": "0.05",
            "WEBHOOK_BACKOFF_MAX": "0.2",
        }
        sink = Sink(respond=lambda req: FAULTS.get(req["path"], (Reply(),))[0] or Reply())

        def url(path: str) -> str:
            return f"{down}{path}" if path == "/down" else f"{sink.url}{path}"

        batch = []
        for path in FAULTS:
            name = path.strip("/")
            batch.append(
                {
                    "id": f"start-{name}",
                    "name": path,
                    "kind": "fault",
                    "on_start": hook(url(path)),
                    "on_failure": [hook(f"{sink.url}/failed")],
                }
            )
            batch.append(
                {
                    "id": f"end-{name}",
                    "name": path,
                    "kind": "fault",
                    "on_start": hook(f"{sink.url}/ok"),
                    "on_success": [hook(url(path))],
                }
            )
        batch.append(
            {
                "id": "healthy",
                "name": "healthy",
                "kind": "fault",
                "on_start": hook(f"{sink.url}/ok"),
                "on_success": [hook(f"{sink.url}/done")],
            }
        )
        try:
            with service(db_url, tmp_path, **settings) as svc:
                ids = local_ids(svc.post(batch))
                wait_for(lambda: _all_ended(conn), 60, interval=0.2, message="every task to end")
                details = {k: httpx.get(f"{svc.base}/task/{v}").json() for k, v in ids.items()}
        finally:
            sink.close()

    expected = {ids["healthy"]: "success"}
    for path in FAULTS:
        expected[ids[f"start-{path.strip('/')}"]] = "failure"
        expected[ids[f"end-{path.strip('/')}"]] = "success"
    assert_final_states(conn, expected)
    settled = assert_deliveries_settled(conn, sink.received())
    for path, (_, error) in FAULTS.items():
        name = path.strip("/")
        start = details[f"start-{name}"]
        (delivery,) = start["on_start"]["deliveries"]
        assert delivery["status"] == "Failed"
        assert [a["attempt"] for a in delivery["attempts"]] == [1, 2, 3]
        errors = [a["error"] for a in delivery["attempts"]]
        assert all(error in e for e in errors), (path, errors)
        assert start["failure_reason"].startswith("start webhook failed: ")
        (on_failure,) = start["on_failure"]
        assert on_failure["deliveries"][0]["status"] == "Delivered"
        end = details[f"end-{name}"]
        (on_success,) = end["on_success"]
        (delivery,) = on_success["deliveries"]
        assert delivery["status"] == "Failed" and delivery["attempt_count"] == 3
        assert all(error in a["error"] for a in delivery["attempts"])
    problems = count(
        conn, "SELECT count(*) AS n FROM taskrunner.delivery_problems WHERE status = 'failed'"
    )
    assert problems == 2 * len(FAULTS)
    assert_history_consistent(conn)
    print(f"\ntarget faults: {len(FAULTS)} kinds x (start, end), {settled}")


def test_api_reruns_a_transaction_postgres_chose_as_deadlock_victim(db_url, conn):
    """A completion whose propagation deadlocks with another transaction is run again
    (it was rolled back whole), not answered with a 503. The deadlock is made on purpose:
    PATCH(A) holds A and waits for child B; another session holds B and asks for A."""
    tasks = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    a, b = tasks["a"]["id"], tasks["b"]["id"]
    conn.execute("SELECT * FROM taskrunner.claim_tasks('w', 1, 60)")
    pool = db.create_pool(db_url, max_size=2)
    pool.open(wait=True)
    result: dict = {}

    def patch_a() -> None:
        params = {
            "id": a,
            "status": "success",
            "new_success": None,
            "new_failures": None,
            "metadata": None,
            "failure_reason": None,
            "retryable": None,
            "expected_count": None,
            "priority": None,
        }
        try:
            result["row"] = Store(pool).call("update_task", params)[0]
        except Exception as exc:  # reported below
            result["error"] = exc

    try:
        with db.connect(db_url) as other:
            # only PATCH(A)'s backend may run the deadlock check: on a loaded machine the
            # two checks (deadlock_timeout after each began to wait) could otherwise race
            other.execute("SET deadlock_timeout = '60s'")
            with other.transaction():
                other.execute("SELECT 1 FROM taskrunner.task WHERE id = %s FOR UPDATE", (b,))
                thread = threading.Thread(target=patch_a)
                thread.start()
                wait_for(
                    lambda: (
                        count(
                            conn,
                            "SELECT count(*) AS n FROM pg_stat_activity"
                            " WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        )
                        == 1
                    ),
                    10,
                    message="PATCH(A) to wait for B",
                )
                # closes the cycle; PATCH(A)'s backend detects the deadlock (its
                # deadlock_timeout, 1 s, is the only short one) and is the one rolled back
                other.execute("SELECT 1 FROM taskrunner.task WHERE id = %s FOR UPDATE", (a,))
            thread.join(30)
    finally:
        pool.close()

    assert "error" not in result, result.get("error")
    assert result["row"]["status"] == "success"
    assert (
        conn.execute("SELECT status::text FROM taskrunner.task WHERE id = %s", (b,)).fetchone()[
            "status"
        ]
        == "pending"
    )
    assert_history_consistent(conn)
