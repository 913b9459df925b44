"""Capacity and RateLimit rules end to end: the API under gunicorn, 4 worker processes and a
webhook sink, checked from the database's records (task_history, rate_start); and capacity
freed by progress (PUT /task) wakes a worker at once, not at the next poll."""

from __future__ import annotations

import random
import threading
import time

import httpx
from invariants import assert_capacity_respected, assert_history_consistent, assert_rate_respected
from procs import Sink, service, wait_for

CAPACITY = 10
RATE, WINDOW = 3, 1


def _task(sink: Sink, local_id: str, kind: str, rule: dict, tenant: int, **extra) -> dict:
    return {
        "id": local_id,
        "name": local_id,
        "kind": kind,
        "metadata": {"tenant": tenant},
        "rules": [rule],
        "on_start": {"kind": "Webhook", "params": {"url": f"{sink.url}/start", "verb": "Post"}},
        **extra,
    }


def _open_tasks(conn) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task WHERE NOT taskrunner.is_terminal(status)"
    ).fetchone()["n"]


def test_capacity_and_rate_limit_exact_with_4_workers(db_url, conn, tmp_path):
    client = httpx.Client(timeout=30)
    expected: dict[str, int] = {}

    def on_start(req: dict) -> None:
        # hold the task a moment, then report all its work and the outcome at once (so a
        # running task's remaining work is its expected count until it ends)
        time.sleep(random.uniform(0.05, 0.15))
        task_id = req["headers"]["x-task-id"]
        body = {"status": "Success", "new_success": expected.get(task_id, 0)}
        assert client.patch(req["query"]["handle"][0], json=body).status_code == 200

    sink = Sink(on_start=on_start)
    capacity = {
        "Capacity": {
            "matcher": {"kind": "cap", "status": "Running", "fields": ["tenant"]},
            "max_capacity": CAPACITY,
        }
    }
    rate = {
        "type": "RateLimit",
        "matcher": {"kind": "lim", "fields": ["tenant"]},
        "max_starts": RATE,
        "per_seconds": WINDOW,
    }
    tasks = [
        _task(sink, f"c{i}", "cap", capacity, i % 2, expected_count=i % 4 + 2) for i in range(24)
    ]
    tasks += [_task(sink, f"r{i}", "lim", rate, i % 2) for i in range(8)]
    try:
        with service(
            db_url, tmp_path, worker_processes=4, POLL_INTERVAL="0.2", WORKER_CONCURRENCY="8"
        ) as svc:
            created = svc.post(tasks).json()
            expected.update({t["id"]: t["expected_count"] or 0 for t in created})
            wait_for(lambda: _open_tasks(conn) == 0, 90, interval=0.2, message="every task to end")
    finally:
        sink.close()
        client.close()
    ok = conn.execute("SELECT count(*) AS n FROM taskrunner.task WHERE status = 'success'")
    assert ok.fetchone()["n"] == len(tasks)
    peak = assert_capacity_respected(conn, "cap", "tenant", CAPACITY)
    most = assert_rate_respected(conn, "lim", RATE, WINDOW)
    assert_history_consistent(conn)
    assert peak >= CAPACITY - 5 and most == RATE  # the workers did press on both limits


def test_progress_that_frees_capacity_wakes_a_worker(db_url, conn, tmp_path):
    """B waits for A's remaining work; A reports all of it with PUT /task and only ends
    2 s later. With polls and ticks 30 s apart, B starts before A ends only if the flushed
    counters woke a worker (NOTIFY)."""
    client = httpx.Client(timeout=30)
    a_reported = threading.Event()

    def on_start(req: dict) -> None:
        handle = req["query"]["handle"][0]
        if req["body"]["name"] == "a":
            time.sleep(0.5)  # after the start's own wake-ups have passed
            task_id = req["headers"]["x-task-id"]
            resp = client.put(
                f"{handle.rsplit('/task/', 1)[0]}/task/{task_id}", json={"new_success": 10}
            )
            assert resp.status_code == 202
            a_reported.set()
            time.sleep(2)
        assert client.patch(handle, json={"status": "Success"}).status_code == 200

    sink = Sink(on_start=on_start)
    rule = {"Capacity": {"matcher": {"kind": "k", "status": "Running"}, "max_capacity": 10}}

    def task(name: str) -> dict:
        start = {"url": f"{sink.url}/start", "verb": "Post", "body": {"name": name}}
        return {
            "id": name,
            "name": name,
            "kind": "k",
            "expected_count": 10,
            "rules": [rule],
            "on_start": {"kind": "Webhook", "params": start},
        }

    try:
        with service(
            db_url, tmp_path, worker_processes=1, POLL_INTERVAL="30", TICK_INTERVAL="30"
        ) as svc:
            ids = {t["local_id"]: t["id"] for t in svc.post([task("a")]).json()}
            wait_for(lambda: sink.starts(), 10, message="a to start")
            ids |= {t["local_id"]: t["id"] for t in svc.post([task("b")]).json()}
            wait_for(lambda: _open_tasks(conn) == 0, 20, message="both to end")
    finally:
        sink.close()
        client.close()
    assert a_reported.is_set()
    at = {
        (str(r["task_id"]), r["to_status"]): r["at"]
        for r in conn.execute(
            "SELECT task_id, to_status::text, at FROM taskrunner.task_history"
        ).fetchall()
    }
    assert at[(ids["b"], "running")] < at[(ids["a"], "success")]
