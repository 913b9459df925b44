"""One owner per rule (issue 7.4): the SQL functions own the rules the state machine
relies on, with one wording; the API passes their errors on as 400s (tests/test_api.py)."""

from __future__ import annotations

import json

import psycopg
import pytest
from conftest import create_batch, task_spec

REQUIRED = "failure_reason: is required when status is Failure"
ONLY_FAILURE = "failure_reason: only allowed when status is Failure"


def _detail(conn: psycopg.Connection, query: str, params: tuple) -> str:
    with pytest.raises(psycopg.Error) as raised:
        conn.execute(query, params)
    assert raised.value.sqlstate == "TR400"
    return raised.value.diag.message_detail


def _running_task(conn: psycopg.Connection) -> str:
    task = create_batch(conn, [task_spec("t")])["t"]
    conn.execute("SELECT * FROM taskrunner.claim_tasks('w', 1, 60)")
    return str(task["id"])


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [("failure", None, REQUIRED), ("success", "x", ONLY_FAILURE), (None, "x", ONLY_FAILURE)],
)
def test_failure_reason_has_one_rule_and_one_wording(conn, status, reason, expected):
    task_id = _running_task(conn)
    update = _detail(
        conn,
        "SELECT taskrunner.update_task(%s, %s::taskrunner.task_status, NULL, NULL, NULL, %s)",
        (task_id, status, reason),
    )
    assert update == expected
    if status is None:
        return  # complete_tasks always takes a status
    result = {"task_id": task_id, "status": status}
    if reason is not None:
        result["failure_reason"] = reason
    complete = _detail(
        conn, "SELECT * FROM taskrunner.complete_tasks(%s::jsonb)", (json.dumps([result]),)
    )
    assert complete == f"[0].{expected}"
    assert conn.execute(
        "SELECT status::text FROM taskrunner.task WHERE id = %s", (task_id,)
    ).fetchone() == {"status": "running"}


def test_a_cancel_action_without_a_verb_is_refused_not_defaulted_to_post(conn):
    """The worker checks a start response's cancel actions like on_cancel at creation
    (verb required); SQL used to fill a missing verb with POST behind its back."""
    task_id = _running_task(conn)
    (delivery,) = conn.execute(
        "SELECT id FROM taskrunner.delivery WHERE task_id = %s", (task_id,)
    ).fetchall()
    with pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute(
            "SELECT taskrunner.finish_delivery(%s, 'w', true, 200, NULL, NULL, %s::jsonb)",
            (delivery["id"], json.dumps([{"url": "http://127.0.0.1:9/cancel"}])),
        )
    assert conn.execute(
        "SELECT count(*) AS n FROM taskrunner.action WHERE task_id = %s AND event = 'cancel'",
        (task_id,),
    ).fetchone() == {"n": 0}
