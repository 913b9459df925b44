"""Rerun in SQL: rerun_task and rerun_batch move failed or canceled tasks and their cascade
back to run, keeping the dependency counters, the batch counts and the history right, also
when a rerun races a claim, a parent's failure, a cancel or another rerun."""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg
import pytest
from conftest import create_batch, status_of, statuses, task_spec
from psycopg.rows import dict_row


def _run(conn, task_id, outcome: str = "success") -> None:
    """Claim every pending task, then end task_id (which must be running by then)."""
    conn.execute("SELECT taskrunner.claim_tasks('w1', 100, 60)")
    assert status_of(conn, task_id) == "running"
    result = {"task_id": str(task_id), "status": outcome}
    if outcome == "failure":
        result["failure_reason"] = "boom"
    conn.execute("SELECT * FROM taskrunner.complete_tasks(%s::jsonb)", (json.dumps([result]),))


def _rerun_task(conn, task_id) -> dict[str, tuple[str, str]]:
    rows = conn.execute("SELECT * FROM taskrunner.rerun_task(%s)", (task_id,)).fetchall()
    return {str(r["task_id"]): (r["role"], r["to_status"]) for r in rows}


def _ids(tasks: dict, *names: str) -> list[str]:
    return [str(tasks[n]["id"]) for n in names]


def assert_consistent(conn) -> None:
    """Every unended task counts exactly its ended parents; every batch's counts (batch +
    deltas) equal a GROUP BY over its tasks; history chains end in the current status."""
    wrong = conn.execute(
        """
        SELECT t.local_id, t.status, t.deps_finished, t.deps_succeeded,
               count(p.id) FILTER (WHERE taskrunner.is_terminal(p.status)) AS finished,
               count(p.id) FILTER (WHERE p.status = 'success') AS succeeded
        FROM taskrunner.task t
        LEFT JOIN taskrunner.dependency d ON d.child_id = t.id
        LEFT JOIN taskrunner.task p ON p.id = d.parent_id
        WHERE t.status IN ('waiting', 'pending', 'paused')
        GROUP BY t.id
        HAVING t.deps_finished <> count(p.id) FILTER (WHERE taskrunner.is_terminal(p.status))
            OR t.deps_succeeded <> count(p.id) FILTER (WHERE p.status = 'success')
            OR (t.status = 'pending') <> (t.deps_finished = t.deps_total
                                          AND t.status <> 'paused')
        """
    ).fetchall()
    assert not wrong, wrong
    counts = conn.execute(
        """
        SELECT s.batch_id FROM taskrunner.batch_summary s
        JOIN taskrunner.batch_progress p ON p.batch_id = s.batch_id
        WHERE s.total_tasks <> p.total OR s.waiting <> p.waiting OR s.pending <> p.pending
           OR s.running + s.claimed <> p.running OR s.success <> p.success
           OR s.failure <> p.failure OR s.canceled <> p.canceled OR s.paused <> p.paused
        """
    ).fetchall()
    assert not counts, counts
    broken = conn.execute(
        """
        SELECT t.local_id FROM taskrunner.task t
        WHERE t.status IS DISTINCT FROM (SELECT h.to_status FROM taskrunner.task_history h
                                         WHERE h.task_id = t.id ORDER BY h.id DESC LIMIT 1)
           OR EXISTS (SELECT 1 FROM (
                  SELECT h.from_status, lag(h.to_status) OVER (ORDER BY h.id) AS before
                  FROM taskrunner.task_history h WHERE h.task_id = t.id) x
                  WHERE x.before IS NOT NULL AND x.from_status IS DISTINCT FROM x.before)
        """
    ).fetchall()
    assert not broken, broken


def _graph(conn) -> dict:
    """a -> b -> c (requires success), a -> d (only waits for a's end), and e beside them."""
    return create_batch(
        conn,
        [
            task_spec("a"),
            task_spec("b", deps=["a"]),
            task_spec("c", deps=["b"]),
            task_spec("d", deps=[("a", False)]),
            task_spec("e"),
        ],
    )


def test_rerun_moves_a_failed_task_and_its_cascade_back(conn):
    tasks = _graph(conn)
    a, b, c, d = _ids(tasks, "a", "b", "c", "d")
    _run(conn, a, "failure")
    assert statuses(conn) == {
        "a": "failure", "b": "failure", "c": "failure", "d": "pending", "e": "running",
    }  # fmt: skip

    moved = _rerun_task(conn, a)

    assert moved == {
        a: ("rerun", "pending"),
        b: ("downstream", "waiting"),
        c: ("downstream", "waiting"),
        d: ("waiting_again", "waiting"),
    }
    row = conn.execute("SELECT * FROM taskrunner.task WHERE id = %s", (a,)).fetchone()
    assert row["failure_reason"] is None and row["ended_at"] is None
    assert row["claimed_at"] is None and row["claimed_by"] is None
    assert row["status_reason"].startswith("rerun by ")
    reasons = conn.execute(
        "SELECT status_reason FROM taskrunner.task WHERE id = ANY(%s::uuid[]) ORDER BY local_id",
        ([b, c, d],),
    ).fetchall()
    assert [r["status_reason"] for r in reasons] == [
        f"dependency {a} rerun",
        f"dependency {b} rerun",
        f"dependency {a} rerun",
    ]
    assert_consistent(conn)

    # the DAG now runs to the end, one level after the other
    _run(conn, a)
    assert status_of(conn, b) == "pending" and status_of(conn, d) == "pending"
    _run(conn, b)
    _run(conn, c)
    _run(conn, d)
    assert set(statuses(conn).values()) == {"success", "running"}  # e never ended
    history = conn.execute(
        "SELECT from_status::text, to_status::text, reason, actor FROM taskrunner.task_history"
        " WHERE task_id = %s ORDER BY id",
        (a,),
    ).fetchall()
    assert [(h["from_status"], h["to_status"]) for h in history] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "failure"),
        ("failure", "pending"),
        ("pending", "running"),
        ("running", "success"),
    ]
    assert history[3]["reason"].startswith("rerun by ") and history[3]["actor"]
    assert_consistent(conn)


def test_rerun_leaves_downstream_that_ran_alone(conn):
    tasks = create_batch(
        conn,
        [task_spec("a"), task_spec("b", deps=[("a", False)]), task_spec("c", deps=["a"])],
    )
    a, b, c = _ids(tasks, "a", "b", "c")
    _run(conn, a, "failure")
    _run(conn, b)  # b only waited for a's end, and succeeded

    assert _rerun_task(conn, a) == {a: ("rerun", "pending"), c: ("downstream", "waiting")}
    assert status_of(conn, b) == "success"
    row = conn.execute("SELECT deps_finished FROM taskrunner.task WHERE id = %s", (b,)).fetchone()
    assert row["deps_finished"] == 1
    _run(conn, a)
    assert status_of(conn, c) == "pending"
    assert_consistent(conn)


def test_a_task_that_failed_on_its_own_is_not_rerun_as_downstream(conn):
    """The cascade takes only tasks a parent failed (they never ran): one that ran and
    failed is not rerun with its parent, and neither is a task canceled by a user."""
    tasks = create_batch(
        conn,
        [
            task_spec("a"),
            task_spec("b", deps=[("a", False)]),
            task_spec("c", deps=["b"]),
            task_spec("x", deps=["a"]),
        ],
    )
    a, b, c, x = _ids(tasks, "a", "b", "c", "x")
    conn.execute("SELECT taskrunner.cancel_task(%s)", (x,))
    _run(conn, a, "failure")
    _run(conn, b, "failure")
    assert status_of(conn, c) == "failure"

    assert _rerun_task(conn, a) == {a: ("rerun", "pending")}
    assert statuses(conn) == {"a": "pending", "b": "failure", "c": "failure", "x": "canceled"}
    assert _rerun_task(conn, b) == {b: ("rerun", "waiting"), c: ("downstream", "waiting")}
    assert_consistent(conn)


def test_rerun_of_a_canceled_task_starts_it_again(conn):
    """A rerun task gets a new start delivery (a new Idempotency-Key) and its end actions
    fire again for the new run."""
    tasks = create_batch(
        conn,
        [task_spec("a", actions=[{"event": "start", "url": "http://127.0.0.1:9/s",
                                  "verb": "POST"},
                                 {"event": "success", "url": "http://127.0.0.1:9/ok",
                                  "verb": "POST"}])],
    )  # fmt: skip
    (a,) = _ids(tasks, "a")
    (first,) = conn.execute("SELECT * FROM taskrunner.claim_tasks('w1', 1, 60)").fetchall()
    conn.execute("SELECT taskrunner.cancel_task(%s)", (a,))  # its start still in flight

    assert _rerun_task(conn, a) == {a: ("rerun", "pending")}
    conn.execute("SELECT taskrunner.claim_tasks('w2', 1, 60)")
    # the first run's start gives up late: stale, the new run goes on
    old = json.dumps([{"delivery_id": str(first["delivery_id"]), "ok": False, "error": "x"}])
    out = conn.execute("SELECT * FROM taskrunner.finish_deliveries('w1', %s::jsonb)", (old,))
    assert out.fetchone()["status"] == "stale"
    assert status_of(conn, a) == "running"
    _run(conn, a)
    deliveries = conn.execute(
        "SELECT id, event::text FROM taskrunner.delivery WHERE task_id = %s ORDER BY created_at",
        (a,),
    ).fetchall()
    starts = [d["id"] for d in deliveries if d["event"] == "start"]
    assert len(starts) == 2 and starts[0] != starts[1]
    assert [d["event"] for d in deliveries].count("success") == 1
    assert status_of(conn, a) == "success"
    assert_consistent(conn)


def test_what_cannot_be_rerun(conn):
    tasks = create_batch(
        conn,
        [task_spec("a"), task_spec("b", deps=["a"]), task_spec("w", deps=[("a", False)])],
    )
    a, b = _ids(tasks, "a", "b")
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM taskrunner.rerun_task(%s)", (a,))
    assert exc.value.sqlstate == "TR409"
    assert "it is pending" in str(exc.value)
    assert "only a failure or canceled task" in exc.value.diag.message_detail
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM taskrunner.rerun_task(%s)", (str(uuid.uuid4()),))
    assert exc.value.sqlstate == "TR404"

    _run(conn, a, "failure")
    # b failed because a did: rerunning b alone would fail it again
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM taskrunner.rerun_task(%s)", (b,))
    assert exc.value.sqlstate == "TR409"
    assert f"requires the success of task {a}, which failed" in str(exc.value)
    assert exc.value.diag.message_detail.startswith(f"dependencies: task {a} is failure")
    # a DBA's UPDATE cannot take the shortcut
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("UPDATE taskrunner.task SET status = 'pending' WHERE id = %s", (a,))
    assert exc.value.sqlstate == "TR409"
    assert statuses(conn)["a"] == "failure"
    assert_consistent(conn)


def test_a_child_held_down_by_another_failed_parent_stays_failed(conn):
    """c requires both p and q; both failed. Rerunning p leaves c failed (q would fail it
    again); rerunning q then takes c along. A diamond (p -> x -> y, p -> y) reruns whole."""
    tasks = create_batch(
        conn,
        [
            task_spec("p"),
            task_spec("q"),
            task_spec("c", deps=["p", "q"]),
            task_spec("x", deps=["p"]),
            task_spec("y", deps=["x", "p"]),
        ],
    )
    p, q, c, x, y = _ids(tasks, "p", "q", "c", "x", "y")
    claimed = conn.execute("SELECT task_id FROM taskrunner.claim_tasks('w1', 10, 60)").fetchall()
    assert len(claimed) == 2
    conn.execute(
        "SELECT * FROM taskrunner.complete_tasks(%s::jsonb)",
        (json.dumps([{"task_id": t, "status": "failure", "failure_reason": "boom"}
                     for t in (p, q)]),),
    )  # fmt: skip

    assert _rerun_task(conn, p) == {
        p: ("rerun", "pending"), x: ("downstream", "waiting"), y: ("downstream", "waiting"),
    }  # fmt: skip
    assert status_of(conn, c) == "failure"
    assert _rerun_task(conn, q) == {q: ("rerun", "pending"), c: ("downstream", "waiting")}
    row = conn.execute(
        "SELECT deps_finished, deps_succeeded FROM taskrunner.task WHERE id = %s", (c,)
    ).fetchone()
    assert (row["deps_finished"], row["deps_succeeded"]) == (0, 0)
    assert_consistent(conn)


def test_rerun_batch(conn):
    other = create_batch(conn, [task_spec("o")])
    (o,) = _ids(other, "o")
    tasks = create_batch(
        conn,
        [
            task_spec("a"),
            task_spec("b", deps=["a"]),
            task_spec("c"),
            task_spec("ok"),
            task_spec("late", deps=["ok"]),
        ],
    )
    a, b, c, ok, late = _ids(tasks, "a", "b", "c", "ok", "late")
    later = create_batch(conn, [task_spec("z", deps=[(b, True)])])  # another batch
    (z,) = _ids(later, "z")
    batch = tasks["a"]["batch_id"]
    _run(conn, a, "failure")  # claims o, a, c and ok
    conn.execute(
        "SELECT * FROM taskrunner.complete_tasks(%s::jsonb)",
        (json.dumps([{"task_id": ok, "status": "success"}]),),
    )
    stopped = conn.execute("SELECT * FROM taskrunner.stop_batch(%s)", (batch,)).fetchone()
    assert stopped["canceled_running"] + stopped["canceled_claimed"] == 1  # c
    assert stopped["canceled_pending"] == 1  # late

    rows = conn.execute("SELECT * FROM taskrunner.rerun_batch(%s)", (batch,)).fetchall()
    moved = {str(r["task_id"]): (r["role"], r["to_status"], str(r["from_status"])) for r in rows}
    assert moved == {
        a: ("rerun", "pending", "failure"),
        b: ("rerun", "waiting", "failure"),
        c: ("rerun", "pending", "canceled"),
        late: ("rerun", "pending", "canceled"),
        z: ("downstream", "waiting", "failure"),
    }
    reasons = {
        str(r["id"]): r["status_reason"]
        for r in conn.execute("SELECT id, status_reason FROM taskrunner.task").fetchall()
    }
    assert reasons[a].startswith("batch rerun by ") and reasons[z] == f"dependency {b} rerun"
    assert status_of(conn, ok) == "success" and status_of(conn, o) == "running"
    assert_consistent(conn)

    with pytest.raises(psycopg.Error) as exc:  # nothing failed or canceled any more
        conn.execute("SELECT * FROM taskrunner.rerun_batch(%s)", (batch,))
    assert exc.value.sqlstate == "TR409"
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM taskrunner.rerun_batch(%s)", (str(uuid.uuid4()),))
    assert exc.value.sqlstate == "TR404"


def test_rerun_batch_refuses_a_failed_parent_outside_the_batch(conn):
    first = create_batch(conn, [task_spec("p")])
    (p,) = _ids(first, "p")
    _run(conn, p, "failure")
    second = create_batch(conn, [task_spec("c", deps=[(p, True)])])
    assert status_of(conn, second["c"]["id"]) == "failure"
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM taskrunner.rerun_batch(%s)", (second["c"]["batch_id"],))
    assert exc.value.sqlstate == "TR409" and f"task {p}, which failed" in str(exc.value)
    # rerunning the parent's batch takes the child along
    rows = conn.execute(
        "SELECT * FROM taskrunner.rerun_batch(%s)", (first["p"]["batch_id"],)
    ).fetchall()
    assert {r["role"] for r in rows} == {"rerun", "downstream"}
    assert_consistent(conn)


# --- races: two connections, one transaction held open -----------------------------------


def _in_thread(db_url: str, sql: str, params: tuple) -> tuple[threading.Thread, dict]:
    """Run sql on a connection of its own in a thread; the result (rows or error) lands in
    the returned dict once the thread ends."""
    out: dict = {}

    def run() -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
            try:
                out["rows"] = c.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _wait_until_blocked(conn, thread: threading.Thread) -> None:
    """Until another backend waits for a lock (the thread's statement is blocked)."""
    for _ in range(200):
        row = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        if row["n"] or not thread.is_alive():
            return
        time.sleep(0.02)
    raise AssertionError("the other statement never blocked")


def test_rerun_waits_for_a_claim_in_flight(conn, db_url):
    """d (a child that only waits for a's end) is being claimed while a is rerun: the rerun
    waits for the claim and leaves the now running d alone."""
    tasks = _graph(conn)
    a, d = _ids(tasks, "a", "d")
    _run(conn, a, "failure")
    with psycopg.connect(db_url, row_factory=dict_row) as tx:  # a transaction held open
        claimed = tx.execute("SELECT task_id FROM taskrunner.claim_tasks('w2', 10, 60)")
        assert str(d) in {str(r["task_id"]) for r in claimed.fetchall()}
        thread, out = _in_thread(db_url, "SELECT * FROM taskrunner.rerun_task(%s)", (a,))
        _wait_until_blocked(conn, thread)
        tx.commit()
    thread.join(10)
    assert {str(r["task_id"]): r["role"] for r in out["rows"]} == {
        a: "rerun", str(tasks["b"]["id"]): "downstream", str(tasks["c"]["id"]): "downstream",
    }  # fmt: skip
    assert status_of(conn, d) == "running"
    assert_consistent(conn)


def test_a_parent_failing_during_a_rerun_is_seen(conn, db_url):
    """c requires p (failed) and q (running). q fails while p is rerun: whichever commits
    first, c does not end up waiting behind a failed parent."""
    for q_first in (True, False):
        tasks = create_batch(
            conn, [task_spec("p"), task_spec("q"), task_spec("c", deps=["p", "q"])]
        )
        p, q, c = _ids(tasks, "p", "q", "c")
        conn.execute("SELECT taskrunner.claim_tasks('w1', 10, 60)")
        conn.execute(
            "SELECT * FROM taskrunner.complete_tasks(%s::jsonb)",
            (json.dumps([{"task_id": p, "status": "failure", "failure_reason": "boom"}]),),
        )
        fail_q = (
            "SELECT * FROM taskrunner.complete_tasks(%s::jsonb)",
            (json.dumps([{"task_id": q, "status": "failure", "failure_reason": "q"}]),),
        )
        rerun_p = ("SELECT * FROM taskrunner.rerun_task(%s)", (p,))
        first, second = (fail_q, rerun_p) if q_first else (rerun_p, fail_q)
        with psycopg.connect(db_url, row_factory=dict_row) as tx:
            tx.execute(*first)
            thread, out = _in_thread(db_url, *second)
            _wait_until_blocked(conn, thread)
            tx.commit()
        thread.join(10)
        assert "error" not in out, out
        assert status_of(conn, p) == "pending"
        assert status_of(conn, c) == "failure", q_first
        assert_consistent(conn)


def test_concurrent_reruns_and_cancels_take_turns(conn, db_url):
    """A second rerun of the same task waits for the first and is refused (the task is
    pending by then); a cancel waits for a rerun and cancels the task it moved back."""
    tasks = _graph(conn)
    a, b = _ids(tasks, "a", "b")
    _run(conn, a, "failure")
    with psycopg.connect(db_url, row_factory=dict_row) as tx:
        tx.execute("SELECT * FROM taskrunner.rerun_task(%s)", (a,))
        again, out = _in_thread(db_url, "SELECT * FROM taskrunner.rerun_task(%s)", (a,))
        _wait_until_blocked(conn, again)
        tx.commit()
    again.join(10)
    assert out["error"].sqlstate == "TR409" and "it is pending" in str(out["error"])
    assert_consistent(conn)

    _run(conn, a, "failure")
    with psycopg.connect(db_url, row_factory=dict_row) as tx:
        tx.execute("SELECT * FROM taskrunner.rerun_task(%s)", (a,))
        cancel, out = _in_thread(db_url, "SELECT * FROM taskrunner.cancel_task(%s)", (a,))
        _wait_until_blocked(conn, cancel)
        tx.commit()
    cancel.join(10)
    assert out["rows"][0]["status"] == "canceled"
    assert status_of(conn, b) == "failure"  # failed again, by a's cancel
    assert_consistent(conn)


def test_rerun_of_a_deep_chain_is_one_call(conn):
    """A 300-deep chain that failed at its root comes back whole (set-based: the
    cascade is a recursive query, not a loop per level)."""
    n = 300
    specs = [task_spec("t0")] + [task_spec(f"t{i}", deps=[f"t{i - 1}"]) for i in range(1, n)]
    tasks = create_batch(conn, specs)
    root = str(tasks["t0"]["id"])
    _run(conn, root, "failure")
    assert set(statuses(conn).values()) == {"failure"}

    moved = _rerun_task(conn, root)

    assert len(moved) == n and moved[root] == ("rerun", "pending")
    assert {status for _, status in moved.values()} == {"pending", "waiting"}
    assert_consistent(conn)
