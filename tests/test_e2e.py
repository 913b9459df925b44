"""End to end: real gunicorn and worker subprocesses, a real webhook sink, one database."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from invariants import assert_rule_respected
from procs import TASKRUNNER, Reply, Sink, count, hook, local_ids, service, wait_for

pytestmark = pytest.mark.slow


def _task(sink: Sink, local_id: str, deps=(), **extra) -> dict:
    return {
        "id": local_id,
        "name": local_id,
        "kind": extra.pop("kind", "etl"),
        "on_start": hook(f"{sink.url}/start/{local_id}"),
        "on_success": [hook(f"{sink.url}/done/{local_id}")],
        "dependencies": [{"id": d, "requires_success": True} for d in deps],
        **extra,
    }


def test_dag_runs_to_completion_through_real_processes(db_url, conn, tmp_path):
    sink = Sink()
    try:
        with service(db_url, tmp_path) as svc:
            base = svc.base
            dag = [
                _task(sink, "ingest-a"),
                _task(sink, "ingest-b"),
                _task(sink, "cluster", ["ingest-a", "ingest-b"]),
                _task(sink, "report", ["cluster"]),
                _task(sink, "notify", ["report"]),
            ]
            batch = svc.post(dag, headers={"X-Requester": "e2e"}).headers["X-Batch-ID"]

            def all_done():
                r = httpx.get(f"{base}/task", params={"batch_id": batch})
                return all(t["status"] == "Success" for t in r.json()) and r.json()

            tasks = wait_for(all_done, 60, message="the DAG to finish")
            assert len(tasks) == 5
            wait_for(
                lambda: len([r for r in sink.requests if r["path"].startswith("/done/")]) == 5,
                30,
                message="on_success webhooks",
            )
            metrics = httpx.get(f"{base}/metrics").text
    finally:
        sink.close()

    order = [r["path"] for r in sink.starts()]
    assert order.index("/start/cluster") > max(
        order.index("/start/ingest-a"), order.index("/start/ingest-b")
    )
    assert order.index("/start/report") > order.index("/start/cluster")
    assert order.index("/start/notify") > order.index("/start/report")
    assert len(order) == 5  # each start fired once
    # the API's /metrics includes the workers' metrics (shared multiprocess directory)
    assert "worker_loop_duration_seconds_count" in metrics
    assert 'tasks_completed_total{kind="etl",outcome="success"} 5.0' in metrics
    hist = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history WHERE to_status = 'success'"
    ).fetchone()["n"]
    assert hist == 5


def test_max_one_rule_with_four_worker_processes(db_url, conn, tmp_path):
    sink = Sink()
    rule = {
        "Concurency": {
            "matcher": {"kind": "exclusive", "status": "Running", "fields": []},
            "max_concurency": 1,
        }
    }
    n = 40
    try:
        settings = {"WORKER_CONCURRENCY": "8", "API_PROCESSES": "2"}
        with service(db_url, tmp_path, worker_processes=4, **settings) as svc:
            svc.post([_task(sink, f"x{i}", kind="exclusive", rules=[rule]) for i in range(n)])

            def finished():
                row = conn.execute(
                    "SELECT count(*) AS n FROM taskrunner.task WHERE status = 'success'"
                ).fetchone()
                return row["n"] == n

            wait_for(finished, 120, message="all exclusive tasks to succeed")
    finally:
        sink.close()

    peaks = assert_rule_respected(conn, "exclusive", [], 1)
    assert peaks == {(): 1}
    workers = conn.execute(
        "SELECT count(DISTINCT claimed_by) AS n FROM taskrunner.task"
    ).fetchone()["n"]
    assert workers >= 2, "the claims should have been spread over several worker processes"


def test_dead_end_cancellation_through_real_processes(db_url, conn, tmp_path):
    """DEAD_END_CANCEL=true through `taskrunner migrate`; then a running task whose only
    child is canceled is a dead end: canceled, and a worker fires its cancel webhook."""
    sink = Sink()
    cancel_action = hook(f"{sink.url}/stop/p")
    sink.respond = lambda req: (
        Reply(body=cancel_action, report=False) if req["path"] == "/start/p" else Reply()
    )
    try:
        with service(db_url, tmp_path, worker_processes=1) as svc:
            migrate = subprocess.run(
                [*TASKRUNNER, "migrate"],
                env={**svc.env, "DEAD_END_CANCEL": "true"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert migrate.returncode == 0, migrate.stderr
            assert "dead-end cancellation on (DEAD_END_CANCEL)" in migrate.stdout
            ids = local_ids(svc.post([_task(sink, "p"), _task(sink, "c", ["p"])]))
            wait_for(
                lambda: count(
                    conn,
                    "SELECT count(*) AS n FROM taskrunner.task WHERE id = %s "
                    "AND started_at IS NOT NULL",
                    ids["p"],
                ),
                30,
                message="p to start (its cancel action registered)",
            )
            assert httpx.delete(f"{svc.base}/task/{ids['c']}").status_code == 200
            wait_for(
                lambda: any(r["path"] == "/stop/p" for r in sink.requests),
                30,
                message="the dead end's cancel webhook",
            )
            p = httpx.get(f"{svc.base}/task/{ids['p']}").json()
    finally:
        sink.close()
    assert p["status"] == "Canceled"
    assert p["status_reason"] == "dead end: every child task has ended"


def test_rerun_of_a_failed_task_completes_the_dag(db_url, conn, tmp_path):
    """a fails on its first run (its target reports Failure), which fails b and c; d runs
    on. POST /task/{a}/rerun: a runs again and succeeds, and b and c follow."""
    runs: list[str] = []

    def first_run_fails(req: dict) -> None:
        runs.append(req["path"])
        flaky_first = req["path"] == "/start/a" and runs.count("/start/a") == 1
        sink.complete(req, "Failure" if flaky_first else "Success")

    sink = Sink(on_start=first_run_fails)
    try:
        with service(db_url, tmp_path) as svc:
            dag = [
                _task(sink, "a", on_failure=[hook(f"{sink.url}/failed/a")]),
                _task(sink, "b", ["a"]),
                _task(sink, "c", ["b"]),
                _task(sink, "d"),
            ]
            created = svc.post(dag).json()
            ids = {t["local_id"]: t["id"] for t in created}

            def statuses() -> dict[str, str]:
                r = httpx.get(f"{svc.base}/task", params={"batch_id": created[0]["batch_id"]})
                return {t["local_id"]: t["status"] for t in r.json()}

            first = {"a": "Failure", "b": "Failure", "c": "Failure", "d": "Success"}
            wait_for(lambda: statuses() == first, 60, message="a to fail, and b and c with it")

            rerun = httpx.post(f"{svc.base}/task/{ids['a']}/rerun")
            assert rerun.status_code == 200, rerun.text
            assert [t["id"] for t in rerun.json()["downstream"]] == sorted([ids["b"], ids["c"]])

            done = dict.fromkeys("abcd", "Success")
            wait_for(lambda: statuses() == done, 60, message="the DAG to finish after the rerun")
            wait_for(
                lambda: len([r for r in sink.requests if r["path"] == "/done/c"]) == 1,
                30,
                message="c's on_success webhook",
            )
            history = httpx.get(f"{svc.base}/task/{ids['a']}/history").json()
    finally:
        sink.close()

    assert [(h["from"], h["to"]) for h in history] == [
        (None, "Pending"),
        ("Pending", "Running"),
        ("Running", "Failure"),
        ("Failure", "Pending"),
        ("Pending", "Running"),
        ("Running", "Success"),
    ]
    assert history[3]["reason"].startswith("rerun by taskrunner-api")
    starts = [r for r in sink.starts() if r["path"] == "/start/a"]
    keys = {r["headers"]["idempotency-key"] for r in starts}
    assert len(starts) == 2 and len(keys) == 2  # the new run's start is a new delivery
    paths = [r["path"] for r in sink.requests]
    assert paths.count("/failed/a") == 1 and paths.count("/done/a") == 1
    assert sorted(runs) == sorted(["/start/a", "/start/a", "/start/b", "/start/c", "/start/d"])
    # b's and c's history: failed by the cascade, back to waiting, then one run each
    rows = conn.execute(
        "SELECT t.local_id, h.from_status::text, h.to_status::text FROM taskrunner.task_history h"
        " JOIN taskrunner.task t ON t.id = h.task_id WHERE t.local_id = 'c' ORDER BY h.id"
    ).fetchall()
    assert [(r["from_status"], r["to_status"]) for r in rows] == [
        (None, "waiting"),
        ("waiting", "failure"),
        ("failure", "waiting"),
        ("waiting", "pending"),
        ("pending", "running"),
        ("running", "success"),
    ]
