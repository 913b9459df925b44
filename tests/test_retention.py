"""Retention outside SQL: the RETENTION_DAYS setting, the workers' housekeeping that
purges with it (a real worker process), and the API's answer to a link that lost its
parent to a purge. The purge itself: tests/test_sql_retention.py."""

from __future__ import annotations

import os

import pytest
from conftest import create_batch, task_spec
from procs import running, wait_for
from test_sql_retention import age, cancel_all

from taskrunner import db
from taskrunner.config import Config


@pytest.mark.parametrize(
    ("raw", "days"), [(None, None), ("", None), ("30", 30.0), ("0.5", 0.5), ("36500", 36500.0)]
)
def test_retention_days_is_off_unless_set(raw, days):
    env = {} if raw is None else {"RETENTION_DAYS": raw}
    assert Config.from_env(env).retention_days == days


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "36501", "a month"])
def test_retention_days_must_be_a_positive_number_of_days(raw):
    with pytest.raises(SystemExit, match="RETENTION_DAYS"):
        Config.from_env({"RETENTION_DAYS": raw})


def test_a_link_to_a_parent_deleted_by_retention_is_bad_input(conn):
    child = create_batch(conn, [task_spec("child")])["child"]["id"]
    with pytest.raises(db.BadInput) as raised, db.wrap_exceptions():
        # what create_batch meets when a purge deleted the parent it links to
        conn.execute(
            "INSERT INTO taskrunner.dependency VALUES (gen_random_uuid(), %s, true)", (child,)
        )
    assert raised.value.details == ["dependencies: a parent task was deleted (retention)"]


def test_a_worker_process_purges_old_batches_when_retention_days_is_set(db_url, conn):
    old = create_batch(conn, [task_spec(f"o{i}") for i in range(3)])
    recent = create_batch(conn, [task_spec("r")])
    for batch in (old, recent):
        cancel_all(conn, next(iter(batch.values()))["batch_id"])
    age(conn, old["o0"]["batch_id"], days=3)
    env = os.environ | {
        "DATABASE_URL": db_url,
        "RETENTION_DAYS": "2",
        "TICK_INTERVAL": "0.2",
        "LOG_LEVEL": "warning",
    }
    tasks = "SELECT count(*) AS n FROM taskrunner.task"

    with running(["worker", "--processes", "1"], env):
        wait_for(lambda: conn.execute(tasks).fetchone()["n"] == 1, message="the purge")

    left = conn.execute("SELECT batch_id FROM taskrunner.batch_summary").fetchall()
    assert left == [{"batch_id": recent["r"]["batch_id"]}]
