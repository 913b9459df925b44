"""Dead-end cancellation (settings.dead_end_cancel, off by default) and the PATCH fields of
ArcRun (priority, merged metadata) at the SQL level."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from conftest import create_batch, status_of, statuses, task_spec, webhook

DEAD_END = "dead end: every child task has ended"


def dead_end_cancel(conn, on: bool = True) -> None:
    conn.execute("UPDATE taskrunner.settings SET dead_end_cancel = %s", (on,))


def cancel(conn, task_id):
    conn.execute("SELECT taskrunner.cancel_task(%s)", (task_id,))


def reason_of(conn, task_id):
    return conn.execute(
        "SELECT status_reason FROM taskrunner.task WHERE id = %s", (task_id,)
    ).fetchone()["status_reason"]


def fan_in(conn):
    """a1, a2, a3 (pending) -> b (waiting, requires success of all three)."""
    return create_batch(
        conn,
        [
            task_spec("a1"),
            task_spec("a2"),
            task_spec("a3"),
            task_spec("b", deps=["a1", "a2", "a3"]),
        ],
    )


def test_off_by_default_nothing_is_canceled_upward(conn):
    assert conn.execute("SELECT dead_end_cancel FROM taskrunner.settings").fetchone() == {
        "dead_end_cancel": False
    }
    t = fan_in(conn)
    cancel(conn, t["a2"]["id"])
    assert statuses(conn) == {"a1": "pending", "a2": "canceled", "a3": "pending", "b": "failure"}


def test_siblings_of_a_failed_parent_are_canceled_when_their_only_child_failed(conn):
    dead_end_cancel(conn)
    t = fan_in(conn)
    cancel(conn, t["a2"]["id"])
    assert statuses(conn) == {
        "a1": "canceled",
        "a2": "canceled",
        "a3": "canceled",
        "b": "failure",
    }
    assert reason_of(conn, t["a1"]["id"]) == DEAD_END
    history = conn.execute(
        "SELECT from_status::text, to_status::text, reason FROM taskrunner.task_history "
        "WHERE task_id = %s ORDER BY id",
        (t["a3"]["id"],),
    ).fetchall()
    assert history[-1] == {"from_status": "pending", "to_status": "canceled", "reason": DEAD_END}


def test_a_parent_with_one_child_still_live_is_untouched(conn):
    dead_end_cancel(conn)
    t = create_batch(
        conn, [task_spec("a"), task_spec("b", deps=[("a", False)]), task_spec("c", deps=["a"])]
    )
    cancel(conn, t["b"]["id"])
    assert statuses(conn) == {"a": "pending", "b": "canceled", "c": "waiting"}
    cancel(conn, t["c"]["id"])  # now every child has ended
    assert statuses(conn) == {"a": "canceled", "b": "canceled", "c": "canceled"}


def test_a_parent_kept_alive_through_another_branch_stays(conn):
    """p -> q -> s and p -> r -> t: s ends, so q is a dead end; p still has r, whose child
    t is live, so p and r stay. Then t ends: r, then p, are dead ends."""
    dead_end_cancel(conn)
    t = create_batch(
        conn,
        [
            task_spec("p"),
            task_spec("q", deps=[("p", False)]),
            task_spec("r", deps=[("p", False)]),
            task_spec("s", deps=[("q", False)]),
            task_spec("t", deps=[("r", False)]),
        ],
    )
    cancel(conn, t["s"]["id"])
    assert statuses(conn) == {
        "p": "pending",
        "q": "canceled",
        "r": "waiting",
        "s": "canceled",
        "t": "waiting",
    }
    cancel(conn, t["t"]["id"])
    assert set(statuses(conn).values()) == {"canceled"}


def test_branches_that_end_in_one_statement_are_walked_together(conn):
    """p -> q -> s and p -> r -> t; s and t end in one UPDATE (a DBA's): q, r and p are
    dead ends (p's two children both end in the same walk)."""
    dead_end_cancel(conn)
    t = create_batch(
        conn,
        [
            task_spec("p"),
            task_spec("q", deps=[("p", False)]),
            task_spec("r", deps=[("p", False)]),
            task_spec("s", deps=[("q", False)]),
            task_spec("t", deps=[("r", False)]),
        ],
    )
    conn.execute(
        "UPDATE taskrunner.task SET status = 'canceled' WHERE id = ANY(%s)",
        ([t["s"]["id"], t["t"]["id"]],),
    )
    assert set(statuses(conn).values()) == {"canceled"}
    assert reason_of(conn, t["p"]["id"]) == DEAD_END


def test_a_task_without_children_is_never_a_dead_end(conn):
    dead_end_cancel(conn)
    t = create_batch(conn, [task_spec("a"), task_spec("lone")])
    cancel(conn, t["a"]["id"])
    assert statuses(conn) == {"a": "canceled", "lone": "pending"}


@pytest.mark.parametrize("barrier", [False, True])
def test_the_walk_goes_upward_and_a_barrier_stops_it(conn, barrier):
    """g -> a -> b (links not requiring success, so nothing cascades downward): b ends, a
    is a dead end; g is one too unless a is a barrier (canceled itself, but its parents
    are not looked at)."""
    dead_end_cancel(conn)
    t = create_batch(
        conn,
        [
            task_spec("g"),
            task_spec("a", deps=[("g", False)], dead_end_barrier=barrier),
            task_spec("b", deps=[("a", False)]),
        ],
    )
    assert t["a"]["dead_end_barrier"] is barrier
    cancel(conn, t["b"]["id"])
    assert statuses(conn) == {
        "g": "pending" if barrier else "canceled",
        "a": "canceled",
        "b": "canceled",
    }


def test_a_barrier_that_ends_by_itself_still_starts_a_walk(conn):
    """The barrier stops a walk that cancels it; its own end is like any other's."""
    dead_end_cancel(conn)
    t = create_batch(conn, [task_spec("g"), task_spec("a", deps=["g"], dead_end_barrier=True)])
    cancel(conn, t["a"]["id"])
    assert statuses(conn) == {"g": "canceled", "a": "canceled"}


def test_a_running_dead_end_is_canceled_and_its_cancel_webhooks_fire(conn):
    dead_end_cancel(conn)
    t = create_batch(
        conn,
        [
            task_spec("p", actions=[webhook(), webhook("cancel", url="http://127.0.0.1:9/stop")]),
            task_spec("c", deps=["p"]),
        ],
    )
    conn.execute("SELECT * FROM taskrunner.claim_tasks('w1', 10, 60)")
    assert status_of(conn, t["p"]["id"]) == "running"
    cancel(conn, t["c"]["id"])
    assert status_of(conn, t["p"]["id"]) == "canceled"
    events = conn.execute(
        "SELECT event::text FROM taskrunner.delivery WHERE task_id = %s ORDER BY created_at",
        (t["p"]["id"],),
    ).fetchall()
    assert [e["event"] for e in events] == ["start", "cancel"]


def test_a_deep_chain_is_walked_in_one_statement(conn):
    """t0 (pending) -> t1 -> ... -> t1999 (waiting): canceling the leaf walks 1,999 levels
    up in a loop, not a trigger recursion (which would exhaust the stack)."""
    dead_end_cancel(conn)
    n = 2_000
    specs = [task_spec("t0")] + [
        task_spec(f"t{i}", deps=[(f"t{i - 1}", False)]) for i in range(1, n)
    ]
    t = create_batch(conn, specs)
    cancel(conn, t[f"t{n - 1}"]["id"])
    counts = conn.execute(
        "SELECT status::text, count(*) AS n FROM taskrunner.task GROUP BY 1"
    ).fetchall()
    assert counts == [{"status": "canceled", "n": n}]


def recheck(conn) -> int:
    return conn.execute("SELECT taskrunner.recheck_dead_ends() AS n").fetchone()["n"]


def queued(conn) -> set:
    rows = conn.execute("SELECT task_id FROM taskrunner.dead_end_recheck").fetchall()
    return {r["task_id"] for r in rows}


def test_a_parent_held_by_another_transaction_is_queued_not_waited_for(db_url, conn):
    """A parent locked elsewhere (here: a report on it, in an open transaction) is not
    waited for (that could deadlock with the other's propagation into our children): it is
    queued, and the housekeeping's recheck cancels it once the lock is gone."""
    dead_end_cancel(conn)
    t = create_batch(conn, [task_spec("p"), task_spec("c", deps=["p"])])
    conn.execute("SELECT * FROM taskrunner.claim_tasks('w1', 10, 60)")
    with psycopg.connect(db_url) as other:
        other.execute("SELECT taskrunner.update_task(%s, NULL, 1)", (t["p"]["id"],))
        conn.execute("SET statement_timeout = '5s'")
        cancel(conn, t["c"]["id"])  # returns at once, though p is locked
        assert queued(conn) == {t["p"]["id"]}
        assert recheck(conn) == 0  # still locked: queued again
        assert queued(conn) == {t["p"]["id"]}
        other.commit()
    assert statuses(conn) == {"p": "running", "c": "canceled"}
    assert recheck(conn) == 1
    assert statuses(conn) == {"p": "canceled", "c": "canceled"}
    assert queued(conn) == set()


def test_two_children_ending_in_concurrent_transactions_still_cancel_the_parent(db_url, conn):
    """p -> c1, p -> c2, both canceled in two open transactions: the first walk sees c2
    live (its end is not committed) and keeps p; the second finds p locked by the first and
    queues it. After both commit, the recheck cancels p: no write skew leaves it behind."""
    dead_end_cancel(conn)
    t = create_batch(
        conn, [task_spec("p"), task_spec("c1", deps=["p"]), task_spec("c2", deps=["p"])]
    )
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        first.execute("SELECT taskrunner.cancel_task(%s)", (t["c1"]["id"],))
        second.execute("SET statement_timeout = '5s'")
        second.execute("SELECT taskrunner.cancel_task(%s)", (t["c2"]["id"],))
        first.commit()
        second.commit()
    assert statuses(conn) == {"p": "pending", "c1": "canceled", "c2": "canceled"}
    assert recheck(conn) == 1
    assert statuses(conn)["p"] == "canceled"


def test_the_recheck_does_nothing_when_the_setting_is_off(conn):
    t = create_batch(conn, [task_spec("p")])
    conn.execute("INSERT INTO taskrunner.dead_end_recheck (task_id) VALUES (%s)", (t["p"]["id"],))
    assert recheck(conn) == 0
    assert statuses(conn) == {"p": "pending"} and queued(conn) == set()


# -- PATCH fields: priority, merged metadata --------------------------------------------------


def update(conn, task_id, metadata=None, priority=None):
    return conn.execute(
        "SELECT * FROM taskrunner.update_task(%s, p_metadata => %s::jsonb, p_priority => %s)",
        (task_id, None if metadata is None else json.dumps(metadata), priority),
    ).fetchone()


def running_task(conn, **extra):
    t = create_batch(conn, [task_spec("a", **extra)])["a"]
    conn.execute("SELECT * FROM taskrunner.claim_tasks('w1', 10, 60)")
    return t


def key(conn, kind, priority, rules, metadata):
    return conn.execute(
        "SELECT taskrunner._admission_key(%s, %s, %s::jsonb, %s::jsonb) AS k",
        (kind, priority, json.dumps(rules), json.dumps(metadata)),
    ).fetchone()["k"]


def test_update_task_merges_metadata(conn):
    t = running_task(conn, metadata={"a": 1, "b": {"x": 1}})
    row = update(conn, t["id"], {"b": {"y": 2}, "c": None})
    assert row["metadata"] == {"a": 1, "b": {"y": 2}, "c": None}  # top-level keys replaced
    assert update(conn, t["id"])["metadata"] == {"a": 1, "b": {"y": 2}, "c": None}


def test_update_task_sets_priority_and_the_admission_key_follows(conn):
    t = running_task(conn)
    row = update(conn, t["id"], priority=7)
    assert row["priority"] == 7
    assert row["admission_key"] == key(conn, "k", 7, [], {}) != t["admission_key"]
    with pytest.raises(psycopg.errors.CheckViolation):
        update(conn, t["id"], priority=1001)


def test_a_dbas_priority_change_moves_the_admission_key_too(conn):
    t = create_batch(conn, [task_spec("a")])["a"]
    conn.execute("UPDATE taskrunner.task SET priority = -5 WHERE id = %s", (t["id"],))
    row = conn.execute(
        "SELECT admission_key FROM taskrunner.task WHERE id = %s", (t["id"],)
    ).fetchone()
    assert row["admission_key"] == key(conn, "k", -5, [], {})


def test_a_merge_that_changes_a_rule_field_is_refused_and_one_that_keeps_it_is_not(conn):
    rule = {"kind": "k", "status": "running", "fields": ["tenant"], "max": 2}
    t = running_task(conn, rules=[rule], metadata={"tenant": "t1", "n": 1})
    # the old replace semantics dropped "tenant" here; a merge keeps it
    assert update(conn, t["id"], {"n": 2})["metadata"] == {"tenant": "t1", "n": 2}
    assert update(conn, t["id"], {"tenant": "t1"})["metadata"]["tenant"] == "t1"
    with pytest.raises(psycopg.Error) as err:
        update(conn, t["id"], {"tenant": "t2"})
    assert err.value.sqlstate == "TR409"
    assert err.value.diag.message_detail.startswith("metadata.tenant:")


def test_concurrent_ends_leave_no_dead_end_and_cancel_none_too_early(db_url, conn):
    """Four connections cancel the children of 150 parents (three children each) at once,
    in random order. Afterwards (and one recheck, as the housekeeping does) no unfinished
    task has only ended children, and from the history: every dead-end cancel came after
    each child's end."""
    dead_end_cancel(conn)
    specs = []
    for i in range(150):
        specs.append(task_spec(f"p{i}"))
        specs += [task_spec(f"c{i}.{j}", deps=[(f"p{i}", False)]) for j in range(3)]
    t = create_batch(conn, specs)
    children = [row["id"] for local, row in t.items() if local.startswith("c")]
    random.shuffle(children)

    def cancel_all(ids):
        with psycopg.connect(db_url, autocommit=True) as c:
            for task_id in ids:
                c.execute("SELECT taskrunner.cancel_task(%s)", (task_id,))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(cancel_all, [children[i::4] for i in range(4)]))
    recheck(conn)

    left = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task p "
        "WHERE NOT taskrunner.is_terminal(p.status) "
        "AND EXISTS (SELECT 1 FROM taskrunner.dependency d WHERE d.parent_id = p.id) "
        "AND NOT EXISTS (SELECT 1 FROM taskrunner.dependency d "
        "                JOIN taskrunner.task c ON c.id = d.child_id "
        "                WHERE d.parent_id = p.id AND NOT taskrunner.is_terminal(c.status))"
    ).fetchone()["n"]
    assert left == 0
    early = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history h "
        "JOIN taskrunner.dependency d ON d.parent_id = h.task_id "
        "JOIN taskrunner.task_history ch ON ch.task_id = d.child_id "
        "     AND ch.to_status IN ('success', 'failure', 'canceled') "
        "WHERE h.reason = %s AND ch.at > h.at",
        (DEAD_END,),
    ).fetchone()["n"]
    assert early == 0
    assert set(statuses(conn).values()) == {"canceled"}
