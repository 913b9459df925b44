"""POST /task/{id}/rerun and POST /batch/{id}/rerun over HTTP (Falcon's test client, real
database): the answer by role, 404 and 409 with the field named, history of both runs."""

from __future__ import annotations

import uuid

from test_api import assert_error, claim, create, spec
from test_api import buffer as buffer  # noqa: F401 (fixtures, by their fixture names)
from test_api import client as client  # noqa: F401


def _fail(client, conn, task_id: str) -> None:
    claim(conn)
    result = client.simulate_patch(
        f"/task/{task_id}", json={"status": "Failure", "failure_reason": "boom"}
    )
    assert result.status_code == 200, result.text


def test_rerun_task_answers_what_changed(client, conn):
    tasks = create(
        client,
        spec("a"),
        spec("b", dependencies=[{"id": "a"}]),
        spec("d", dependencies=[{"id": "a", "requires_success": False}]),
    )
    a, b, d = (tasks[n]["id"] for n in "abd")
    _fail(client, conn, a)
    assert client.simulate_get(f"/task/{b}").json["status"] == "Failure"

    result = client.simulate_post(f"/task/{a}/rerun")

    assert result.status_code == 200, result.text
    batch_id = tasks["a"]["batch_id"]
    assert result.json == {
        "rerun": [{"id": a, "batch_id": batch_id, "from_status": "Failure", "status": "Pending"}],
        "downstream": [
            {"id": b, "batch_id": batch_id, "from_status": "Failure", "status": "Waiting"}
        ],
        "waiting_again": [
            {"id": d, "batch_id": batch_id, "from_status": "Pending", "status": "Waiting"}
        ],
    }
    task = client.simulate_get(f"/task/{a}").json
    assert task["status"] == "Pending" and task["failure_reason"] is None
    history = client.simulate_get(f"/task/{a}/history").json
    assert [(h["from"], h["to"]) for h in history][-2:] == [
        ("Running", "Failure"),
        ("Failure", "Pending"),
    ]
    assert history[-1]["reason"].startswith("rerun by ") and history[-1]["actor"]

    # a second rerun: the task is pending now
    assert_error(client.simulate_post(f"/task/{a}/rerun"), 409, "status: task is Pending")


def test_rerun_task_refusals(client, conn):
    tasks = create(client, spec("a"), spec("b", dependencies=[{"id": "a"}]))
    a, b = tasks["a"]["id"], tasks["b"]["id"]
    assert_error(client.simulate_post(f"/task/{uuid.uuid4()}/rerun"), 404, "id: no task")
    assert_error(client.simulate_post("/task/nope/rerun"), 404, "id: 'nope' is not a UUID")
    assert_error(
        client.simulate_post(f"/task/{a}/rerun"),
        409,
        "status: task is Pending; only a Failure or Canceled task can be rerun",
    )
    _fail(client, conn, a)
    detail = f"dependencies: task {a} is Failure; rerun it instead"
    body = assert_error(client.simulate_post(f"/task/{b}/rerun"), 409, detail)
    assert a in body["error"]


def test_rerun_batch(client, conn):
    tasks = create(client, spec("a"), spec("b", dependencies=[{"id": "a"}]), spec("c"))
    a, b, c = (tasks[n]["id"] for n in "abc")
    batch_id = tasks["a"]["batch_id"]
    assert_error(client.simulate_post(f"/batch/{batch_id}/rerun"), 409, "status: no task")
    _fail(client, conn, a)
    assert client.simulate_delete(f"/batch/{batch_id}").status_code == 200  # c canceled

    result = client.simulate_post(f"/batch/{batch_id}/rerun")

    assert result.status_code == 200, result.text
    rerun = {t["id"]: (t["from_status"], t["status"]) for t in result.json["rerun"]}
    assert rerun == {
        a: ("Failure", "Pending"),
        b: ("Failure", "Waiting"),
        c: ("Canceled", "Pending"),
    }
    assert result.json["downstream"] == [] and result.json["waiting_again"] == []
    stats = client.simulate_get(f"/batch/{batch_id}").json["status_counts"]
    assert (stats["pending"], stats["waiting"], stats["failure"], stats["canceled"]) == (
        2,
        1,
        0,
        0,
    )
    assert_error(client.simulate_post(f"/batch/{uuid.uuid4()}/rerun"), 404, "id: no batch")
