"""Task retries and delayed start at the SQL level (issue 9, items 1 and 2).

A failed run with runs left goes back to pending behind a backoff, from each of the three
ways a run fails (start webhook gave up, timeout, the target reported Failure); only the
last run's failure ends the task, cascades and fires on_failure. Scheduled tasks
(``not_before``) are not claimed before they are due, and are out of the claim index.
"""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
from conftest import create_batch, status_of, task_spec, webhook
from psycopg.rows import dict_row

RETRY = {"max_attempts": 3, "backoff_seconds": 10, "backoff_max_seconds": 15}


def claim(conn, worker="w1", n=100):
    return conn.execute("SELECT * FROM taskrunner.claim_tasks(%s, %s, 60)", (worker, n)).fetchall()


def task(conn, task_id):
    return conn.execute(
        "SELECT status::text, attempt, max_attempts, not_before, not_before - now() AS wait,"
        " failure_reason, status_reason FROM taskrunner.task WHERE id = %s",
        (task_id,),
    ).fetchone()


def make_due(conn, task_id=None):
    conn.execute(
        "UPDATE taskrunner.task SET not_before = now() - interval '1 ms'"
        " WHERE not_before IS NOT NULL AND (%s::uuid IS NULL OR id = %s::uuid)",
        (task_id, task_id),
    )


def report_failure(conn, task_id, retryable=None):
    return conn.execute(
        "SELECT * FROM taskrunner.update_task(%s, 'failure', NULL, NULL, NULL, 'boom', %s)",
        (task_id, retryable),
    ).fetchone()


def deliveries(conn, event):
    return conn.execute(
        "SELECT count(*) AS n FROM taskrunner.delivery WHERE event = %s", (event,)
    ).fetchone()["n"]


def history(conn, task_id):
    return [
        (r["from_status"], r["to_status"], r["reason"])
        for r in conn.execute(
            "SELECT from_status::text, to_status::text, reason FROM taskrunner.task_history"
            " WHERE task_id = %s ORDER BY id",
            (task_id,),
        ).fetchall()
    ]


def chain(conn, retry=RETRY):
    """a (with retries, on_failure) <- b (requires a's success)."""
    return create_batch(
        conn,
        [
            task_spec("a", retry=retry, actions=[webhook(), webhook("failure")]),
            task_spec("b", deps=["a"]),
        ],
    )


# -- the three ways a run fails ------------------------------------------------------------


def fail_by_report(conn, task_id):
    report_failure(conn, task_id)


def fail_by_start(conn, task_id):
    (delivery,) = conn.execute(
        "SELECT id, worker FROM taskrunner.delivery WHERE task_id = %s AND status = 'in_flight'",
        (task_id,),
    ).fetchall()
    status = conn.execute(
        "SELECT taskrunner.finish_delivery(%s, %s, false, 500, 'HTTP 500', NULL) AS s",
        (delivery["id"], delivery["worker"]),
    ).fetchone()["s"]
    assert status == "failed"


def fail_by_timeout(conn, task_id):
    conn.execute(
        "UPDATE taskrunner.task SET last_updated = now() - interval '2 min' WHERE id = %s",
        (task_id,),
    )
    assert conn.execute("SELECT taskrunner.tick() AS r").fetchone()["r"]["timed_out"] == 1


@pytest.mark.parametrize(
    ("fail", "reason"),
    [
        (fail_by_report, "boom"),
        (fail_by_start, "start webhook failed: HTTP 500"),
        (fail_by_timeout, "Timeout"),
    ],
)
def test_a_failed_run_with_runs_left_is_retried_and_only_the_last_failure_ends_it(
    conn, fail, reason
):
    t = chain(conn)
    a, b = t["a"]["id"], t["b"]["id"]
    for run in (1, 2):
        (item,) = claim(conn, f"w{run}")
        assert item["task_id"] == a
        assert task(conn, a)["attempt"] == run
        fail(conn, a)
        row = task(conn, a)
        assert row["status"] == "pending" and row["attempt"] == run
        assert row["failure_reason"] is None
        assert row["status_reason"].startswith(f"retry {run} of 2 in ")
        assert row["status_reason"].endswith(f"s: {reason}")
        # not claimable before the backoff (10 s, then 15 s capped; jitter: half to all)
        low, high = (5, 10) if run == 1 else (7.5, 15)
        assert low - 0.5 <= row["wait"].total_seconds() <= high
        assert claim(conn) == []
        # the children keep waiting, no end webhook fired
        assert status_of(conn, b) == "waiting"
        assert deliveries(conn, "failure") == 0
        make_due(conn)
    (item,) = claim(conn, "w3")
    assert task(conn, a)["attempt"] == 3
    fail(conn, a)
    row = task(conn, a)
    assert (row["status"], row["failure_reason"]) == ("failure", reason)
    assert status_of(conn, b) == "failure"  # the last failure cascades
    assert deliveries(conn, "failure") == 1  # and fires on_failure, once
    steps = [(f, to) for f, to, _ in history(conn, a)]
    assert steps == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "pending"),
        ("pending", "running"),
        ("running", "pending"),
        ("pending", "running"),
        ("running", "failure"),
    ]
    reasons = [r for _, _, r in history(conn, a)]
    assert reasons[1] == "claimed by w1"
    assert reasons[3] == "claimed by w2 (run 2 of 3)"
    assert reasons[5] == "claimed by w3 (run 3 of 3)"


def test_a_success_after_a_retry_ends_the_task_once(conn):
    t = chain(conn)
    a = t["a"]["id"]
    claim(conn)
    report_failure(conn, a)
    make_due(conn)
    claim(conn)
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (a,))
    assert task(conn, a)["status"] == "success" and task(conn, a)["attempt"] == 2
    assert status_of(conn, t["b"]["id"]) == "pending"
    assert deliveries(conn, "failure") == 0


def test_no_retry_by_default(conn):
    t = create_batch(conn, [task_spec("a", actions=[webhook(), webhook("failure")])])
    claim(conn)
    report_failure(conn, t["a"]["id"])
    assert task(conn, t["a"]["id"])["status"] == "failure"
    assert deliveries(conn, "failure") == 1


def test_retryable_false_fails_at_once(conn):
    t = chain(conn)
    a = t["a"]["id"]
    claim(conn)
    row = report_failure(conn, a, retryable=False)
    assert (row["status"], row["max_attempts"], row["attempt"]) == ("failure", 1, 1)
    assert status_of(conn, t["b"]["id"]) == "failure"
    # retryable true is the default
    t = chain(conn)
    claim(conn)
    assert report_failure(conn, t["a"]["id"], retryable=True)["status"] == "pending"


def test_retryable_only_with_failure(conn):
    t = chain(conn)
    claim(conn)
    with pytest.raises(psycopg.Error, match="retryable") as err:
        conn.execute(
            "SELECT taskrunner.update_task(%s, 'success', p_retryable => false)",
            (t["a"]["id"],),
        )
    assert err.value.sqlstate == "TR400"


def test_complete_tasks_retries_unless_retryable_false(conn):
    t = create_batch(
        conn, [task_spec("x", retry=RETRY), task_spec("y", retry=RETRY), task_spec("z")]
    )
    claim(conn)
    results = [
        {"task_id": str(t["x"]["id"]), "status": "failure", "failure_reason": "r"},
        {
            "task_id": str(t["y"]["id"]),
            "status": "failure",
            "failure_reason": "r",
            "retryable": False,
        },
        {"task_id": str(t["z"]["id"]), "status": "failure", "failure_reason": "r"},
    ]
    rows = conn.execute(
        "SELECT task_id, completed, status::text FROM taskrunner.complete_tasks(%s)",
        (json.dumps(results),),
    ).fetchall()
    assert [r["status"] for r in rows] == ["pending", "failure", "failure"]
    bad = [{"task_id": str(t["x"]["id"]), "status": "success", "retryable": "no"}]
    with pytest.raises(psycopg.Error, match="retryable: must be true or false"):
        conn.execute("SELECT * FROM taskrunner.complete_tasks(%s)", (json.dumps(bad),))


def test_a_dba_failure_is_retried_too_and_a_cancel_is_not(conn):
    t = create_batch(conn, [task_spec("a", retry=RETRY), task_spec("c", retry=RETRY)])
    claim(conn)
    conn.execute(
        "UPDATE taskrunner.task SET status = 'failure', failure_reason = 'by hand' WHERE id = %s",
        (t["a"]["id"],),
    )
    assert task(conn, t["a"]["id"])["status"] == "pending"
    conn.execute("SELECT taskrunner.cancel_task(%s)", (t["c"]["id"],))
    assert task(conn, t["c"]["id"])["status"] == "canceled"


def test_a_dba_fails_a_task_for_good_by_setting_max_attempts_to_attempt(conn):
    t = create_batch(conn, [task_spec("a", retry=RETRY)])
    claim(conn)
    conn.execute(
        "UPDATE taskrunner.task SET status = 'failure', failure_reason = 'no', "
        "max_attempts = attempt WHERE id = %s",
        (t["a"]["id"],),
    )
    assert task(conn, t["a"]["id"])["status"] == "failure"


def test_an_expired_start_lease_does_not_use_up_a_run(conn):
    t = create_batch(conn, [task_spec("a", retry={**RETRY, "max_attempts": 2})])
    a = t["a"]["id"]
    claim(conn)
    conn.execute("UPDATE taskrunner.delivery SET lease_until = now() - interval '1 s'")
    conn.execute("SELECT taskrunner.tick()")
    assert (task(conn, a)["status"], task(conn, a)["attempt"]) == ("pending", 0)
    claim(conn)
    assert task(conn, a)["attempt"] == 1  # the same run, started again
    report_failure(conn, a)
    assert task(conn, a)["status"] == "pending"  # run 2 is left


def test_a_start_in_flight_of_a_timed_out_run_is_dropped(conn):
    t = create_batch(conn, [task_spec("a", retry=RETRY)])
    a = t["a"]["id"]
    (item,) = claim(conn)
    fail_by_timeout(conn, a)
    row = conn.execute(
        "SELECT status::text FROM taskrunner.delivery WHERE id = %s", (item["delivery_id"],)
    ).fetchone()
    assert row["status"] == "canceled"
    # its late answer is stale: it does not start the task's next run
    make_due(conn)
    claim(conn, "w2")
    late = conn.execute(
        "SELECT taskrunner.finish_delivery(%s, 'w1', true, 200) AS s", (item["delivery_id"],)
    ).fetchone()["s"]
    assert late == "stale"
    assert (
        conn.execute("SELECT started_at FROM taskrunner.task WHERE id = %s", (a,)).fetchone()[
            "started_at"
        ]
        is None
    )


@pytest.mark.parametrize("run", [1, 2, 3, 8, 40])
def test_backoff_bounds(conn, run):
    delays = [
        r["d"]
        for r in conn.execute(
            "SELECT taskrunner._retry_delay(%s, 2, 60) AS d FROM generate_series(1, 200)", (run,)
        ).fetchall()
    ]
    full = min(60, 2 * 2 ** (run - 1))
    assert all(full / 2 <= d <= full for d in delays)
    assert max(delays) - min(delays) > full / 10  # jittered, not constant


def test_retries_are_counted_for_metrics(conn):
    t = create_batch(conn, [task_spec("a", kind="kk", retry=RETRY)])
    claim(conn)
    with conn.transaction():
        report_failure(conn, t["a"]["id"])
        stats = conn.execute("SELECT taskrunner.take_stats() AS s").fetchone()["s"]
    assert "retry>kk>1;" in stats


# -- delayed start ----------------------------------------------------------------------------


def test_a_delayed_task_is_not_claimed_before_it_is_due(conn):
    t = create_batch(
        conn,
        [
            task_spec("later", delay_seconds=30),
            task_spec("at", not_before="2999-01-01T00:00:00Z"),
            task_spec("past", not_before="2000-01-01T00:00:00Z"),
            task_spec("now"),
        ],
    )
    assert 29 <= task(conn, t["later"]["id"])["wait"].total_seconds() <= 30
    assert task(conn, t["at"]["id"])["not_before"].year == 2999
    assert task(conn, t["past"]["id"])["not_before"] is None  # already due: no delay
    assert {r["task_id"] for r in claim(conn)} == {t["past"]["id"], t["now"]["id"]}
    assert task(conn, t["later"]["id"])["status"] == "pending"
    next_wakeup = conn.execute("SELECT taskrunner.next_wakeup() - now() AS w").fetchone()["w"]
    assert 29 <= next_wakeup.total_seconds() <= 30
    make_due(conn, t["later"]["id"])
    (item,) = claim(conn)
    assert item["task_id"] == t["later"]["id"]
    row = task(conn, t["later"]["id"])
    assert (row["status"], row["not_before"]) == ("running", None)
    assert conn.execute("SELECT taskrunner.next_wakeup() AS w").fetchone()["w"].year == 2999


def test_next_wakeup_is_null_when_nothing_is_scheduled(conn):
    create_batch(conn, [task_spec("a")])
    assert conn.execute("SELECT taskrunner.next_wakeup() AS w").fetchone()["w"] is None


def test_a_delayed_child_waits_for_its_parent_and_its_time(conn):
    t = create_batch(conn, [task_spec("p"), task_spec("c", deps=["p"], delay_seconds=60)])
    claim(conn)
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (t["p"]["id"],))
    assert task(conn, t["c"]["id"])["status"] == "pending"
    assert claim(conn) == []
    make_due(conn)
    assert [r["task_id"] for r in claim(conn)] == [t["c"]["id"]]


def test_a_paused_delayed_task_keeps_its_time(conn):
    t = create_batch(conn, [task_spec("a", delay_seconds=60)])
    conn.execute("SELECT taskrunner.pause_task(%s)", (t["a"]["id"],))
    conn.execute("SELECT taskrunner.resume_task(%s)", (t["a"]["id"],))
    assert claim(conn) == []
    make_due(conn)
    assert len(claim(conn)) == 1


def test_scheduled_tasks_stay_out_of_the_claim_path(conn):
    """Scheduled tasks: the claim's group walk reads none of them (partial index), and
    the due probe reads none either (the 100k-task EXPLAIN is in docs/performance.md)."""
    conn.execute(
        "SELECT taskrunner.create_batch(("
        " SELECT jsonb_agg(jsonb_build_object('local_id', 'd' || i, 'name', 'd', 'kind', 'k',"
        "  'delay_seconds', 3600, 'actions', '[]'::jsonb)) FROM generate_series(1, 5000) i))"
    )
    create_batch(conn, [task_spec("ready")])
    conn.execute("ANALYZE taskrunner.task")
    plan = conn.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM taskrunner._claim_groups"
    ).fetchone()["QUERY PLAN"]
    plan = json.loads(plan) if isinstance(plan, str) else plan

    def nodes(p):
        yield p
        for c in p.get("Plans", []):
            yield from nodes(c)

    on_task = [n for n in nodes(plan[0]["Plan"]) if n.get("Relation Name") == "task"]
    assert {n.get("Index Name") for n in on_task} == {"task_pending_claim_idx"}
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in on_task) <= 3
    due = conn.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT 1 FROM taskrunner.task"
        " WHERE status = 'pending' AND not_before <= now()"
    ).fetchone()["QUERY PLAN"]
    due = json.loads(due) if isinstance(due, str) else due
    scan = due[0]["Plan"]
    assert scan.get("Index Name") == "task_not_before_idx", json.dumps(due)
    assert scan["Actual Rows"] == 0
    assert [r["task_id"] for r in claim(conn)] != []


# -- exactness under concurrent claimers ----------------------------------------------------


def test_retries_under_concurrent_claimers_keep_rules_and_run_counts(db_url, conn):
    """Four claimers at once, every run fails, half the tasks delayed: from the history,
    each task ran exactly max_attempts times and failed once, and no group ever had more
    running tasks than its rule allows."""
    rule = {"kind": "k", "status": "running", "fields": ["g"], "max": 2}
    retry = {"max_attempts": 3, "backoff_seconds": 0.01, "backoff_max_seconds": 0.04}
    specs = [
        task_spec(
            f"t{i}",
            metadata={"g": i % 3},
            rules=[rule],
            retry=retry,
            **({"delay_seconds": 0.1 + i / 1000} if i % 2 else {}),
        )
        for i in range(60)
    ]
    create_batch(conn, specs)
    deadline = time.monotonic() + 60

    def claimer(n: int) -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
            while time.monotonic() < deadline:
                for item in claim(c, f"w{n}", 4):
                    report_failure(c, item["task_id"])
                left = c.execute(
                    "SELECT count(*) AS n FROM taskrunner.task WHERE status <> 'failure'"
                ).fetchone()["n"]
                if left == 0:
                    return
                time.sleep(0.002)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    runs = conn.execute(
        "SELECT task_id, count(*) FILTER (WHERE to_status = 'running') AS runs,"
        " count(*) FILTER (WHERE to_status = 'failure') AS failures"
        " FROM taskrunner.task_history GROUP BY 1"
    ).fetchall()
    assert len(runs) == 60
    assert {(r["runs"], r["failures"]) for r in runs} == {(3, 1)}
    peaks = conn.execute(
        "WITH ev AS ("
        "  SELECT h.id, t.metadata ->> 'g' AS g,"
        "         CASE WHEN h.to_status = 'running' THEN 1"
        "              WHEN h.from_status = 'running' THEN -1 ELSE 0 END AS d"
        "  FROM taskrunner.task_history h JOIN taskrunner.task t ON t.id = h.task_id)"
        " SELECT g, max(s) AS peak FROM ("
        "  SELECT g, sum(d) OVER (PARTITION BY g ORDER BY id) AS s FROM ev) x GROUP BY g"
    ).fetchall()
    assert {p["peak"] for p in peaks} <= {1, 2} and len(peaks) == 3
