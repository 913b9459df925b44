"""The state machine at the SQL level: transitions, guards, propagation, history, outbox."""

from __future__ import annotations

import json

import psycopg
import pytest
from conftest import create_batch, status_of, statuses, task_spec, webhook

ALL = ["waiting", "pending", "running", "success", "failure", "canceled", "paused"]
LEGAL = {
    ("waiting", "pending"),
    ("waiting", "paused"),
    ("waiting", "canceled"),
    ("waiting", "failure"),
    ("pending", "running"),
    ("pending", "paused"),
    ("pending", "canceled"),
    ("pending", "failure"),
    ("running", "success"),
    ("running", "failure"),
    ("running", "canceled"),
    ("running", "pending"),
    ("paused", "waiting"),
    ("paused", "pending"),
    ("paused", "canceled"),
    ("paused", "failure"),
}


def claim(conn, worker="w1", n=100):
    return conn.execute("SELECT * FROM taskrunner.claim_tasks(%s, %s, 60)", (worker, n)).fetchall()


def complete(conn, task_id, status="success", reason=None):
    return conn.execute(
        "SELECT * FROM taskrunner.update_task(%s, %s::taskrunner.task_status, "
        "NULL, NULL, NULL, %s)",
        (task_id, status, reason),
    ).fetchone()


def history(conn, task_id):
    rows = conn.execute(
        "SELECT from_status::text, to_status::text, reason FROM taskrunner.task_history "
        "WHERE task_id = %s ORDER BY id",
        (task_id,),
    ).fetchall()
    return [(r["from_status"], r["to_status"]) for r in rows]


def force_status(conn, task_id, status):
    """Put a task into any status, bypassing the guard, for the transition table test."""
    with conn.transaction():
        conn.execute("ALTER TABLE taskrunner.task DISABLE TRIGGER USER")
        conn.execute(
            "UPDATE taskrunner.task SET status = %s::taskrunner.task_status, "
            "failure_reason = 'x' WHERE id = %s",
            (status, task_id),
        )
        conn.execute("ALTER TABLE taskrunner.task ENABLE TRIGGER USER")


@pytest.mark.parametrize("src", ALL)
@pytest.mark.parametrize("dst", ALL)
def test_transition_table_is_enforced_for_direct_updates(conn, src, dst):
    if src == dst:
        return
    t = create_batch(conn, [task_spec("a")])["a"]
    force_status(conn, t["id"], src)
    stmt = (
        "UPDATE taskrunner.task SET status = %s::taskrunner.task_status, "
        "failure_reason = 'r' WHERE id = %s"
    )
    if (src, dst) in LEGAL:
        conn.execute(stmt, (dst, t["id"]))
        assert status_of(conn, t["id"]) == dst
    else:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(stmt, (dst, t["id"]))
        assert err.value.sqlstate == "TR409"
        assert f"{src} -> {dst}" in str(err.value)
        assert status_of(conn, t["id"]) == src


def test_new_tasks_wait_for_dependencies(conn):
    tasks = create_batch(conn, [task_spec("b", deps=["a"]), task_spec("a")])
    assert statuses(conn) == {"a": "pending", "b": "waiting"}
    assert tasks["b"]["deps_total"] == 1
    assert history(conn, tasks["a"]["id"]) == [(None, "pending")]


def test_pending_requires_finished_dependencies(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    with pytest.raises(psycopg.Error) as err:
        conn.execute("UPDATE taskrunner.task SET status = 'pending' WHERE id = %s", (t["b"]["id"],))
    assert err.value.sqlstate == "TR409"
    assert "unfinished dependencies" in str(err.value)


def test_success_makes_child_pending_and_queues_on_success(conn):
    t = create_batch(
        conn,
        [
            task_spec("a", actions=[webhook(), webhook("success", "http://127.0.0.1:9/ok")]),
            task_spec("b", deps=["a"]),
        ],
    )
    assert [r["task_id"] for r in claim(conn)] == [t["a"]["id"]]
    complete(conn, t["a"]["id"])
    assert statuses(conn) == {"a": "success", "b": "pending"}
    b = conn.execute("SELECT * FROM taskrunner.task WHERE id = %s", (t["b"]["id"],)).fetchone()
    assert (b["deps_finished"], b["deps_succeeded"]) == (1, 1)
    queued = conn.execute(
        "SELECT event::text, status::text FROM taskrunner.delivery "
        "WHERE task_id = %s AND event <> 'start'",
        (t["a"]["id"],),
    ).fetchall()
    assert queued == [{"event": "success", "status": "queued"}]


def test_failure_fails_required_children_transitively_and_counts_optional(conn):
    t = create_batch(
        conn,
        [
            task_spec("a"),
            task_spec(
                "req",
                deps=[("a", True)],
                actions=[webhook(), webhook("failure", "http://127.0.0.1:9/f")],
            ),
            task_spec("grandchild", deps=[("req", True)]),
            task_spec("opt", deps=[("a", False)]),
            task_spec("after_req_opt", deps=[("req", False)]),
        ],
    )
    claim(conn)
    complete(conn, t["a"]["id"], "failure", "boom")
    assert statuses(conn) == {
        "a": "failure",
        "req": "failure",
        "grandchild": "failure",
        "opt": "pending",
        "after_req_opt": "pending",
    }
    reason = conn.execute(
        "SELECT failure_reason FROM taskrunner.task WHERE id = %s", (t["grandchild"]["id"],)
    ).fetchone()["failure_reason"]
    assert reason == f"dependency {t['req']['id']} failed"
    fired = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.delivery WHERE task_id = %s AND event = 'failure'",
        (t["req"]["id"],),
    ).fetchone()["n"]
    assert fired == 1


def test_cancel_fails_required_children_and_fires_cancel_actions_only_when_running(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"]), task_spec("c")])
    items = {r["task_id"]: r for r in claim(conn)}
    # the start answered with a cancel action for a
    conn.execute(
        "SELECT taskrunner.finish_delivery(%s, 'w1', true, 200, NULL, NULL, %s::jsonb)",
        (
            items[t["a"]["id"]]["delivery_id"],
            json.dumps([{"url": "http://127.0.0.1:9/cancel", "verb": "DELETE"}]),
        ),
    )
    conn.execute("SELECT taskrunner.cancel_task(%s)", (t["a"]["id"],))
    assert statuses(conn)["b"] == "failure"
    cancel = conn.execute(
        "SELECT d.status::text, a.url, a.verb FROM taskrunner.delivery d "
        "JOIN taskrunner.action a ON a.id = d.action_id "
        "WHERE d.event = 'cancel'"
    ).fetchall()
    assert cancel == [{"status": "queued", "url": "http://127.0.0.1:9/cancel", "verb": "DELETE"}]


def test_cancel_pause_resume_guards(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    conn.execute("SELECT taskrunner.pause_task(%s)", (t["b"]["id"],))
    assert status_of(conn, t["b"]["id"]) == "paused"
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT taskrunner.pause_task(%s)", (t["b"]["id"],))
    assert err.value.sqlstate == "TR409"
    conn.execute("SELECT taskrunner.resume_task(%s)", (t["b"]["id"],))
    assert status_of(conn, t["b"]["id"]) == "waiting"
    conn.execute("SELECT taskrunner.cancel_task(%s)", (t["b"]["id"],))
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT taskrunner.cancel_task(%s)", (t["b"]["id"],))
    assert err.value.sqlstate == "TR409"
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT taskrunner.cancel_task(gen_random_uuid())")
    assert err.value.sqlstate == "TR404"


def test_paused_child_keeps_counters_and_resumes_into_right_state(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    conn.execute("SELECT taskrunner.pause_task(%s)", (t["b"]["id"],))
    claim(conn)
    complete(conn, t["a"]["id"])
    assert status_of(conn, t["b"]["id"]) == "paused"
    assert claim(conn) == []  # paused tasks are never claimed
    conn.execute("SELECT taskrunner.resume_task(%s)", (t["b"]["id"],))
    assert status_of(conn, t["b"]["id"]) == "pending"


def test_paused_child_fails_when_required_parent_fails(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    conn.execute("SELECT taskrunner.pause_task(%s)", (t["b"]["id"],))
    claim(conn)
    complete(conn, t["a"]["id"], "failure", "boom")
    assert status_of(conn, t["b"]["id"]) == "failure"


def test_second_completion_is_409_and_never_propagates_twice(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=[("a", False)])])
    claim(conn)
    complete(conn, t["a"]["id"])
    with pytest.raises(psycopg.Error) as err:
        complete(conn, t["a"]["id"], "failure", "again")
    assert err.value.sqlstate == "TR409"
    with pytest.raises(psycopg.Error):
        conn.execute("UPDATE taskrunner.task SET status = 'failure' WHERE id = %s", (t["a"]["id"],))
    # re-setting the same status is a no-op for a DBA's bulk UPDATE: no second propagation
    conn.execute("UPDATE taskrunner.task SET status = 'success' WHERE id = %s", (t["a"]["id"],))
    b = conn.execute(
        "SELECT deps_finished FROM taskrunner.task WHERE id = %s", (t["b"]["id"],)
    ).fetchone()
    assert b["deps_finished"] == 1


def test_dba_update_propagates_like_the_api(conn):
    t = create_batch(
        conn, [task_spec("a", actions=[webhook(), webhook("success")]), task_spec("b", deps=["a"])]
    )
    claim(conn)
    conn.execute("UPDATE taskrunner.task SET status = 'success' WHERE id = %s", (t["a"]["id"],))
    assert statuses(conn) == {"a": "success", "b": "pending"}
    assert history(conn, t["a"]["id"])[-1] == ("running", "success")
    n = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.delivery WHERE event = 'success'"
    ).fetchone()["n"]
    assert n == 1


def test_update_task_only_on_running(conn):
    t = create_batch(conn, [task_spec("a")])
    with pytest.raises(psycopg.Error) as err:
        complete(conn, t["a"]["id"])
    assert err.value.sqlstate == "TR409"
    claim(conn)
    with pytest.raises(psycopg.Error) as err:
        complete(conn, t["a"]["id"], "failure")  # no reason
    assert err.value.sqlstate == "TR400"
    row = conn.execute(
        "SELECT * FROM taskrunner.update_task(%s, NULL, 3, 4, '{\"x\": 1}')", (t["a"]["id"],)
    ).fetchone()
    assert (row["success"], row["failures"], row["metadata"]) == (3, 4, {"x": 1})
    assert row["status"] == "running"


def test_dependency_on_existing_tasks(conn):
    done = create_batch(conn, [task_spec("ok"), task_spec("bad"), task_spec("live")])
    claim(conn)
    complete(conn, done["ok"]["id"])
    complete(conn, done["bad"]["id"], "failure", "x")
    t = create_batch(
        conn,
        [
            task_spec("after_ok", deps=[str(done["ok"]["id"])]),
            task_spec("after_bad", deps=[str(done["bad"]["id"])]),
            task_spec("after_bad_child", deps=["after_bad"]),
            task_spec("after_bad_optional", deps=[(str(done["bad"]["id"]), False)]),
            task_spec("after_live", deps=[str(done["live"]["id"])]),
        ],
    )
    assert {k: v["status"] for k, v in t.items()} == {
        "after_ok": "pending",
        "after_bad": "failure",
        "after_bad_child": "failure",
        "after_bad_optional": "pending",
        "after_live": "waiting",
    }
    complete(conn, done["live"]["id"])
    assert status_of(conn, t["after_live"]["id"]) == "pending"


def test_unknown_dependency_rejects_whole_batch(conn):
    with pytest.raises(psycopg.Error) as err:
        create_batch(
            conn, [task_spec("a"), task_spec("b", deps=["00000000-0000-0000-0000-000000000001"])]
        )
    assert err.value.sqlstate == "TR400"
    assert "[1].dependencies: unknown task" in err.value.diag.message_detail
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.task").fetchone()["n"] == 0


def test_dedupe_skips_and_redirects_dependencies(conn):
    first = create_batch(conn, [task_spec("x", metadata={"tenant": "t1"})])["x"]
    dedupe = [{"kind": "k", "status": "pending", "fields": ["tenant"]}]
    t = create_batch(
        conn,
        [
            task_spec("x2", metadata={"tenant": "t1"}, dedupe=dedupe),
            task_spec("y", metadata={"tenant": "t2"}, dedupe=dedupe),
            task_spec("after", deps=["x2"]),
        ],
    )
    assert set(t) == {"y", "after"}
    parent = conn.execute(
        "SELECT parent_id FROM taskrunner.dependency WHERE child_id = %s", (t["after"]["id"],)
    ).fetchone()["parent_id"]
    assert parent == first["id"]


def test_timeout_via_tick(conn):
    t = create_batch(conn, [task_spec("a", timeout=1, actions=[webhook(), webhook("failure")])])
    claim(conn)
    conn.execute(
        "UPDATE taskrunner.task SET last_updated = now() - interval '5 s' WHERE id = %s",
        (t["a"]["id"],),
    )
    result = conn.execute("SELECT taskrunner.tick() AS r").fetchone()["r"]
    assert result["timed_out"] == 1
    row = conn.execute("SELECT status::text, failure_reason FROM taskrunner.task").fetchone()
    assert row == {"status": "failure", "failure_reason": "Timeout"}
    assert (
        conn.execute(
            "SELECT count(*) AS n FROM taskrunner.delivery WHERE event = 'failure'"
        ).fetchone()["n"]
        == 1
    )


def test_expired_start_lease_returns_task_to_pending(conn):
    t = create_batch(conn, [task_spec("a")])
    claim(conn)
    conn.execute("UPDATE taskrunner.delivery SET lease_until = now() - interval '1 s'")
    assert conn.execute("SELECT taskrunner.tick() AS r").fetchone()["r"]["expired_leases"] == 1
    assert status_of(conn, t["a"]["id"]) == "pending"
    attempts = conn.execute("SELECT error FROM taskrunner.delivery_attempt").fetchall()
    assert attempts == [{"error": "lease expired (worker gone?)"}]
    again = claim(conn, "w2")
    assert [r["task_id"] for r in again] == [t["a"]["id"]]


def test_start_outcomes(conn):
    t = create_batch(
        conn,
        [
            task_spec("ok"),
            task_spec("bad", actions=[webhook(), webhook("failure")]),
            task_spec("late"),
        ],
    )
    items = {r["task_id"]: r for r in claim(conn)}
    finish = "SELECT taskrunner.finish_delivery(%s, 'w1', %s, %s, %s, %s) AS s"
    ok = conn.execute(finish, (items[t["ok"]["id"]]["delivery_id"], True, 200, None, None))
    assert ok.fetchone()["s"] == "delivered"
    assert (
        conn.execute(
            "SELECT started_at FROM taskrunner.task WHERE id = %s", (t["ok"]["id"],)
        ).fetchone()["started_at"]
        is not None
    )
    retry = conn.execute(
        finish, (items[t["bad"]["id"]]["delivery_id"], False, 503, "HTTP 503", 0)
    ).fetchone()["s"]
    assert retry == "queued"
    again = conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 60)").fetchall()
    assert [(r["task_id"], r["attempt"]) for r in again] == [(t["bad"]["id"], 2)]
    gave_up = conn.execute(finish, (again[0]["delivery_id"], False, None, "timeout", None))
    assert gave_up.fetchone()["s"] == "failed"
    bad = conn.execute(
        "SELECT status::text, failure_reason FROM taskrunner.task WHERE id = %s", (t["bad"]["id"],)
    ).fetchone()
    assert bad == {"status": "failure", "failure_reason": "start webhook failed: timeout"}
    # a fast target completed "late" before its start was recorded: never overridden
    complete(conn, t["late"]["id"])
    conn.execute(finish, (items[t["late"]["id"]]["delivery_id"], True, 200, None, None))
    assert status_of(conn, t["late"]["id"]) == "success"


def test_cancel_while_start_in_flight_fires_cancel_actions_from_the_response(conn):
    t = create_batch(conn, [task_spec("a")])
    item = claim(conn)[0]
    conn.execute("SELECT taskrunner.cancel_task(%s)", (t["a"]["id"],))
    conn.execute(
        "SELECT taskrunner.finish_delivery(%s, 'w1', true, 200, NULL, NULL, %s::jsonb)",
        (item["delivery_id"], json.dumps([{"url": "http://127.0.0.1:9/stop", "verb": "POST"}])),
    )
    rows = conn.execute(
        "SELECT d.status::text FROM taskrunner.delivery d WHERE d.event = 'cancel'"
    ).fetchall()
    assert rows == [{"status": "queued"}]
    assert status_of(conn, t["a"]["id"]) == "canceled"


def test_release_returns_start_to_pending(conn):
    t = create_batch(conn, [task_spec("a")])
    item = claim(conn)[0]
    n = conn.execute(
        "SELECT taskrunner.release_deliveries('w1', %s::uuid[]) AS n", ([item["delivery_id"]],)
    ).fetchone()["n"]
    assert n == 1
    assert status_of(conn, t["a"]["id"]) == "pending"


def test_retry_delivery_requeues_exhausted(conn):
    t = create_batch(conn, [task_spec("a", actions=[webhook(), webhook("success")])])
    claim(conn)
    complete(conn, t["a"]["id"])
    d = conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 60)").fetchone()
    conn.execute(
        "SELECT taskrunner.finish_delivery(%s, 'w1', false, 500, 'HTTP 500', NULL)",
        (d["delivery_id"],),
    )
    row = conn.execute("SELECT * FROM taskrunner.retry_delivery(%s)", (d["delivery_id"],))
    assert row.fetchone()["status"] == "queued"
    # a fresh round: the worker sees attempt 1 again; the history keeps counting
    again = conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 60)").fetchone()
    assert (again["delivery_id"], again["attempt"]) == (d["delivery_id"], 1)
    conn.execute(
        "SELECT taskrunner.finish_delivery(%s, 'w1', false, 500, 'HTTP 500', NULL)",
        (d["delivery_id"],),
    )
    numbers = conn.execute(
        "SELECT attempt FROM taskrunner.delivery_attempt WHERE delivery_id = %s ORDER BY 1",
        (d["delivery_id"],),
    ).fetchall()
    assert [n["attempt"] for n in numbers] == [1, 2]
    conn.execute("SELECT taskrunner.retry_delivery(%s)", (d["delivery_id"],))
    conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 60)")
    conn.execute("SELECT taskrunner.finish_delivery(%s, 'w1', true, 200)", (d["delivery_id"],))
    with pytest.raises(psycopg.Error) as err:  # only a delivery that gave up can be retried
        conn.execute("SELECT taskrunner.retry_delivery(%s)", (d["delivery_id"],))
    assert err.value.sqlstate == "TR409"


def test_add_counters_sums_and_heartbeats(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b")])
    claim(conn)
    updates = [
        {"task_id": str(t["a"]["id"]), "new_success": 2, "new_failures": 1},
        {"task_id": str(t["a"]["id"]), "new_success": 3},
        {"task_id": str(t["b"]["id"]), "new_failures": 7},
    ]
    n = conn.execute(
        "SELECT taskrunner.add_counters(%s::jsonb) AS n", (json.dumps(updates),)
    ).fetchone()["n"]
    assert n == 2
    rows = conn.execute(
        "SELECT local_id, success, failures FROM taskrunner.task ORDER BY local_id"
    ).fetchall()
    assert [(r["success"], r["failures"]) for r in rows] == [(5, 1), (0, 7)]


def test_stats_describe_the_transaction(conn):
    t = create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    claim(conn)
    with conn.transaction():
        complete(conn, t["a"]["id"], "failure", "x")
        stats = conn.execute("SELECT taskrunner.take_stats() AS s").fetchone()["s"]
        again = conn.execute("SELECT taskrunner.take_stats() AS s").fetchone()["s"]
    assert "running>failure>k>1;" in stats
    assert "waiting>failure>k>1;" in stats
    assert "propagation>failure>1;" in stats
    assert again is None


def test_views(conn):
    rule = {"kind": "k", "status": "running", "fields": [], "max": 1}
    create_batch(conn, [task_spec("a", rules=[rule]), task_spec("b", rules=[rule])])
    claim(conn)
    assert len(conn.execute("SELECT * FROM taskrunner.running_tasks").fetchall()) == 1
    blocked = conn.execute("SELECT * FROM taskrunner.blocked_tasks").fetchall()
    assert [(b["name"], b["current_count"], b["max_concurency"]) for b in blocked] == [("b", 1, 1)]
    progress = conn.execute("SELECT * FROM taskrunner.batch_progress").fetchone()
    assert (progress["total"], progress["running"], progress["pending"]) == (2, 1, 1)


def test_deep_chain_fails_in_one_statement(conn):
    n = 10_000
    specs = [task_spec("t0")] + [task_spec(f"t{i}", deps=[f"t{i - 1}"]) for i in range(1, n)]
    t = create_batch(conn, specs)
    claim(conn)
    complete(conn, t["t0"]["id"], "failure", "root failed")
    counts = conn.execute(
        "SELECT status::text, count(*) AS n FROM taskrunner.task GROUP BY 1"
    ).fetchall()
    assert {r["status"]: r["n"] for r in counts} == {"failure": n}
    last = conn.execute(
        "SELECT failure_reason FROM taskrunner.task WHERE local_id = %s", (f"t{n - 1}",)
    ).fetchone()["failure_reason"]
    assert last == f"dependency {t[f't{n - 2}']['id']} failed"


def test_deep_chain_success_moves_one_hop(conn):
    n = 10_000
    specs = [task_spec("t0")] + [task_spec(f"t{i}", deps=[f"t{i - 1}"]) for i in range(1, n)]
    t = create_batch(conn, specs)
    claim(conn)
    complete(conn, t["t0"]["id"])
    counts = conn.execute(
        "SELECT status::text, count(*) AS n FROM taskrunner.task GROUP BY 1"
    ).fetchall()
    assert {r["status"]: r["n"] for r in counts} == {"success": 1, "pending": 1, "waiting": n - 2}


def test_wide_fan_out(conn):
    n = 10_000
    t = create_batch(
        conn, [task_spec("root")] + [task_spec(f"c{i}", deps=["root"]) for i in range(n)]
    )
    claim(conn, n=1)
    complete(conn, t["root"]["id"])
    counts = conn.execute(
        "SELECT status::text, count(*) AS n FROM taskrunner.task GROUP BY 1"
    ).fetchall()
    assert {r["status"]: r["n"] for r in counts} == {"success": 1, "pending": n}
    changes = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history "
        "WHERE from_status = 'waiting' AND to_status = 'pending'"
    ).fetchone()
    assert changes["n"] == n


def test_wide_fan_out_failure(conn):
    n = 10_000
    t = create_batch(
        conn, [task_spec("root")] + [task_spec(f"c{i}", deps=["root"]) for i in range(n)]
    )
    claim(conn, n=1)
    complete(conn, t["root"]["id"], "failure", "x")
    counts = conn.execute(
        "SELECT status::text, count(*) AS n FROM taskrunner.task GROUP BY 1"
    ).fetchall()
    assert {r["status"]: r["n"] for r in counts} == {"failure": n + 1}


def test_late_finish_after_lease_expiry_changes_nothing(conn):
    t = create_batch(conn, [task_spec("a", actions=[webhook(), webhook("success")])])
    claim(conn)
    complete(conn, t["a"]["id"])
    d = conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 1, 1)").fetchone()
    conn.execute(
        "UPDATE taskrunner.delivery SET lease_until = now() - interval '1 s' WHERE id = %s",
        (d["delivery_id"],),
    )
    assert conn.execute("SELECT taskrunner.tick() AS r").fetchone()["r"]["expired_leases"] == 1
    conn.execute("SELECT * FROM taskrunner.claim_deliveries('w2', 1, 60)")
    finish = "SELECT taskrunner.finish_delivery(%s, %s, %s, %s, %s, %s) AS s"
    assert (
        conn.execute(finish, (d["delivery_id"], "w2", True, 200, None, None)).fetchone()["s"]
        == "delivered"
    )
    assert (
        conn.execute(finish, (d["delivery_id"], "w1", False, 503, "HTTP 503", 10)).fetchone()["s"]
        == "stale"
    )
    attempts = conn.execute(
        "SELECT attempt, worker, status_code, error FROM "
        "taskrunner.delivery_attempt ORDER BY attempt"
    ).fetchall()
    assert [(a["attempt"], a["worker"], a["status_code"]) for a in attempts] == [
        (1, "w1", None),
        (2, "w2", 200),
    ]
    status = conn.execute(
        "SELECT status::text FROM taskrunner.delivery WHERE id = %s", (d["delivery_id"],)
    ).fetchone()["status"]
    assert status == "delivered"
