"""``python -m bench.retention``: retention's cost (docs/performance.md, "Retention").

Builds 100 batches of 1,000 tasks that ended 40 days ago, each with the rows a real run
leaves (start and success actions, their deliveries and attempts, a chain of dependencies,
four history rows), plus pending tasks for claims. Then:

1. claims (``claim_tasks``, one task per call, one connection) for a while without a
   purge, while the workers' purge (``purge_finished('30 days')``, chunks of
   ``CHUNK`` tasks, one transaction each) deletes all 100,000 tasks, and without a purge
   again: latency percentiles and claims/s of each phase, from the same run;
2. the same purge alone with the history index ``task_history_task_idx``, and
   ``EXPLAIN (ANALYZE, BUFFERS)`` of one chunk's history delete with and without it
   (without it, that one statement is the measurement: each chunk reads the whole history,
   so the whole purge would take hours).

Usage: ``python -m bench.retention [--tasks N] [--chunk N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
from typing import Any

from bench.env import connect, fresh_database
from taskrunner.db import QUERIES

PER_BATCH = 1_000


def _create_ended(conn: Any, tasks: int) -> None:
    """``tasks`` tasks in batches of PER_BATCH, run to success the way the state machine
    records it (the triggers write history and queue the webhooks), then aged 40 days."""
    batches = max(1, tasks // PER_BATCH)
    conn.execute(
        "INSERT INTO taskrunner.task (batch_id, local_id, name, kind, status, admission_key) "
        "SELECT b.id, t::text, 'task ' || t, 'old', 'pending', "
        "       taskrunner._admission_key('old', 0, '[]', '{}') "
        "FROM (SELECT gen_random_uuid() AS id, g FROM generate_series(1, %s) g) b, "
        "     generate_series(0, %s - 1) t ORDER BY b.g, t",
        (batches, PER_BATCH),
    )
    conn.execute(
        "INSERT INTO taskrunner.action (task_id, event, url, verb) "
        "SELECT id, e::taskrunner.action_event, 'http://127.0.0.1:9/hook', 'POST' "
        "FROM taskrunner.task, unnest(ARRAY['start', 'success']) e WHERE kind = 'old'"
    )
    for status in ("running", "success"):
        conn.execute(f"UPDATE taskrunner.task SET status = '{status}' WHERE kind = 'old'")
    conn.execute(
        "UPDATE taskrunner.delivery SET status = 'delivered', attempts = 1, finished_at = now()"
    )
    conn.execute(
        "INSERT INTO taskrunner.delivery_attempt (delivery_id, attempt, worker, status_code) "
        "SELECT id, 1, 'bench', 200 FROM taskrunner.delivery ON CONFLICT DO NOTHING"
    )
    conn.execute(  # a chain through each batch (added after the ends: nothing to propagate)
        "INSERT INTO taskrunner.dependency (parent_id, child_id, requires_success) "
        "SELECT parent, id, true FROM (SELECT lag(id) OVER w AS parent, id"
        "  FROM taskrunner.task WHERE kind = 'old'"
        "  WINDOW w AS (PARTITION BY batch_id ORDER BY seq)) c WHERE parent IS NOT NULL"
    )
    conn.execute(
        "UPDATE taskrunner.task SET created_at = created_at - interval '40 days',"
        " ended_at = ended_at - interval '40 days' WHERE kind = 'old'"
    )
    conn.execute("SELECT taskrunner.fold_batch_deltas()")
    conn.execute("UPDATE taskrunner.batch SET first_created_at = now() - interval '40 days'")


def _create_pending(conn: Any, n: int) -> None:
    spec = [
        {
            "local_id": str(i),
            "name": f"live {i}",
            "kind": "live",
            "actions": [{"event": "start", "url": "http://127.0.0.1:9/hook", "verb": "POST"}],
        }
        for i in range(n)
    ]
    conn.execute("SELECT count(*) FROM taskrunner.create_batch(%s::jsonb)", (json.dumps(spec),))


def _counts(conn: Any) -> dict:
    tables = ["task", "dependency", "action", "delivery", "delivery_attempt", "task_history"]
    return {
        t: conn.execute(f"SELECT count(*) AS n FROM taskrunner.{t}").fetchone()["n"] for t in tables
    }


def _claims(url: str, until: threading.Event | float) -> dict:
    """Claim one task per call until ``until`` (a deadline, or an event that is set)."""
    params = {"worker": "bench", "max": 1, "lease_seconds": 3600}
    times = []
    with connect(url) as conn:
        start = time.perf_counter()
        while not (until.is_set() if isinstance(until, threading.Event) else time.time() > until):
            t0 = time.perf_counter()
            if not conn.execute(QUERIES["claim_tasks"], params).fetchall():
                raise RuntimeError("no pending task left to claim: raise the backlog")
            times.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
    ordered = sorted(times)
    return {
        "claims": len(times),
        "claims_per_s": round(len(times) / elapsed, 1),
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def _purge(url: str, chunk: int, most: int | None = None) -> dict:
    """Call purge_finished, one transaction per chunk, until nothing is left (or for
    ``most`` chunks)."""
    chunks, tasks = [], 0
    with connect(url) as conn:
        start = time.perf_counter()
        while most is None or len(chunks) < most:
            t0 = time.perf_counter()
            row = conn.execute(
                "SELECT * FROM taskrunner.purge_finished('30 days', %s)", (chunk,)
            ).fetchone()
            if not row["tasks"]:
                break
            chunks.append((time.perf_counter() - t0) * 1000)
            tasks += row["tasks"]
        elapsed = time.perf_counter() - start
    return {
        "tasks": tasks,
        "seconds": round(elapsed, 2),
        "tasks_per_s": round(tasks / elapsed),
        "chunk_median_ms": round(statistics.median(chunks), 1),
        "chunk_max_ms": round(max(chunks), 1),
    }


def _explain_history_delete(conn: Any, chunk: int) -> str:
    ids = [
        r["id"]
        for r in conn.execute(
            "SELECT id FROM taskrunner.task WHERE kind = 'old' ORDER BY seq LIMIT %s", (chunk,)
        )
    ]
    conn.execute("BEGIN")
    try:
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM taskrunner.task_history"
            " WHERE task_id = ANY(%s)",
            (ids,),
        ).fetchall()
    finally:
        conn.execute("ROLLBACK")
    text = "\n".join(r["QUERY PLAN"] for r in plan)
    return re.sub(r"'\{[^}]*\}'", f"'{{… {len(ids)} ids …}}'", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.retention")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="each phase without purge")
    parser.add_argument("--index-only", action="store_true", help="only part 2 (the index)")
    args = parser.parse_args(argv)

    with fresh_database() as url, connect(url) as conn:
        started = time.perf_counter()
        if not args.index_only:
            _create_ended(conn, args.tasks)
        _create_pending(conn, 60_000)
        conn.execute("VACUUM ANALYZE")
        print(f"created in {time.perf_counter() - started:.0f} s:", json.dumps(_counts(conn)))

        if not args.index_only:
            _during_claims(url, conn, args)
        _with_and_without_index(url, conn, args)


def _during_claims(url: str, conn: Any, args: argparse.Namespace) -> None:
    before = _claims(url, time.time() + args.seconds)
    done = threading.Event()
    during: dict = {}
    claimer = threading.Thread(target=lambda: during.update(_claims(url, done)))
    claimer.start()
    purge = _purge(url, args.chunk)
    done.set()
    claimer.join()
    after = _claims(url, time.time() + args.seconds)
    left = _counts(conn)
    print("claims before purge:", json.dumps(before))
    print("claims during purge:", json.dumps(during))
    print("claims after purge: ", json.dumps(after))
    print("purge (with claims):", json.dumps(purge))
    print("left:", json.dumps(left), flush=True)


def _with_and_without_index(url: str, conn: Any, args: argparse.Namespace) -> None:
    conn.execute("TRUNCATE taskrunner.task_history")  # the claims' rows, not timed
    _create_ended(conn, args.tasks)
    for index in (False, True):
        if not index:
            conn.execute("DROP INDEX taskrunner.task_history_task_idx")
        else:
            conn.execute(
                "CREATE INDEX task_history_task_idx ON taskrunner.task_history (task_id, at)"
            )
        conn.execute("VACUUM ANALYZE")
        plan = _explain_history_delete(conn, args.chunk)
        label = "with" if index else "without"
        print(f"one chunk's history delete, {label} the index:\n{plan}", flush=True)
        # without the index one chunk is enough (each reads the whole history)
        alone = _purge(url, args.chunk, None if index else 1)
        print(f"purge alone, {label} the index:", json.dumps(alone), flush=True)


if __name__ == "__main__":
    main()
