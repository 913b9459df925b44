"""Who made a change: a DBA's UPDATE in psql, the API and the worker each leave their own
name in the task's ``status_reason`` and in its history (``task_history.actor``), taken
from the session's ``application_name`` (the API and workers set theirs), else its role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import PG_USER, create_batch, task_spec
from falcon import testing
from psycopg.rows import dict_row

from taskrunner import db
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer
from taskrunner.config import Config
from taskrunner.db import QUERIES


@pytest.fixture
def psql(db_url: str) -> Iterator[psycopg.Connection]:
    """A session like a DBA's psql: application_name 'psql'."""
    with psycopg.connect(
        db_url, autocommit=True, row_factory=dict_row, application_name="psql"
    ) as c:
        yield c


def running(conn: psycopg.Connection, local_id: str = "t") -> Any:
    task_id = create_batch(conn, [task_spec(local_id)])[local_id]["id"]
    conn.execute(QUERIES["claim_tasks"], {"worker": "w", "max": 10, "lease_seconds": 60})
    return task_id


def last_change(conn: psycopg.Connection, task_id: Any) -> dict:
    return conn.execute(
        "SELECT h.to_status::text, h.reason, h.actor, t.status_reason "
        "FROM taskrunner.task_history h JOIN taskrunner.task t ON t.id = h.task_id "
        "WHERE h.task_id = %s ORDER BY h.id DESC LIMIT 1",
        (task_id,),
    ).fetchone()


def test_a_dba_update_in_psql_records_psql(psql):
    task_id = running(psql)
    psql.execute("UPDATE taskrunner.task SET status = 'success' WHERE id = %s", (task_id,))

    change = last_change(psql, task_id)
    assert change["status_reason"] == f"set to Success by psql (role {PG_USER})"
    assert change["actor"] == f"psql (role {PG_USER})"


def test_a_dba_failure_keeps_its_reason_and_records_who(psql):
    task_id = running(psql)
    psql.execute(
        "UPDATE taskrunner.task SET status = 'failure', failure_reason = 'bad input' WHERE id = %s",
        (task_id,),
    )

    change = last_change(psql, task_id)
    assert (change["to_status"], change["reason"]) == ("failure", "bad input")
    assert change["actor"] == f"psql (role {PG_USER})"


def test_a_session_without_application_name_records_its_role(conn):
    assert conn.execute("SHOW application_name").fetchone()["application_name"] == ""
    task_id = running(conn)
    conn.execute("SELECT taskrunner.cancel_task(%s)", (task_id,))

    assert last_change(conn, task_id)["actor"] == PG_USER


@pytest.fixture
def api(db_url: str) -> Iterator[testing.TestClient]:
    pool = db.create_pool(db_url, max_size=2, timeout=5)
    pool.open(wait=True)
    buffer = CounterBuffer(pool, interval=3600)
    yield testing.TestClient(create_app(Config(), pool, buffer))
    buffer.close()
    pool.close()


def test_changes_through_the_api_record_the_api(api, conn):
    task_id = running(conn)
    assert api.simulate_patch(f"/task/{task_id}", json={"status": "Success"}).status_code == 200
    other = running(conn, "u")
    assert api.simulate_delete(f"/task/{other}").status_code == 200

    assert last_change(conn, task_id)["actor"] == f"taskrunner-api (role {PG_USER})"
    assert last_change(conn, other)["actor"] == f"taskrunner-api (role {PG_USER})"


def test_an_application_name_in_the_url_wins(db_url: str, conn):
    pool = db.create_pool(f"{db_url}?application_name=billing", max_size=1, timeout=5)
    pool.open(wait=True)
    try:
        with pool.connection() as c:
            name = c.execute("SHOW application_name").fetchone()["application_name"]
    finally:
        pool.close()
    assert name == "billing"


def test_down_migration_restores_the_old_reason(conn):
    # the migration's own down section, as dbmate would run it, then a change
    from taskrunner.migrate import MIGRATIONS_DIR

    (path,) = MIGRATIONS_DIR.glob("*_status_reason_actor.sql")
    down = path.read_text().split("-- migrate:down", 1)[1]
    conn.execute(down)
    task_id = running(conn)
    conn.execute("UPDATE taskrunner.task SET status = 'success' WHERE id = %s", (task_id,))

    reason = conn.execute(
        "SELECT status_reason FROM taskrunner.task WHERE id = %s", (task_id,)
    ).fetchone()["status_reason"]
    assert reason == f"set to success by {PG_USER}"
