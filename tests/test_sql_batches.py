"""The batch functions the worker and bulk clients use: finish_deliveries (many webhook
outcomes in one call) and complete_tasks (many task outcomes in one UPDATE)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from conftest import create_batch, status_of, task_spec


def _claim(conn, n: int, worker: str = "w1") -> dict[str, dict]:
    rows = conn.execute("SELECT * FROM taskrunner.claim_tasks(%s, %s, 60)", (worker, n)).fetchall()
    return {str(r["task_id"]): r for r in rows}


def _finish(conn, results: list[dict], worker: str = "w1") -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT * FROM taskrunner.finish_deliveries(%s, %s::jsonb)", (worker, json.dumps(results))
    ).fetchall()
    return [(str(r["delivery_id"]), r["status"]) for r in rows]


def test_finish_deliveries_records_a_mixed_batch(conn):
    tasks = create_batch(conn, [task_spec("ok"), task_spec("gave_up"), task_spec("retry")])
    items = _claim(conn, 3)
    delivery = {name: str(items[str(t["id"])]["delivery_id"]) for name, t in tasks.items()}
    unknown = str(uuid.uuid4())
    cancel = [{"url": "http://127.0.0.1:9/cancel", "verb": "delete"}]
    out = _finish(
        conn,
        [
            {
                "delivery_id": delivery["ok"],
                "ok": True,
                "status_code": 200,
                "cancel_actions": cancel,
            },
            {
                "delivery_id": delivery["gave_up"],
                "ok": False,
                "status_code": 500,
                "error": "HTTP 500",
            },
            {
                "delivery_id": delivery["retry"],
                "ok": False,
                "error": "timeout",
                "retry_delay_ms": 60_000,
            },
            {"delivery_id": unknown, "ok": True},
        ],
    )
    assert out == [
        (delivery["ok"], "delivered"),
        (delivery["gave_up"], "failed"),
        (delivery["retry"], "queued"),
        (unknown, "unknown"),
    ]
    ok = conn.execute(
        "SELECT * FROM taskrunner.task WHERE id = %s", (tasks["ok"]["id"],)
    ).fetchone()
    assert ok["status"] == "running" and ok["started_at"] is not None
    actions = conn.execute(
        "SELECT verb FROM taskrunner.action WHERE task_id = %s AND event = 'cancel'",
        (tasks["ok"]["id"],),
    ).fetchall()
    assert [a["verb"] for a in actions] == ["DELETE"]
    failed = conn.execute(
        "SELECT * FROM taskrunner.task WHERE id = %s", (tasks["gave_up"]["id"],)
    ).fetchone()
    assert failed["status"] == "failure"
    assert failed["failure_reason"] == "start webhook failed: HTTP 500"
    assert status_of(conn, tasks["retry"]["id"]) == "running"
    attempts = conn.execute("SELECT count(*) AS n FROM taskrunner.delivery_attempt").fetchone()
    assert attempts["n"] == 3
    # a second report of the same attempts is stale and changes nothing
    again = _finish(conn, [{"delivery_id": delivery["ok"], "ok": True}])
    assert again == [(delivery["ok"], "stale")]


def test_finish_deliveries_of_another_worker_is_stale(conn):
    task = create_batch(conn, [task_spec("a")])["a"]
    (item,) = _claim(conn, 1, worker="w1").values()
    out = _finish(conn, [{"delivery_id": str(item["delivery_id"]), "ok": True}], worker="w2")
    assert out == [(str(item["delivery_id"]), "stale")]
    assert (
        conn.execute(
            "SELECT started_at FROM taskrunner.task WHERE id = %s", (task["id"],)
        ).fetchone()["started_at"]
        is None
    )


def test_complete_tasks_ends_running_tasks_and_propagates(conn):
    tasks = create_batch(
        conn,
        [task_spec("a"), task_spec("b"), task_spec("child", deps=["a"]), task_spec("idle")],
    )
    conn.execute("SELECT taskrunner.pause_task(%s)", (tasks["idle"]["id"],))
    _claim(conn, 2)
    results = [
        {"task_id": str(tasks["a"]["id"]), "status": "success"},
        {"task_id": str(tasks["b"]["id"]), "status": "failure", "failure_reason": "no"},
        {"task_id": str(tasks["idle"]["id"]), "status": "success"},
    ]
    rows = conn.execute(
        "SELECT * FROM taskrunner.complete_tasks(%s::jsonb)", (json.dumps(results),)
    ).fetchall()
    assert [(r["completed"], r["status"]) for r in rows] == [
        (True, "success"),
        (True, "failure"),
        (False, "paused"),
    ]
    assert status_of(conn, tasks["child"]["id"]) == "pending"
    b = conn.execute("SELECT * FROM taskrunner.task WHERE id = %s", (tasks["b"]["id"],)).fetchone()
    assert b["failure_reason"] == "no"
    history = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history"
        " WHERE to_status IN ('success', 'failure')"
    ).fetchone()
    assert history["n"] == 2


@pytest.mark.parametrize(
    "result",
    [
        {"status": "success"},
        {"task_id": "x", "status": "running"},
        {"task_id": "x", "status": "failure"},
    ],
)
def test_complete_tasks_rejects_bad_input(conn, result):
    if result.get("task_id"):
        result["task_id"] = str(uuid.uuid4())
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM taskrunner.complete_tasks(%s::jsonb)", (json.dumps([result]),))
    assert err.value.sqlstate == "TR400"
