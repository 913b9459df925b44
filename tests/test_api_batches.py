"""The batch routes and a task's history over HTTP (Falcon's test client, real database):
shapes (ArcRun's field names), filters, pagination, 200/400/404 answers."""

from __future__ import annotations

import datetime as dt
import uuid
from urllib.parse import quote

import pytest
from test_api import assert_error, claim, create, spec
from test_api import buffer as buffer  # noqa: F401 (fixtures, by their fixture names)
from test_api import client as client  # noqa: F401

COUNTS = ("waiting", "pending", "claimed", "running", "success", "failure", "paused", "canceled")
RULE = {
    "Concurency": {
        "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
        "max_concurency": 1,
    }
}


def batch(client, *tasks: dict) -> str:
    result = client.simulate_post("/task", json=list(tasks))
    assert result.status_code == 201, result.text
    return result.headers["X-Batch-ID"]


def counts(**nonzero: int) -> dict:
    return {name: nonzero.get(name, 0) for name in COUNTS}


# -- GET /batches ----------------------------------------------------------------------


def test_list_batches_newest_first_with_counts_and_kinds(client, conn):
    first = batch(client, spec("a"), spec("b", kind="j", dependencies=[{"id": "a"}]))
    second = batch(client, spec("c", kind="x"))
    claim(conn, 1)  # a: claimed (its start is not acknowledged)

    result = client.simulate_get("/batches")

    assert result.status_code == 200, result.text
    assert [b["batch_id"] for b in result.json] == [second, first]
    newest, oldest = result.json
    assert set(oldest) == {
        "batch_id",
        "total_tasks",
        "first_created_at",
        "latest_updated_at",
        "status_counts",
        "kinds",
    }
    assert oldest["total_tasks"] == 2
    assert oldest["kinds"] == ["j", "k"]
    assert oldest["status_counts"] == counts(claimed=1, waiting=1)
    assert newest["status_counts"] == counts(pending=1)
    assert dt.datetime.fromisoformat(oldest["latest_updated_at"]) >= dt.datetime.fromisoformat(
        oldest["first_created_at"]
    )


def test_list_batches_filters_and_pagination(client, conn):
    ids = [batch(client, spec(f"t{i}", name=f"job-{i}", kind=f"k{i % 2}")) for i in range(5)]
    client.simulate_patch(f"/task/pause/{_task_of(client, ids[1])}")
    newest_first = ids[::-1]

    def listed(query: str) -> list[str]:
        result = client.simulate_get("/batches", query_string=query)
        assert result.status_code == 200, result.text
        return [b["batch_id"] for b in result.json]

    assert listed("per_page=2") == newest_first[:2]
    assert listed("per_page=2&page=1") == newest_first[2:4]
    assert listed("page_size=2&page=2") == newest_first[4:]
    assert listed("kind=k0") == [ids[4], ids[2], ids[0]]
    assert listed("status=paused") == [ids[1]]
    assert listed("status=Pending&kind=k1") == [ids[3]]
    assert listed("name=job-3") == [ids[3]]
    assert listed("name=nothing-like-it") == []
    created = _created_at(client, ids[2])
    assert listed(f"created_after={quote(created.isoformat())}") == newest_first[:3]
    assert listed(f"created_before={quote(created.isoformat())}") == newest_first[3:]
    naive_utc = created.astimezone(dt.UTC).replace(tzinfo=None).isoformat()
    assert listed(f"created_after={naive_utc}") == newest_first[:3]


def test_list_batches_status_running_includes_claimed(client, conn):
    ids = [batch(client, spec("a")), batch(client, spec("b", kind="other"))]
    claim(conn, 1)
    assert [b["batch_id"] for b in client.simulate_get("/batches?status=Running").json] == [ids[0]]
    assert [b["batch_id"] for b in client.simulate_get("/batches?status=claimed").json] == [ids[0]]


@pytest.mark.parametrize(
    "query, detail",
    [
        ("page=-1", "page: must be between"),
        ("per_page=0", "per_page: must be between"),
        ("status=Done", "status: must be one of"),
        ("created_after=yesterday", "created_after: must be an ISO 8601 date-time"),
        ("created_before=2026-13-01", "created_before: must be an ISO 8601 date-time"),
        ("kind=" + "x" * 201, "kind: must be at most 200 characters"),
        ("name=a%00b", "name: must not contain NUL characters"),
    ],
)
def test_list_batches_rejects_bad_parameters(client, query, detail):
    assert_error(client.simulate_get("/batches", query_string=query), 400, detail)


def _task_of(client, batch_id: str) -> str:
    return client.simulate_get("/task", params={"batch_id": batch_id}).json[0]["id"]


def _created_at(client, batch_id: str) -> dt.datetime:
    (row,) = [b for b in client.simulate_get("/batches").json if b["batch_id"] == batch_id]
    return dt.datetime.fromisoformat(row["first_created_at"])


# -- GET /batch/{id} -------------------------------------------------------------------


def test_get_batch_stats_sum_the_counters(client, conn, buffer):
    batch_id = batch(client, spec("a"), spec("b"))
    items = claim(conn, 2)
    claimed = client.simulate_get(f"/batch/{batch_id}").json["status_counts"]
    assert claimed == counts(claimed=2)  # running, start not acknowledged yet
    for item in items:
        client.simulate_put(f"/task/{item['task_id']}", json={"new_success": 3, "new_failures": 1})
    buffer.flush()
    client.simulate_patch(f"/task/{items[0]['task_id']}", json={"status": "Success"})

    result = client.simulate_get(f"/batch/{batch_id}")

    assert result.status_code == 200, result.text
    assert result.json == {
        "batch_id": batch_id,
        "total_tasks": 2,
        "total_success": 6,
        "total_failures": 2,
        "total_expected": None,
        # a report through the handle acknowledges the start: b counts as running
        "status_counts": counts(running=1, success=1),
        "kinds": ["k"],
        "first_created_at": result.json["first_created_at"],
        "latest_updated_at": result.json["latest_updated_at"],
    }


@pytest.mark.parametrize("path", ["/batch/{}", "/dag/{}"])
def test_unknown_or_malformed_batch_is_404(client, path):
    assert_error(client.simulate_get(path.format(uuid.uuid4())), 404, "id: no batch")
    assert_error(client.simulate_get(path.format("nope")), 404, "id: 'nope' is not a UUID")


def test_stop_or_rules_of_unknown_batch_is_404(client):
    missing = uuid.uuid4()
    assert_error(client.simulate_delete(f"/batch/{missing}"), 404, f"id: no batch {missing}")
    result = client.simulate_patch(f"/batch/{missing}/rules", json={"kind": "k", "rules": []})
    assert_error(result, 404, f"id: no batch {missing}")


# -- DELETE /batch/{id} ----------------------------------------------------------------


def test_stop_batch_returns_counts_per_former_status(client, conn):
    batch_id = batch(
        client,
        spec("done"),
        spec("claimed"),
        spec("later", kind="j"),
        spec("child", dependencies=[{"id": "later"}]),
    )
    items = {str(i["task_id"]) for i in claim(conn, 2)}
    done = next(t for t in client.simulate_get("/task", params={"name": "done"}).json)
    assert done["id"] in items
    conn.execute("SELECT taskrunner.update_task(%s, 'success')", (done["id"],))

    result = client.simulate_delete(f"/batch/{batch_id}")

    assert result.status_code == 200, result.text
    assert result.json == {
        "batch_id": batch_id,
        "canceled_waiting": 1,
        "canceled_pending": 1,
        "canceled_claimed": 1,
        "canceled_running": 0,
        "canceled_paused": 0,
        "already_terminal": 1,
    }
    stats = client.simulate_get(f"/batch/{batch_id}").json
    assert stats["status_counts"] == counts(success=1, canceled=3)
    history = client.simulate_get(f"/task/{_task_named(client, 'child')}/history").json
    assert history[-1]["to"] == "Canceled" and history[-1]["reason"] == "batch stopped"


def _task_named(client, name: str) -> str:
    return client.simulate_get("/task", params={"name": name}).json[0]["id"]


# -- PATCH /batch/{id}/rules -----------------------------------------------------------


def test_patch_rules_replaces_them_on_unfinished_tasks_of_the_kind(client, conn):
    batch_id = batch(
        client,
        *[spec(f"t{i}", metadata={"tenant": "a"}) for i in range(3)],
        spec("other", kind="j"),
    )
    result = client.simulate_patch(
        f"/batch/{batch_id}/rules",
        json={"kind": "k", "rules": [{"type": "Concurrency", **RULE["Concurency"]}]},
    )
    assert result.status_code == 200, result.text
    assert result.json == {"batch_id": batch_id, "kind": "k", "updated_count": 3}
    task = client.simulate_get(f"/task/{_task_named(client, 't0')}").json
    assert task["rules"] == [RULE]
    assert len(claim(conn, 10)) == 2  # one k (the rule) and the j task

    blocked = client.simulate_get(f"/task/{_task_named(client, 't2')}").json
    assert blocked["why_not_running"] == {
        "reason": "rule",
        "rules": [{"rule": RULE, "count": 1, "max": 1}],
    }

    cleared = client.simulate_patch(f"/batch/{batch_id}/rules", json={"kind": "k", "rules": []})
    assert cleared.json["updated_count"] == 3
    assert len(claim(conn, 10)) == 2


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"rules": []}, "kind: is required"),
        ({"kind": "", "rules": []}, "kind: must not be empty"),
        ({"kind": "k"}, "rules: is required"),
        ({"kind": "k", "rules": {}}, "rules: must be an array"),
        ({"kind": "k", "rules": [{"Nope": {}}]}, 'rules[0]: must be {"Concurency"'),
        (
            {"kind": "k", "rules": [{"Concurency": {"matcher": {"kind": "k"}}}]},
            "rules[0].Concurency.matcher.status: is required",
        ),
        ({"kind": "k", "rules": [], "extra": 1}, "extra: unknown field"),
        (
            {"kind": "k", "rules": [RULE]},
            "rules[0].matcher.fields: 'tenant' is missing in the metadata of 1 task(s)",
        ),
    ],
)
def test_patch_rules_rejects_bad_input_and_changes_nothing(client, conn, body, detail):
    batch_id = batch(client, spec("a"))
    assert_error(client.simulate_patch(f"/batch/{batch_id}/rules", json=body), 400, detail)
    assert conn.execute("SELECT rules FROM taskrunner.task").fetchone()["rules"] == []


# -- GET /dag/{id} ---------------------------------------------------------------------


def test_dag_has_basic_tasks_and_links(client, conn):
    batch_id = batch(
        client,
        spec("a", priority=5),
        spec("b", dependencies=[{"id": "a", "requires_success": False}]),
    )
    result = client.simulate_get(f"/dag/{batch_id}")
    assert result.status_code == 200, result.text
    tasks, links = result.json["tasks"], result.json["links"]
    assert [t["name"] for t in tasks] == ["a", "b"]
    assert set(tasks[0]) == {
        "id",
        "name",
        "kind",
        "status",
        "created_at",
        "started_at",
        "success",
        "failures",
        "expected_count",
        "ended_at",
        "batch_id",
        "dead_end_barrier",
        "priority",
    }
    assert (tasks[0]["status"], tasks[0]["priority"], tasks[1]["status"]) == (
        "Pending",
        5,
        "Waiting",
    )
    assert links == [
        {"parent_id": tasks[0]["id"], "child_id": tasks[1]["id"], "requires_success": False}
    ]


# -- GET /task/{id}/history and why_not_running ----------------------------------------


def test_task_history_lists_every_transition(client, conn):
    task = create(client, spec("a"))["a"]
    claim(conn, 1)
    client.simulate_patch(
        f"/task/{task['id']}", json={"status": "Failure", "failure_reason": "boom"}
    )

    result = client.simulate_get(f"/task/{task['id']}/history")

    assert result.status_code == 200, result.text
    assert [(h["from"], h["to"], h["reason"]) for h in result.json] == [
        (None, "Pending", "created"),
        ("Pending", "Running", "claimed by w"),
        ("Running", "Failure", "boom"),
    ]
    times = [dt.datetime.fromisoformat(h["at"]) for h in result.json]
    assert times == sorted(times)


def test_task_history_of_unknown_task_is_404(client):
    assert_error(client.simulate_get(f"/task/{uuid.uuid4()}/history"), 404, "id: no task")
    assert_error(client.simulate_get("/task/nope/history"), 404, "id: 'nope' is not a UUID")


def test_get_task_says_why_it_is_not_running(client, conn):
    tasks = create(client, spec("parent", name="P"), spec("child", dependencies=[{"id": "parent"}]))
    child = client.simulate_get(f"/task/{tasks['child']['id']}").json
    assert child["why_not_running"] == {
        "reason": "unfinished_parents",
        "parents": [
            {
                "id": tasks["parent"]["id"],
                "name": "P",
                "status": "Pending",
                "requires_success": True,
            }
        ],
    }
    parent = client.simulate_get(f"/task/{tasks['parent']['id']}").json
    assert parent["why_not_running"] == {"reason": "ready"}
    claim(conn, 1)
    assert client.simulate_get(f"/task/{tasks['parent']['id']}").json["why_not_running"] is None
