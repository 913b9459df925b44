"""The SQL under the batch routes: batch counts (batch_summary, fold_batch_deltas and the
migration's backfill), stop_batch, set_batch_rules, batch_links and why_not_running.

Counts are checked against a GROUP BY over the tasks themselves; races are forced with two
connections and a held-open transaction, never timing luck."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import create_batch, status_of, task_spec, webhook
from invariants import assert_rule_respected
from procs import wait_for
from psycopg.rows import dict_row

from taskrunner import migrate

COUNTED = ("waiting", "pending", "claimed", "running", "success", "failure", "paused", "canceled")
# What batch_summary must say, computed the slow way: a GROUP BY over every task.
TRUTH = f"""
SELECT batch_id, count(*) AS total_tasks, array_agg(DISTINCT kind ORDER BY kind) AS kinds,
       min(created_at) AS first_created_at, max(last_updated) AS latest_updated_at,
       sum(success)::bigint AS total_success, sum(failures)::bigint AS total_failures,
       {
    ", ".join(
        f"count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = '{b}') AS {b}"
        for b in COUNTED
    )
}
FROM taskrunner.task GROUP BY batch_id
"""
SUMMARY_COLUMNS = (
    "batch_id, total_tasks, kinds, first_created_at, latest_updated_at, total_success, "
    "total_failures, " + ", ".join(COUNTED)
)


def summaries(conn) -> dict:
    rows = conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM taskrunner.batch_summary").fetchall()
    return {r["batch_id"]: r for r in rows}


def truth(conn) -> dict:
    return {r["batch_id"]: r for r in conn.execute(TRUTH).fetchall()}


def claim(conn, n: int = 10, worker: str = "w") -> list[dict]:
    return conn.execute("SELECT * FROM taskrunner.claim_tasks(%s, %s, 60)", (worker, n)).fetchall()


def ack_start(conn, item: dict, worker: str = "w", cancel: list | None = None) -> None:
    conn.execute(
        "SELECT taskrunner.finish_delivery(%s, %s, true, 200, NULL, NULL, %s::jsonb)",
        (item["delivery_id"], worker, json.dumps(cancel) if cancel else None),
    )


def batch_of(tasks: dict) -> uuid.UUID:
    return next(iter(tasks.values()))["batch_id"]


def rule(max_: int, fields: tuple[str, ...] = ("tenant",), kind: str = "k") -> dict:
    return {"kind": kind, "status": "running", "fields": list(fields), "max": max_}


@pytest.fixture
def other(db_url: str) -> Iterator[psycopg.Connection]:
    """A second connection with explicit transactions (to hold one open)."""
    with psycopg.connect(db_url, row_factory=dict_row) as c:
        yield c


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # handed to the test, which re-raises it
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until_blocked(conn, text: str) -> None:
    """Until a backend running a query containing ``text`` waits for a row lock."""
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND strpos(query, %s) > 0",
            (text,),
        ).fetchone()["n"],
        timeout=10,
        message=f"{text} to wait for a lock",
    )


def joined(thread: threading.Thread, out: dict) -> Any:
    thread.join(10)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- counts ----------------------------------------------------------------------------


def _busy_batches(conn) -> None:
    """Two batches with a task in every state, counters, a cascade and a DBA's UPDATE."""
    a = create_batch(
        conn,
        [
            task_spec("a1", kind="k"),
            task_spec("a2", kind="j", deps=["a1"]),
            task_spec("a3", kind="k"),
            task_spec("a4", kind="k"),
            task_spec("a5", kind="j", deps=["a4"]),
            task_spec("a6", kind="k", deps=["a5"]),
            task_spec("a7", kind="k"),
        ],
    )
    b = create_batch(
        conn, [task_spec("b1", kind="x"), task_spec("b2", kind="x", deps=["b1"]), task_spec("b3")]
    )
    conn.execute("SELECT taskrunner.pause_task(%s)", (b["b3"]["id"],))
    items = {i["task_id"]: i for i in claim(conn, 4)}
    assert set(items) == {a[k]["id"] for k in ("a1", "a3", "a4", "a7")}
    for k in ("a1", "a3", "a4"):  # a7 stays claimed: its start is not acknowledged
        ack_start(conn, items[a[k]["id"]])
    conn.execute(
        "SELECT taskrunner.add_counters(%s::jsonb)",
        (json.dumps([{"task_id": str(a["a1"]["id"]), "new_success": 7, "new_failures": 2}]),),
    )
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (a["a1"]["id"],))
    conn.execute(  # a5 and a6 fail with it: a cascade
        "SELECT taskrunner.update_task(%s, 'failure', p_failure_reason => 'x')", (a["a4"]["id"],)
    )
    conn.execute(  # a DBA's direct UPDATE is counted like the API's
        "UPDATE taskrunner.task SET status = 'canceled' WHERE id = %s", (a["a2"]["id"],)
    )


def test_batch_summary_matches_the_tasks_before_and_after_a_fold(conn):
    _busy_batches(conn)
    expected = truth(conn)
    assert len(expected) == 2
    assert summaries(conn) == expected
    pending_deltas = conn.execute("SELECT count(*) AS n FROM taskrunner.batch_delta").fetchone()
    assert pending_deltas["n"] > 0
    assert conn.execute("SELECT taskrunner.fold_batch_deltas() AS n").fetchone()["n"] == 2
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.batch_delta").fetchone()["n"] == 0
    assert summaries(conn) == expected
    # every status had a task somewhere, claimed included
    for bucket in ("waiting", "claimed", "running", "success", "failure", "paused", "canceled"):
        assert sum(s[bucket] for s in expected.values()) > 0, bucket


def test_claimed_becomes_running_when_the_start_is_acknowledged(conn):
    batch = batch_of(create_batch(conn, [task_spec("a")]))
    (item,) = claim(conn)
    assert (summaries(conn)[batch]["claimed"], summaries(conn)[batch]["running"]) == (1, 0)
    ack_start(conn, item)
    assert (summaries(conn)[batch]["claimed"], summaries(conn)[batch]["running"]) == (0, 1)


def test_deleted_tasks_leave_the_counts_and_an_emptied_batch_disappears(conn):
    tasks = create_batch(conn, [task_spec("a"), task_spec("b")])
    batch = batch_of(tasks)
    conn.execute("DELETE FROM taskrunner.task WHERE id = %s", (tasks["a"]["id"],))
    assert summaries(conn)[batch]["total_tasks"] == 1
    assert summaries(conn) == truth(conn)
    conn.execute("DELETE FROM taskrunner.task WHERE batch_id = %s", (batch,))
    conn.execute("SELECT taskrunner.fold_batch_deltas()")
    assert summaries(conn) == {}


def test_truncating_the_tasks_empties_the_counts(conn):
    create_batch(conn, [task_spec("a")])
    claim(conn)
    conn.execute(
        "TRUNCATE taskrunner.task, taskrunner.dependency, taskrunner.action, "
        "taskrunner.delivery, taskrunner.delivery_attempt, taskrunner.task_history"
    )
    assert summaries(conn) == {}
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.batch").fetchone()["n"] == 0


def test_a_fold_leaves_deltas_of_open_transactions_for_later(conn, other):
    batch = batch_of(create_batch(conn, [task_spec("a"), task_spec("b")]))
    claim(other, 1)  # open: its delta is not visible yet
    assert conn.execute("SELECT taskrunner.fold_batch_deltas() AS n").fetchone()["n"] == 0
    other.commit()
    assert summaries(conn)[batch]["claimed"] == 1
    assert conn.execute("SELECT taskrunner.fold_batch_deltas() AS n").fetchone()["n"] == 1
    assert summaries(conn) == truth(conn)


def test_the_migration_backfills_existing_tasks(empty_db):
    migrate.migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True, row_factory=dict_row) as c:
        _busy_batches(c)
        expected = truth(c)

    def has_batch_table() -> bool:
        with psycopg.connect(empty_db, autocommit=True) as c:
            return c.execute("SELECT to_regclass('taskrunner.batch')").fetchone()[0] is not None

    while has_batch_table():  # back to before the batch counts: the tasks stay
        migrate.rollback(empty_db)
    migrate.migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True, row_factory=dict_row) as c:
        assert summaries(c) == expected


# -- stop_batch -------------------------------------------------------------------------


def stop(conn, batch) -> dict:
    return conn.execute("SELECT * FROM taskrunner.stop_batch(%s)", (batch,)).fetchone()


def test_stop_batch_cancels_what_has_not_ended_and_counts_by_former_status(conn):
    cancel_hook = webhook(url="http://127.0.0.1:9/cancel")
    tasks = create_batch(
        conn,
        [
            task_spec("done"),
            task_spec("started"),
            task_spec("claimed"),
            task_spec("paused"),
            task_spec("pending", kind="later"),
            task_spec("waiting", deps=["pending"]),
        ],
    )
    outside = create_batch(conn, [task_spec("child", deps=[(tasks["waiting"]["id"], True)])])
    conn.execute(
        "SELECT taskrunner.pause_task(%s)", (tasks["paused"]["id"],)
    )  # before it is claimed
    items = {str(i["task_id"]): i for i in claim(conn, 3)}
    assert set(items) == {str(tasks[k]["id"]) for k in ("done", "started", "claimed")}
    ack_start(conn, items[str(tasks["done"]["id"])])
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (tasks["done"]["id"],))
    ack_start(conn, items[str(tasks["started"]["id"])], cancel=[cancel_hook])

    result = stop(conn, batch_of(tasks))

    assert result == {
        "batch_id": batch_of(tasks),
        "canceled_waiting": 1,
        "canceled_pending": 1,
        "canceled_claimed": 1,
        "canceled_running": 1,
        "canceled_paused": 1,
        "already_terminal": 1,
    }
    history = conn.execute(
        "SELECT t.local_id, h.reason FROM taskrunner.task_history h "
        "JOIN taskrunner.task t ON t.id = h.task_id WHERE h.to_status = 'canceled'"
    ).fetchall()
    assert sorted(h["local_id"] for h in history) == sorted(
        ["started", "claimed", "paused", "pending", "waiting"]
    )
    assert {h["reason"] for h in history} == {"batch stopped"}
    # the started task's cancel webhook went to the outbox; the child in another batch
    # that required the stopped task failed with it
    cancels = conn.execute(
        "SELECT task_id FROM taskrunner.delivery WHERE event = 'cancel' AND status = 'queued'"
    ).fetchall()
    assert [c["task_id"] for c in cancels] == [tasks["started"]["id"]]
    assert status_of(conn, outside["child"]["id"]) == "failure"
    # a second stop finds everything ended
    again = stop(conn, batch_of(tasks))
    assert again["already_terminal"] == 6
    assert sum(v for k, v in again.items() if k.startswith("canceled_")) == 0
    assert summaries(conn) == truth(conn)


def test_stop_unknown_batch_is_tr404(conn):
    with pytest.raises(psycopg.Error) as err:
        stop(conn, uuid.uuid4())
    assert err.value.sqlstate == "TR404"


def test_stop_waits_for_a_claim_in_flight_and_cancels_its_task(conn, other, db_url):
    tasks = create_batch(conn, [task_spec(f"t{i}") for i in range(4)])
    batch = batch_of(tasks)
    (item,) = claim(other, 1)  # held open: the claimed row is locked, not committed

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as third:
        thread, out = in_thread(lambda: stop(third, batch))
        wait_until_blocked(conn, "stop_batch")
        other.commit()
        result = joined(thread, out)

    assert (result["canceled_claimed"], result["canceled_pending"]) == (1, 3)
    assert status_of(conn, item["task_id"]) == "canceled"
    transitions = conn.execute(
        "SELECT from_status::text AS f, to_status::text AS t FROM taskrunner.task_history "
        "WHERE task_id = %s ORDER BY id",
        (item["task_id"],),
    ).fetchall()
    assert [(h["f"], h["t"]) for h in transitions] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "canceled"),
    ]
    # the worker's late start success neither revives the task nor loses its cancel
    ack_start(conn, item, worker="w", cancel=[webhook(url="http://127.0.0.1:9/cancel")])
    assert status_of(conn, item["task_id"]) == "canceled"
    queued = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.delivery WHERE task_id = %s AND event = 'cancel'",
        (item["task_id"],),
    ).fetchone()
    assert queued["n"] == 1


def test_claims_during_an_open_stop_start_nothing_of_the_batch(conn, other):
    tasks = create_batch(conn, [task_spec(f"t{i}") for i in range(4)])
    stop(other, batch_of(tasks))  # held open
    assert claim(conn) == []  # skips the locked rows, does not wait
    other.commit()
    assert claim(conn) == []
    ran = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history WHERE to_status = 'running'"
    ).fetchone()
    assert ran["n"] == 0
    assert set(status_of(conn, t["id"]) for t in tasks.values()) == {"canceled"}


# -- set_batch_rules -----------------------------------------------------------------------


def set_rules(conn, batch, kind: str, rules: list) -> int:
    return conn.execute(
        "SELECT taskrunner.set_batch_rules(%s, %s, %s::jsonb) AS n",
        (batch, kind, json.dumps(rules)),
    ).fetchone()["n"]


def test_set_rules_splits_the_admission_group_so_the_new_rule_holds(conn):
    # Same kind, priority and (no) rules: one admission group whose head is the older
    # batch. The batch that gets a rule must leave that group, or a claim would admit its
    # tasks under the head's (absent) rules.
    older = create_batch(conn, [task_spec(f"c{i}", metadata={"tenant": "c"}) for i in range(2)])
    batch = batch_of(
        create_batch(conn, [task_spec(f"b{i}", metadata={"tenant": "b"}) for i in range(5)])
    )
    assert set_rules(conn, batch, "k", [rule(2)]) == 5

    claimed = claim(conn, 10)

    by_batch = conn.execute(
        "SELECT batch_id, count(*) AS n FROM taskrunner.task WHERE status = 'running' "
        "GROUP BY batch_id"
    ).fetchall()
    assert {r["batch_id"]: r["n"] for r in by_batch} == {batch_of(older): 2, batch: 2}
    assert len(claimed) == 4
    assert_rule_respected(conn, "k", ["tenant"], 2)


def test_set_rules_is_exact_with_a_claim_in_flight(conn, other, db_url):
    tasks = create_batch(conn, [task_spec(f"t{i}", metadata={"tenant": "a"}) for i in range(5)])
    batch = batch_of(tasks)
    (first,) = claim(other, 1)  # held open under the old (absent) rules

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as third:
        thread, out = in_thread(lambda: set_rules(third, batch, "k", [rule(2)]))
        wait_until_blocked(conn, "set_batch_rules")
        other.commit()
        assert joined(thread, out) == 5  # the running task's rules too

    # one started under the old rules; the new rule (max 2) admits one more, then none
    # until one ends
    assert len(claim(conn, 10)) == 1
    assert claim(conn, 10) == []
    pending = [t for t in tasks.values() if status_of(conn, t["id"]) == "pending"]
    why = conn.execute("SELECT taskrunner.why_not_running(%s) AS w", (pending[0]["id"],))
    assert why.fetchone()["w"] == {
        "reason": "rule",
        "rules": [{"rule": rule(2), "count": 2, "max": 2}],
    }
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (first["task_id"],))
    assert len(claim(conn, 10)) == 1
    assert claim(conn, 10) == []
    peaks = assert_rule_respected(conn, "k", ["tenant"], 2)
    assert peaks == {("a",): 2}


def test_set_rules_empty_list_removes_them_and_wakes_workers(conn, db_url):
    tasks = create_batch(conn, [task_spec(f"t{i}", rules=[rule(1, ())]) for i in range(3)])
    batch = batch_of(tasks)
    assert len(claim(conn, 10)) == 1
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN taskrunner_task")
        assert set_rules(conn, batch, "k", []) == 3  # the running one too
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [
            "taskrunner_task"
        ]
    assert len(claim(conn, 10)) == 2


def test_set_rules_touches_only_unfinished_tasks_of_that_kind(conn):
    tasks = create_batch(
        conn, [task_spec("done", kind="k"), task_spec("open", kind="k"), task_spec("j", kind="j")]
    )
    conn.execute("SELECT taskrunner.cancel_task(%s)", (tasks["done"]["id"],))
    assert set_rules(conn, batch_of(tasks), "k", [rule(3, ())]) == 1
    rules = {
        r["local_id"]: r["rules"]
        for r in conn.execute("SELECT local_id, rules FROM taskrunner.task").fetchall()
    }
    assert rules == {"done": [], "open": [rule(3, ())], "j": []}


def test_set_rules_refuses_fields_missing_from_metadata(conn):
    tasks = create_batch(
        conn,
        [task_spec("a", metadata={"tenant": "x"}), task_spec("b", metadata={"tenant": [1]})],
    )
    with pytest.raises(psycopg.Error) as err:
        set_rules(conn, batch_of(tasks), "k", [rule(1, ("tenant", "region"))])
    assert err.value.sqlstate == "TR400"
    detail = err.value.diag.message_detail
    assert "rules[0].matcher.fields: 'tenant' is not a string, number or boolean" in detail
    assert "rules[0].matcher.fields: 'region' is missing in the metadata of 2 task(s)" in detail
    assert {r["rules"] == [] for r in conn.execute("SELECT rules FROM taskrunner.task")} == {True}


def test_set_rules_unknown_batch_is_tr404(conn):
    with pytest.raises(psycopg.Error) as err:
        set_rules(conn, uuid.uuid4(), "k", [])
    assert err.value.sqlstate == "TR404"


# -- links and why_not_running ---------------------------------------------------------


def test_batch_links_are_the_links_into_the_batch(conn):
    first = create_batch(conn, [task_spec("p")])
    tasks = create_batch(
        conn,
        [
            task_spec("a"),
            task_spec("b", deps=[("a", False), (first["p"]["id"], True)]),
        ],
    )
    links = conn.execute(
        "SELECT parent_id, child_id, requires_success FROM taskrunner.batch_links "
        "WHERE batch_id = %s ORDER BY child_seq, requires_success",
        (batch_of(tasks),),
    ).fetchall()
    b = tasks["b"]["id"]
    assert links == [
        {"parent_id": tasks["a"]["id"], "child_id": b, "requires_success": False},
        {"parent_id": first["p"]["id"], "child_id": b, "requires_success": True},
    ]


def why(conn, task_id) -> Any:
    return conn.execute("SELECT taskrunner.why_not_running(%s) AS w", (task_id,)).fetchone()["w"]


def test_why_not_running_names_parents_rules_or_ready(conn):
    tasks = create_batch(
        conn,
        [
            task_spec("p1", name="first"),
            task_spec("p2", kind="j"),
            task_spec("c", deps=["p1", ("p2", False)]),
            task_spec("solo", kind="s", rules=[rule(1, (), kind="s")]),
            task_spec("solo2", kind="s", rules=[rule(1, (), kind="s")]),
        ],
    )
    claim(conn, 10)  # p1, p2 and one solo run
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (tasks["p2"]["id"],))
    assert why(conn, tasks["c"]["id"]) == {
        "reason": "unfinished_parents",
        "parents": [
            {
                "id": str(tasks["p1"]["id"]),
                "name": "first",
                "status": "running",
                "requires_success": True,
            }
        ],
    }
    blocked = next(
        t
        for k, t in tasks.items()
        if k.startswith("solo") and status_of(conn, t["id"]) == "pending"
    )
    assert why(conn, blocked["id"]) == {
        "reason": "rule",
        "rules": [{"rule": rule(1, (), kind="s"), "count": 1, "max": 1}],
    }
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (tasks["p1"]["id"],))
    assert why(conn, tasks["c"]["id"]) == {"reason": "ready"}
    assert why(conn, tasks["p1"]["id"]) is None
    conn.execute("SELECT taskrunner.pause_task(%s)", (tasks["c"]["id"],))
    assert why(conn, tasks["c"]["id"]) == {"reason": "paused"}
    assert why(conn, uuid.uuid4()) is None
