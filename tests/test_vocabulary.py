"""taskrunner.vocabulary against the database: the enums, CHECK constraints and column
defaults that SQL owns must say what the Python side says, so the two cannot drift."""

from __future__ import annotations

import re

import psycopg
import pytest

from taskrunner import vocabulary as v


def _enum(conn: psycopg.Connection, name: str) -> tuple[str, ...]:
    row = conn.execute(f"SELECT enum_range(NULL::taskrunner.{name})::text[] AS r").fetchone()
    return tuple(row["r"])


def _check(conn: psycopg.Connection, name: str) -> str:
    row = conn.execute(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conname = %s AND connamespace = 'taskrunner'::regnamespace",
        (name,),
    ).fetchone()
    assert row, f"no constraint {name}"
    return row["def"]


def _range(definition: str) -> tuple[int, int]:
    low = re.search(r">= '?(-?\d+)", definition)
    high = re.search(r"<= '?(-?\d+)", definition)
    assert low and high, definition
    return int(low.group(1)), int(high.group(1))


def _default(conn: psycopg.Connection, table: str, column: str) -> str:
    row = conn.execute(
        "SELECT column_default AS d FROM information_schema.columns"
        " WHERE table_schema = 'taskrunner' AND table_name = %s AND column_name = %s",
        (table, column),
    ).fetchone()
    return row["d"]


def test_enums_match_the_database(conn):
    assert _enum(conn, "task_status") == v.TASK_STATUSES
    assert _enum(conn, "action_event") == v.EVENTS
    assert _enum(conn, "delivery_status") == v.DELIVERY_STATUSES
    assert set(v.TRIGGER_LABELS) == set(v.EVENTS) == set(v.ACTION_FIELDS)
    assert set(v.TRIGGER_LABELS.values()) == set(v.TRIGGERS)


def test_terminal_statuses_match_is_terminal(conn):
    rows = conn.execute(
        "SELECT s::text AS status FROM unnest(enum_range(NULL::taskrunner.task_status)) s"
        " WHERE taskrunner.is_terminal(s)"
    ).fetchall()
    assert {r["status"] for r in rows} == v.TERMINAL_STATUSES


def test_verbs_match_the_check_constraint(conn):
    definition = _check(conn, "action_verb_known")
    assert tuple(re.findall(r"'([A-Z]+)'::text", definition)) == v.VERBS


def test_ranges_and_defaults_match_the_task_table(conn):
    assert _range(_check(conn, "task_timeout_range")) == v.TIMEOUT_SECONDS
    assert _range(_check(conn, "task_priority_range")) == v.PRIORITY_RANGE
    assert _default(conn, "task", "timeout") == str(v.DEFAULT_TIMEOUT_SECONDS)
    assert _default(conn, "task", "priority") == str(v.DEFAULT_PRIORITY)
    assert _default(conn, "task", "max_attempts") == str(v.DEFAULT_MAX_ATTEMPTS)
    assert _default(conn, "task", "backoff_seconds") == str(v.DEFAULT_BACKOFF_SECONDS)
    assert _default(conn, "task", "backoff_max_seconds") == str(v.DEFAULT_BACKOFF_MAX_SECONDS)
    retry = _check(conn, "task_retry_range")
    low, high = v.MAX_ATTEMPTS_RANGE
    assert f"max_attempts >= {low}) AND (max_attempts <= {high}" in retry
    low, high = v.BACKOFF_SECONDS_RANGE
    assert f"backoff_seconds >= ({low})" in retry and f"backoff_max_seconds <= ({high})" in retry


@pytest.mark.parametrize("status", v.TASK_STATUSES)
def test_reported_statuses_are_the_ones_update_task_takes(conn, status):
    """update_task refuses (TR400) a status outside REPORTED_STATUSES before looking for
    the task; the ones inside get as far as "task not found" (TR404)."""
    with pytest.raises(psycopg.Error) as raised:
        conn.execute(
            "SELECT taskrunner.update_task(gen_random_uuid(), %s::taskrunner.task_status,"
            " NULL, NULL, NULL, 'reason')",
            (status,),
        )
    expected = "TR404" if status in v.REPORTED_STATUSES else "TR400"
    if status == "success":
        expected = "TR400"  # a reason is only allowed with failure
    assert raised.value.sqlstate == expected


def test_labels():
    assert v.STATUS_LABELS == (
        "Waiting", "Pending", "Running", "Success", "Failure", "Canceled", "Paused",
    )  # fmt: skip
    assert v.DELIVERY_STATUS_LABELS == (
        "Queued", "InFlight", "Delivered", "Failed", "Canceled", "Expired",
    )  # fmt: skip
    assert v.VERB_LABELS == ("Get", "Post", "Put", "Patch", "Delete")
