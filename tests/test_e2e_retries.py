"""Task retries and delayed start end to end: the API and two worker processes, a real
target that fails a task twice (its start webhook answers 500, then it reports Failure)
before it succeeds; the history in the database shows every run.

Polls and ticks are set to a minute, so only the workers' timer (``next_wakeup()``) can
start a task whose backoff or delay runs out while nothing else happens."""

from __future__ import annotations

import statistics

import httpx
import pytest
from procs import Reply, Sink, hook, service, wait_for

pytestmark = pytest.mark.slow

RETRY = {"max_attempts": 3, "backoff_seconds": 0.2, "backoff_max_seconds": 0.5}


def _task(sink: Sink, local_id: str, **extra) -> dict:
    return {
        "id": local_id,
        "name": local_id,
        "kind": "flaky",
        "on_start": hook(f"{sink.url}/start/{local_id}"),
        "on_failure": [hook(f"{sink.url}/failed/{local_id}")],
        **extra,
    }


def _on(parent: str) -> list[dict]:
    return [{"id": parent, "requires_success": True}]


def _paths(sink: Sink, path: str) -> list[dict]:
    with sink.lock:
        return [r for r in sink.requests if r["path"] == path]


def _history(conn, local_id: str) -> list[tuple]:
    return [
        (r["from_status"], r["to_status"], r["reason"])
        for r in conn.execute(
            "SELECT h.from_status::text, h.to_status::text, h.reason"
            " FROM taskrunner.task_history h JOIN taskrunner.task t ON t.id = h.task_id"
            " WHERE t.local_id = %s ORDER BY h.id",
            (local_id,),
        ).fetchall()
    ]


def test_a_task_that_fails_twice_then_succeeds_and_delayed_starts(db_url, conn, tmp_path):
    def respond(req: dict) -> Reply:
        if req["path"] == "/start/flaky" and len(_paths(sink, "/start/flaky")) == 1:
            return Reply(status=500)  # run 1: the start webhook fails
        return Reply()

    def on_start(req: dict) -> None:
        run_2 = req["path"] == "/start/flaky" and len(_paths(sink, "/start/flaky")) == 2
        failing = run_2 or req["path"] == "/start/doomed"
        sink.complete(req, "Failure" if failing else "Success")

    sink = Sink(on_start=on_start, respond=respond)
    settings = {"POLL_INTERVAL": "60", "TICK_INTERVAL": "60", "WEBHOOK_MAX_ATTEMPTS": "1"}
    try:
        with service(db_url, tmp_path, worker_processes=2, **settings) as svc:
            svc.post(
                [
                    _task(sink, "flaky", retry=RETRY),
                    _task(sink, "after", dependencies=_on("flaky")),
                    _task(sink, "doomed", retry={**RETRY, "max_attempts": 2}),
                    _task(sink, "doomed-child", dependencies=_on("doomed")),
                ]
            )

            def ended() -> bool:
                row = conn.execute(
                    "SELECT count(*) AS n FROM taskrunner.task"
                    " WHERE status IN ('success', 'failure')"
                ).fetchone()
                return row["n"] == 4

            wait_for(ended, 30, message="the flaky and doomed tasks to end")
            wait_for(lambda: _paths(sink, "/failed/doomed"), 10, message="doomed's on_failure")

            # delayed starts, posted while nothing else happens
            delays = svc.post(
                [_task(sink, f"delayed{i}", delay_seconds=1.5) for i in range(4)]
            ).json()
            assert all(t["status"] == "Pending" and t["not_before"] for t in delays)

            def delayed_done() -> bool:
                return all(_paths(sink, f"/start/delayed{i}") for i in range(4))

            wait_for(delayed_done, 20, message="the delayed tasks to start (timer path)")
            metrics = httpx.get(f"{svc.base}/metrics").text
    finally:
        sink.close()

    rows = {
        r["local_id"]: r
        for r in conn.execute(
            "SELECT local_id, status::text, attempt, failure_reason FROM taskrunner.task"
        ).fetchall()
    }
    assert (rows["flaky"]["status"], rows["flaky"]["attempt"]) == ("success", 3)
    assert rows["after"]["status"] == "success"
    assert (rows["doomed"]["status"], rows["doomed"]["attempt"]) == ("failure", 2)
    assert rows["doomed-child"]["status"] == "failure"

    flaky = _history(conn, "flaky")
    assert [(f, t) for f, t, _ in flaky] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "pending"),
        ("pending", "running"),
        ("running", "pending"),
        ("pending", "running"),
        ("running", "success"),
    ]
    assert flaky[2][2].startswith("retry 1 of 2 in ")
    assert "start webhook failed: HTTP 500" in flaky[2][2]
    assert flaky[3][2].endswith("(run 2 of 3)")
    assert flaky[4][2].startswith("retry 2 of 2 in ") and flaky[4][2].endswith("sink says no")
    # the child waited through the retries: pending only after flaky's success
    after = _history(conn, "after")
    assert [(f, t) for f, t, _ in after][:2] == [(None, "waiting"), ("waiting", "pending")]
    assert len(_paths(sink, "/start/flaky")) == 3 and len(_paths(sink, "/start/after")) == 1
    # no on_failure for the retried runs, one for doomed's last
    assert _paths(sink, "/failed/flaky") == [] and len(_paths(sink, "/failed/doomed")) == 1
    # every run has its own start delivery (and so its own Idempotency-Key)
    keys = {r["headers"]["idempotency-key"] for r in _paths(sink, "/start/flaky")}
    assert len(keys) == 3
    assert 'task_retries_total{kind="flaky"} 3.0' in metrics

    lateness = [
        r["late"]
        for r in conn.execute(
            "SELECT extract(epoch FROM claimed_at - (created_at + interval '1.5 s')) AS late"
            " FROM taskrunner.task WHERE local_id LIKE 'delayed%'"
        ).fetchall()
    ]
    assert all(late >= 0 for late in lateness)  # never early
    print(f"delayed start lateness (claimed_at - not_before), s: {sorted(lateness)}")
    print(f"median: {statistics.median(lateness):.4f} s")
