"""Capacity and RateLimit rules and expected_count in SQL (docs/sql.md "Rules"): the counts,
the slots a claim takes, the rate-limit ledger and its wake-up time, the SQL-side checks,
and both rules exact under several claiming processes (checked from the records)."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from conftest import create_batch, status_of, task_spec
from invariants import assert_capacity_respected, assert_rate_respected


def capacity(max_: int, kind: str = "k", fields: list | None = None) -> dict:
    return {
        "type": "capacity",
        "kind": kind,
        "status": "running",
        "fields": fields or [],
        "max": max_,
    }


def rate(max_: int, per_seconds: int, kind: str = "k", fields: list | None = None) -> dict:
    return {
        "type": "rate_limit",
        "kind": kind,
        "fields": fields or [],
        "max": max_,
        "per_seconds": per_seconds,
    }


def counters(task_id, new_success: int, new_failures: int = 0) -> str:
    """An add_counters input for one task."""
    return json.dumps(
        [{"task_id": str(task_id), "new_success": new_success, "new_failures": new_failures}]
    )


def claim(conn, n: int = 10) -> list:
    rows = conn.execute("SELECT task_id FROM taskrunner.claim_tasks('w', %s, 60)", (n,))
    return [r["task_id"] for r in rows.fetchall()]


def blocked(conn) -> list[tuple]:
    rows = conn.execute(
        "SELECT name, current_count, max_concurency FROM taskrunner.blocked_tasks ORDER BY name"
    ).fetchall()
    return [(r["name"], r["current_count"], r["max_concurency"]) for r in rows]


def test_capacity_counts_remaining_work_of_running_tasks(conn):
    rule = capacity(10, fields=["t"])
    tasks = create_batch(
        conn,
        [
            task_spec("a", rules=[rule], metadata={"t": 1}, expected_count=8),
            task_spec("b", rules=[rule], metadata={"t": 1}, expected_count=8),
            task_spec("other", rules=[rule], metadata={"t": 2}, expected_count=8),
        ],
    )
    # a starts (sum 0 < 10), then b is held back: remaining of a = 8 < 10, so b may start
    # too (a start is allowed while the sum is below max) -- but not a third one
    assert len(claim(conn)) == 3
    assert blocked(conn) == []
    more = create_batch(conn, [task_spec("c", rules=[rule], metadata={"t": 1}, expected_count=1)])
    assert claim(conn) == []  # 8 + 8 = 16 >= 10
    assert blocked(conn) == [("c", 16, 10)]
    why = conn.execute("SELECT taskrunner.why_not_running(%s) AS w", (more["c"]["id"],))
    assert why.fetchone()["w"]["rules"][0]["count"] == 16

    # progress lowers the remaining work: 8 - 5 - 1 = 2 for a, b still 8 -> 10: blocked
    conn.execute(
        "SELECT taskrunner.add_counters(%s::jsonb)",
        (counters(tasks["a"]["id"], 5, 1),),
    )
    assert blocked(conn) == [("c", 10, 10)]
    # more than expected counts as nothing left (never negative): a 0 + b 8 = 8 < 10
    conn.execute("SELECT taskrunner.update_task(%s, p_new_success => 100)", (tasks["a"]["id"],))
    assert blocked(conn) == []
    assert claim(conn) == [more["c"]["id"]]


def test_capacity_claims_as_many_as_fit_at_once(conn):
    rule = capacity(10)
    create_batch(conn, [task_spec(f"t{i}", rules=[rule], expected_count=3) for i in range(6)])
    # sums before each start: 0, 3, 6, 9 (< 10) -> 4 start; the fifth would see 12
    assert len(claim(conn)) == 4
    assert claim(conn) == []
    # expected_count 0 never fills a capacity, but an already full one still holds it back
    zero = create_batch(conn, [task_spec("z", rules=[rule], expected_count=0)])
    assert claim(conn) == []
    assert blocked(conn)[-1] == ("z", 12, 10)
    conn.execute("UPDATE taskrunner.task SET status = 'success' WHERE status = 'running'")
    assert claim(conn) != [] and status_of(conn, zero["z"]["id"]) == "running"


def test_expected_count_changes_keep_the_admission_key_right(conn):
    rule = capacity(10)
    t = create_batch(
        conn,
        [
            task_spec("a", rules=[rule], expected_count=3),
            task_spec("b", rules=[rule], expected_count=4),
            task_spec("c", rules=[rule], expected_count=3),
        ],
    )
    keys = {k: v["admission_key"] for k, v in t.items()}
    assert keys["a"] == keys["c"] != keys["b"]  # the expected count is in the key
    conn.execute("UPDATE taskrunner.task SET expected_count = 4 WHERE local_id = 'a'")
    key = conn.execute("SELECT admission_key FROM taskrunner.task WHERE local_id = 'a'")
    assert key.fetchone()["admission_key"] == keys["b"]
    # tasks without a capacity rule keep their key whatever their expected_count
    plain = create_batch(conn, [task_spec("p", expected_count=5), task_spec("q")])
    assert plain["p"]["admission_key"] == plain["q"]["admission_key"]


def test_update_task_expected_count(conn):
    t = create_batch(conn, [task_spec("a", expected_count=5)])["a"]
    claim(conn)
    row = conn.execute(
        "SELECT * FROM taskrunner.update_task(%s, p_expected_count => 7)", (t["id"],)
    ).fetchone()
    assert row["expected_count"] == 7
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT taskrunner.update_task(%s, p_expected_count => -1)", (t["id"],))
    assert err.value.sqlstate == "TR400"
    assert err.value.diag.message_detail == "expected_count: must be at least 0"
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE taskrunner.task SET expected_count = -1 WHERE id = %s", (t["id"],))


def test_a_larger_expected_count_waits_for_a_claim_in_flight(conn, db_url):
    """update_task's expected_count takes the claim lock of the task's kind: a claim that
    counted the capacity is committed before the remaining work can grow."""
    t = create_batch(conn, [task_spec("a", expected_count=1)])["a"]
    claim(conn)
    create_batch(conn, [task_spec("b", rules=[capacity(10)], expected_count=1)])
    with psycopg.connect(db_url) as claimer:  # a claim, its transaction held open
        claimer.execute("SELECT taskrunner.claim_tasks('w2', 1, 60)")
        done = threading.Event()

        def grow() -> None:
            with psycopg.connect(db_url, autocommit=True) as other:
                other.execute(
                    "SELECT taskrunner.update_task(%s, p_expected_count => 50)", (t["id"],)
                )
            done.set()

        thread = threading.Thread(target=grow)
        thread.start()
        assert not done.wait(0.5)  # waits for the claim's lock
        claimer.commit()
        thread.join(10)
        assert done.is_set()
    assert (
        status_of(
            conn,
            conn.execute("SELECT id FROM taskrunner.task WHERE local_id = 'b'").fetchone()["id"],
        )
        == "running"
    )


def test_counters_on_a_running_task_with_expected_count_wake_the_workers(conn, db_url):
    t = create_batch(conn, [task_spec("a", expected_count=5), task_spec("b")])
    claim(conn)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN taskrunner_task")

        def notified() -> int:
            return len(list(listener.notifies(timeout=0.2, stop_after=1)))

        conn.execute(
            "SELECT taskrunner.add_counters(%s::jsonb)",
            (counters(t["b"]["id"], 1, 0),),
        )
        assert notified() == 0  # no expected_count: no capacity can be freed
        conn.execute(
            "SELECT taskrunner.add_counters(%s::jsonb)",
            (counters(t["a"]["id"], 1, 0),),
        )
        assert notified() == 1
        conn.execute("SELECT taskrunner.update_task(%s, p_new_failures => 1)", (t["a"]["id"],))
        assert notified() == 1


def test_rate_limit_window(conn):
    rule = rate(2, 60, fields=["t"])
    t = create_batch(
        conn,
        [task_spec(f"x{i}", rules=[rule], metadata={"t": 1}) for i in range(3)]
        + [task_spec("y", rules=[rule], metadata={"t": 2})],
    )
    assert len(claim(conn)) == 3  # two of t=1, one of t=2
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.rate_start").fetchone()["n"] == 3
    # the window counts starts, not running tasks: ending them frees nothing
    conn.execute("UPDATE taskrunner.task SET status = 'success' WHERE status = 'running'")
    assert claim(conn) == []
    assert blocked(conn) == [("x2", 2, 2)]
    first = conn.execute(
        "SELECT min(at) AS at FROM taskrunner.rate_start s JOIN taskrunner.task t"
        " ON t.id = s.task_id WHERE t.metadata = '{\"t\": 1}'"
    ).fetchone()["at"]
    # it frees when the older of the two leaves the window
    free = conn.execute("SELECT taskrunner._rate_limit_next_free() AS f").fetchone()["f"]
    assert free == first + timedelta(seconds=60)
    # a minute later (moved back in time, as the clock cannot be moved forward)
    conn.execute(
        "UPDATE taskrunner.rate_start SET at = at - interval '59 seconds',"
        " expires_at = expires_at - interval '59 seconds'"
    )
    assert claim(conn) == []
    conn.execute(
        "UPDATE taskrunner.rate_start SET at = at - interval '1 second',"
        " expires_at = expires_at - interval '1 second'"
    )
    assert claim(conn) == [t["x2"]["id"]]
    assert conn.execute("SELECT taskrunner._rate_limit_next_free() AS f").fetchone()["f"] is None
    # a start is a start: a task back to pending and claimed again counts twice
    conn.execute("UPDATE taskrunner.task SET status = 'pending' WHERE id = %s", (t["x2"]["id"],))
    assert claim(conn) == [t["x2"]["id"]]
    n = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.rate_start WHERE task_id = %s", (t["x2"]["id"],)
    ).fetchone()["n"]
    assert n == 2


def test_prune_rate_starts(conn):
    create_batch(conn, [task_spec(f"x{i}", rules=[rate(5, 1)]) for i in range(3)])
    claim(conn)
    assert conn.execute("SELECT taskrunner.prune_rate_starts() AS n").fetchone()["n"] == 0
    conn.execute(
        "UPDATE taskrunner.rate_start SET expires_at = now() - interval '6 minutes'"
        " WHERE task_id IN (SELECT task_id FROM taskrunner.rate_start LIMIT 2)"
    )
    assert conn.execute("SELECT taskrunner.prune_rate_starts() AS n").fetchone()["n"] == 2


def test_rate_limit_count_is_an_index_range_scan(conn):
    """100,000 ledger rows of other keys and of old windows: a count reads its window."""
    conn.execute(
        "INSERT INTO taskrunner.rate_start (key, at, expires_at, task_id)"
        " SELECT k, now() - make_interval(secs => i), now(), k"
        " FROM generate_series(1, 100000) i,"
        " LATERAL (SELECT ('00000000-0000-0000-0000-' || lpad((i % 1000)::text, 12, '0'))::uuid"
        "          AS k) k"
    )
    conn.execute("ANALYZE taskrunner.rate_start")
    plan = conn.execute(
        "EXPLAIN (FORMAT JSON) SELECT count(*) FROM taskrunner.rate_start s"
        " WHERE s.key = '00000000-0000-0000-0000-000000000007'"
        " AND s.at > now() - interval '60 seconds'"
    ).fetchone()["QUERY PLAN"][0]["Plan"]
    assert "rate_start_key_at_idx" in str(plan)


def test_set_batch_rules_checks_capacity_and_rate_limit(conn):
    t = create_batch(conn, [task_spec("a", expected_count=3), task_spec("b")])
    batch = t["a"]["batch_id"]

    def set_rules(rules):
        return conn.execute(
            "SELECT taskrunner.set_batch_rules(%s, 'k', %s::jsonb) AS n", (batch, json.dumps(rules))
        ).fetchone()["n"]

    with pytest.raises(psycopg.Error) as err:
        set_rules([capacity(5)])
    assert err.value.sqlstate == "TR400"
    assert err.value.diag.message_detail.startswith(
        "rules[0]: a Capacity rule needs expected_count, which 1 task(s) of the batch do not have"
    )
    with pytest.raises(psycopg.Error) as err:
        set_rules([rate(1, 1, kind="other")])
    assert err.value.diag.message_detail.startswith("rules[0].matcher.kind: a RateLimit")
    conn.execute("UPDATE taskrunner.task SET expected_count = 1 WHERE id = %s", (t["b"]["id"],))
    assert set_rules([capacity(5), rate(1, 1)]) == 2
    keys = conn.execute("SELECT DISTINCT admission_key FROM taskrunner.task").fetchall()
    assert len(keys) == 2  # expected counts 3 and 1: two groups


# -- exact under several claiming processes ------------------------------------------------

CAPACITY = 10
RATE, WINDOW = 3, 1


def _claimer(url: str, worker: str, deadline: float) -> None:
    """Claim, hold the task a moment, report progress, end it: a worker whose targets are
    quick, racing the other claimers for every freed unit of capacity."""
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT task_id FROM taskrunner.claim_tasks(%s, 4, 60)", (worker,)
            ).fetchall()
            if not rows:
                left = conn.execute(
                    "SELECT count(*) FROM taskrunner.task WHERE NOT taskrunner.is_terminal(status)"
                ).fetchone()[0]
                if left == 0:
                    return
                time.sleep(0.005)
                continue
            for (task_id,) in rows:
                time.sleep(0.002)
                conn.execute("SELECT taskrunner.update_task(%s, 'success', 0, 0)", (task_id,))


def test_capacity_and_rate_limit_exact_with_many_claimers(conn, db_url):
    cap = capacity(CAPACITY, kind="cap", fields=["t"])
    lim = rate(RATE, WINDOW, kind="lim", fields=["t"])
    specs = [
        task_spec(f"c{i}", kind="cap", rules=[cap], metadata={"t": i % 2}, expected_count=i % 4 + 2)
        for i in range(80)
    ]
    specs += [task_spec(f"r{i}", kind="lim", rules=[lim], metadata={"t": i % 2}) for i in range(8)]
    create_batch(conn, specs)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.starmap(_claimer, [(db_url, f"w{i}", time.monotonic() + 60) for i in range(4)])
    left = conn.execute("SELECT count(*) AS n FROM taskrunner.task WHERE status <> 'success'")
    assert left.fetchone()["n"] == 0
    # the claimers did press against both limits (else the test proves nothing)
    assert assert_capacity_respected(conn, "cap", "t", CAPACITY) >= CAPACITY - 5
    assert assert_rate_respected(conn, "lim", RATE, WINDOW) == RATE
