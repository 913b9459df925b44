"""Retention at the SQL level: taskrunner.purge_finished(older_than, max_tasks) deletes
batches whose tasks all ended long enough ago, with everything of their tasks, in chunks;
and keeps what something still needs."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
from conftest import create_batch, task_spec, webhook
from psycopg.rows import dict_row

# every table that holds rows of a task, by how a row names its task
PER_TASK = {
    "task": "SELECT count(*) AS n FROM taskrunner.task WHERE id = ANY(%s)",
    "dependency": "SELECT count(*) AS n FROM taskrunner.dependency"
    " WHERE parent_id = ANY(%s) OR child_id = ANY(%s)",
    "action": "SELECT count(*) AS n FROM taskrunner.action WHERE task_id = ANY(%s)",
    "delivery": "SELECT count(*) AS n FROM taskrunner.delivery WHERE task_id = ANY(%s)",
    "delivery_attempt": "SELECT count(*) AS n FROM taskrunner.delivery_attempt a"
    " JOIN taskrunner.delivery d ON d.id = a.delivery_id WHERE d.task_id = ANY(%s)",
    "task_history": "SELECT count(*) AS n FROM taskrunner.task_history WHERE task_id = ANY(%s)",
}


def purge(conn, older_than: str = "1 day", max_tasks: int = 1000) -> dict:
    return conn.execute(
        "SELECT * FROM taskrunner.purge_finished(%s::interval, %s)", (older_than, max_tasks)
    ).fetchone()


def age(conn, batch_id, days: int = 2) -> None:
    """Move a batch's past back by ``days``: created and ended that much earlier."""
    conn.execute(
        "UPDATE taskrunner.task SET created_at = created_at - make_interval(days => %s),"
        " ended_at = ended_at - make_interval(days => %s) WHERE batch_id = %s",
        (days, days, batch_id),
    )
    conn.execute(
        "UPDATE taskrunner.batch SET first_created_at = first_created_at"
        " - make_interval(days => %s) WHERE batch_id = %s",
        (days, batch_id),
    )


def cancel_all(conn, batch_id) -> None:
    conn.execute("SELECT * FROM taskrunner.stop_batch(%s)", (batch_id,))


def rows_of(conn, ids: list) -> dict[str, int]:
    return {
        table: conn.execute(q, [ids] * q.count("%s")).fetchone()["n"]
        for table, q in PER_TASK.items()
    }


def run_to_success(conn, task_id) -> None:
    """Start the task, acknowledge the start, complete it, deliver its on_success."""
    for item in conn.execute("SELECT * FROM taskrunner.claim_tasks('w', 10, 60)").fetchall():
        _finish(conn, item)
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (task_id,))
    for item in conn.execute("SELECT * FROM taskrunner.claim_deliveries('w', 10, 60)"):
        _finish(conn, item)


def _finish(conn, item: dict) -> None:
    result = {"delivery_id": str(item["delivery_id"]), "ok": True, "status_code": 200}
    conn.execute("SELECT * FROM taskrunner.finish_deliveries('w', %s)", (json.dumps([result]),))


def test_purges_an_old_batch_with_every_row_of_its_tasks(conn):
    done = webhook("success", url="http://127.0.0.1:9/done")
    old = create_batch(
        conn, [task_spec("a", actions=[webhook(), done]), task_spec("b", deps=["a"])]
    )
    a, b = old["a"]["id"], old["b"]["id"]
    run_to_success(conn, a)
    cancel_all(conn, old["a"]["batch_id"])  # b: waiting -> ... pending -> canceled
    recent = create_batch(conn, [task_spec("r")])
    cancel_all(conn, recent["r"]["batch_id"])
    age(conn, old["a"]["batch_id"])
    before = rows_of(conn, [a, b])
    assert all(before.values()), before  # every kind of row exists, so each delete is tested

    deleted = purge(conn)

    assert rows_of(conn, [a, b]) == dict.fromkeys(PER_TASK, 0)
    assert deleted == {
        "batches": 1,
        "tasks": 2,
        "dependencies": before["dependency"],
        "actions": before["action"],
        "deliveries": before["delivery"],
        "attempts": before["delivery_attempt"],
        "history": before["task_history"],
    }
    summary = "SELECT batch_id FROM taskrunner.{} WHERE batch_id = %s"
    for table in ("batch", "batch_delta", "batch_summary"):
        assert not conn.execute(summary.format(table), (old["a"]["batch_id"],)).fetchall()
    # the batch that ended a moment ago stays, whole
    assert rows_of(conn, [recent["r"]["id"]])["task"] == 1
    assert conn.execute(summary.format("batch_summary"), (recent["r"]["batch_id"],)).fetchall()
    assert purge(conn)["tasks"] == 0


def test_a_batch_with_a_task_not_ended_stays(conn):
    batch = create_batch(conn, [task_spec("done"), task_spec("live"), task_spec("paused")])
    conn.execute("SELECT taskrunner.cancel_task(%s)", (batch["done"]["id"],))
    conn.execute("SELECT taskrunner.pause_task(%s)", (batch["paused"]["id"],))
    age(conn, batch["done"]["batch_id"])
    assert purge(conn, "0 seconds")["tasks"] == 0
    conn.execute("SELECT taskrunner.cancel_task(%s)", (batch["live"]["id"],))
    assert purge(conn, "0 seconds")["tasks"] == 0  # still one paused
    conn.execute("SELECT taskrunner.cancel_task(%s)", (batch["paused"]["id"],))
    assert purge(conn, "0 seconds")["tasks"] == 3


def test_a_batch_whose_last_task_ended_recently_stays(conn):
    batch = create_batch(conn, [task_spec("early"), task_spec("late")])
    cancel_all(conn, batch["early"]["batch_id"])
    conn.execute(
        "UPDATE taskrunner.task SET ended_at = ended_at - interval '2 days' WHERE id = %s",
        (batch["early"]["id"],),
    )
    conn.execute("UPDATE taskrunner.batch SET first_created_at = now() - interval '3 days'")
    assert purge(conn)["tasks"] == 0
    assert purge(conn, "1 minute")["tasks"] == 0
    assert purge(conn, "0 seconds")["tasks"] == 2


def test_each_call_deletes_at_most_max_tasks_oldest_batch_first(conn):
    first = create_batch(conn, [task_spec(f"f{i}") for i in range(3)])
    second = create_batch(conn, [task_spec(f"s{i}") for i in range(2)])
    for batch in (first, second):
        bid = next(iter(batch.values()))["batch_id"]
        cancel_all(conn, bid)
        age(conn, bid)
    age(conn, first["f0"]["batch_id"], days=1)  # first is the older batch

    chunks = [purge(conn, max_tasks=2) for _ in range(4)]

    assert [(c["tasks"], c["batches"]) for c in chunks] == [(2, 0), (2, 1), (1, 1), (0, 0)]
    # the partly purged batch counts what is left of it
    total = "SELECT total_tasks FROM taskrunner.batch_summary"
    assert conn.execute(total).fetchall() == []


def test_a_task_another_batch_depends_on_is_kept_until_that_batch_goes(conn):
    old = create_batch(conn, [task_spec("parent"), task_spec("other")])
    parent = old["parent"]["id"]
    cancel_all(conn, old["parent"]["batch_id"])
    child = create_batch(conn, [task_spec("child", deps=[(parent, False)])])["child"]
    age(conn, old["parent"]["batch_id"])

    assert purge(conn)["tasks"] == 1  # "other"; the child's parent stays
    link = "SELECT * FROM taskrunner.batch_links WHERE child_id = %s"
    assert conn.execute(link, (child["id"],)).fetchone()["parent_id"] == parent
    assert rows_of(conn, [parent])["task"] == 1
    assert purge(conn)["tasks"] == 0

    cancel_all(conn, child["batch_id"])
    age(conn, child["batch_id"])
    assert purge(conn)["tasks"] == 1  # the child: its parent is still needed when picked
    assert purge(conn) | {"dependencies": None} == {
        "batches": 1,
        "tasks": 1,
        "dependencies": None,
        "actions": 1,
        "deliveries": 0,
        "attempts": 0,
        "history": 2,
    }
    assert rows_of(conn, [parent, child["id"]]) == dict.fromkeys(PER_TASK, 0)


def test_a_task_with_a_webhook_still_queued_is_kept(conn):
    done = webhook("success", url="http://127.0.0.1:9/done")
    batch = create_batch(conn, [task_spec("t", actions=[webhook(), done])])
    task = batch["t"]["id"]
    for item in conn.execute("SELECT * FROM taskrunner.claim_tasks('w', 1, 60)").fetchall():
        _finish(conn, item)
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (task,))  # on_success queued
    age(conn, batch["t"]["batch_id"])
    assert purge(conn)["tasks"] == 0
    for item in conn.execute("SELECT * FROM taskrunner.claim_deliveries('w', 1, 60)"):
        _finish(conn, item)
    assert purge(conn)["tasks"] == 1


def test_a_batch_linking_to_a_task_being_purged_keeps_its_parent(db_url, conn):
    # create_batch's link commits while the purge waits for the parent's row lock
    old = create_batch(conn, [task_spec("parent")])
    parent = old["parent"]["id"]
    cancel_all(conn, old["parent"]["batch_id"])
    age(conn, old["parent"]["batch_id"])
    with psycopg.connect(db_url, row_factory=dict_row) as linker:
        child = create_batch(linker, [task_spec("child", deps=[(parent, False)])])["child"]
        result: list[dict] = []
        purger = threading.Thread(target=lambda: result.append(_purge_on_own_connection(db_url)))
        purger.start()
        _wait_until_blocked(conn, "purge_finished")
        linker.commit()
    purger.join(10)
    assert result == [{"tasks": 0}]
    assert conn.execute(
        "SELECT parent_id FROM taskrunner.dependency WHERE child_id = %s", (child["id"],)
    ).fetchone() == {"parent_id": parent}


def test_a_batch_linking_to_a_task_just_purged_is_refused(db_url, conn):
    # the purge deleted the parent but has not committed when create_batch links to it
    old = create_batch(conn, [task_spec("parent")])
    parent = old["parent"]["id"]
    cancel_all(conn, old["parent"]["batch_id"])
    age(conn, old["parent"]["batch_id"])
    with psycopg.connect(db_url, row_factory=dict_row) as purger:
        assert purge(purger)["tasks"] == 1
        errors: list[Exception] = []
        linker = threading.Thread(target=lambda: _link_on_own_connection(db_url, parent, errors))
        linker.start()
        _wait_until_blocked(conn, "create_batch")
        purger.commit()
    linker.join(10)
    assert [e.diag.constraint_name for e in errors] == ["dependency_parent_id_fkey"]
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.task").fetchone()["n"] == 0


def test_one_purge_at_a_time(db_url, conn):
    with psycopg.connect(db_url, row_factory=dict_row) as first:
        assert purge(first)["tasks"] == 0  # holds the purge lock until it commits
        assert set(purge(conn).values()) == {None}


@pytest.mark.parametrize(
    ("older_than", "max_tasks", "detail"),
    [
        ("-1 day", 10, "older_than: must be an interval of 0 or more"),
        ("1 day", 0, "max_tasks: must be 1 or more"),
    ],
)
def test_bad_arguments_are_refused_by_name(conn, older_than, max_tasks, detail):
    with pytest.raises(psycopg.Error) as raised:
        purge(conn, older_than, max_tasks)
    assert raised.value.sqlstate == "TR400"
    assert raised.value.diag.message_detail == detail


# --- two sessions --------------------------------------------------------------------


def _purge_on_own_connection(db_url: str) -> dict:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        return {"tasks": purge(c)["tasks"]}


def _link_on_own_connection(db_url: str, parent, errors: list[Exception]) -> None:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        try:
            create_batch(c, [task_spec("child", deps=[(parent, False)])])
        except psycopg.Error as exc:
            errors.append(exc)


def _wait_until_blocked(conn, function: str) -> None:
    """Until a session of this test's database running ``function`` waits for a lock
    (other tests' databases run the same functions)."""
    query = (
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE %s"
    )
    for _ in range(500):
        if conn.execute(query, (f"%{function}%",)).fetchone()["n"]:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{function} never waited for a lock")
