"""``python -m bench.batches``: the batch routes' SQL with 10,000 batches (docs/performance.md).

Creates 10,000 batches of 5 tasks in a fresh database, leaves some claims unfolded, then
times (median of 20 runs) each ``GET /batches`` / ``GET /batch/{id}`` query as the API runs
it, next to the GROUP BY over every task that a table-less design would need
(``batch_progress``). Then the cost the counts add to the hot path: 3,000 claim → start →
complete cycles on one connection with the batch-count triggers enabled, then disabled.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from bench.env import connect, fresh_database
from taskrunner.db import QUERIES

BATCHES = 10_000
PER_BATCH = 5
RUNS = 20
CYCLES = 3000
LIST = {
    "kind": None,
    "status": None,
    "name": None,
    "created_after": None,
    "created_before": None,
    "limit": 50,
    "offset": 0,
}


def _create(conn: Any) -> None:
    """BATCHES batches of PER_BATCH pending tasks, inserted directly (the triggers that keep
    the counts run as for create_batch; webhooks are not needed to list batches)."""
    conn.execute(
        "INSERT INTO taskrunner.task (batch_id, local_id, name, kind, status, admission_key) "
        "SELECT b.id, t::text, 'task ' || t, 'kind' || t, 'pending', "
        "       taskrunner._admission_key('kind' || t, 0, '[]', '{}') "
        "FROM (SELECT gen_random_uuid() AS id, g FROM generate_series(1, %s) g) b, "
        "     generate_series(0, %s - 1) t ORDER BY b.g, t",
        (BATCHES, PER_BATCH),
    )
    conn.execute("ANALYZE")


def _median_ms(conn: Any, sql: str, params: dict) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        conn.execute(sql, params).fetchall()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def _reads(conn: Any) -> dict:
    some_batch = conn.execute("SELECT batch_id FROM taskrunner.batch LIMIT 1").fetchone()
    cases = {
        "GET /batches (newest 50)": (QUERIES["list_batches"], LIST),
        "GET /batches page 100": (QUERIES["list_batches"], {**LIST, "offset": 5000}),
        "GET /batches status=claimed": (QUERIES["list_batches"], {**LIST, "status": "claimed"}),
        "GET /batches kind=kind3": (QUERIES["list_batches"], {**LIST, "kind": "kind3"}),
        "GET /batches name=task 4": (QUERIES["list_batches"], {**LIST, "name": "task 4"}),
        "GET /batch/{id}": (QUERIES["get_batch"], {"id": some_batch["batch_id"]}),
        "GROUP BY every task (batch_progress, newest 50)": (
            "SELECT * FROM taskrunner.batch_progress ORDER BY created_at DESC LIMIT 50",
            {},
        ),
    }
    return {name: _median_ms(conn, sql, params) for name, (sql, params) in cases.items()}


def _cycles(conn: Any, n: int) -> float:
    """Tasks/s through claim -> start acknowledged -> success, 10 tasks per claim."""
    spec = [
        {
            "local_id": str(i),
            "name": f"c {i}",
            "kind": "cycle",
            "priority": 1000,  # claimed before the listed batches' tasks
            "actions": [{"event": "start", "url": "http://127.0.0.1:9/hook", "verb": "POST"}],
        }
        for i in range(n)
    ]
    conn.execute("SELECT count(*) FROM taskrunner.create_batch(%s::jsonb)", (json.dumps(spec),))
    start = time.perf_counter()
    while items := conn.execute(
        QUERIES["claim_tasks"], {"worker": "b", "max": 10, "lease_seconds": 60}
    ).fetchall():
        results = [{"delivery_id": str(r["delivery_id"]), "ok": True} for r in items]
        conn.execute(QUERIES["finish_deliveries"], {"worker": "b", "results": json.dumps(results)})
        done = [{"task_id": str(r["task_id"]), "status": "success"} for r in items]
        conn.execute("SELECT * FROM taskrunner.complete_tasks(%s::jsonb)", (json.dumps(done),))
    return round(n / (time.perf_counter() - start), 1)


def main() -> None:
    with fresh_database() as url, connect(url) as conn:
        started = time.perf_counter()
        _create(conn)
        print(f"created {BATCHES} batches of {PER_BATCH} in {time.perf_counter() - started:.1f} s")
        conn.execute(QUERIES["claim_tasks"], {"worker": "w", "max": 500, "lease_seconds": 60})
        deltas = conn.execute("SELECT count(*) AS n FROM taskrunner.batch_delta").fetchone()["n"]
        print(f"reads, {deltas} deltas unfolded:", json.dumps(_reads(conn), indent=1))
        conn.execute("SELECT taskrunner.fold_batch_deltas()")
        print("reads, folded:", json.dumps(_reads(conn), indent=1))
        on = _cycles(conn, CYCLES)
        conn.execute("ALTER TABLE taskrunner.task DISABLE TRIGGER _500_batch_counts_update")
        off = _cycles(conn, CYCLES)
        conn.execute("ALTER TABLE taskrunner.task ENABLE TRIGGER _500_batch_counts_update")
        print(f"claim->start->success tasks/s: counts on {on}, counts off {off}")


if __name__ == "__main__":
    main()
