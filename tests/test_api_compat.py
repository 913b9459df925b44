"""ArcRun's field names over HTTP (issue 9, item 5): PATCH priority and merged metadata,
the seed's flat actions list, dead_end_barrier and dead-end cancellation."""

from __future__ import annotations

import pytest
from test_api import assert_error, create, hook, running_task, spec, task_row
from test_api import buffer as buffer  # noqa: F401 (fixtures, by their fixture names)
from test_api import client as client  # noqa: F401

RULE = {
    "Concurency": {
        "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
        "max_concurency": 2,
    }
}


def patch(client, task_id: str, **body):
    return client.simulate_patch(f"/task/{task_id}", json=body)


# -- PATCH /task/{id}: metadata merged, priority ------------------------------------------


def test_patch_merges_metadata(client, conn):
    task = running_task(client, conn, metadata={"a": 1, "keep": "me"})
    result = patch(client, task["id"], metadata={"a": 2, "b": [1]})
    assert result.status_code == 200, result.text
    assert result.json["metadata"] == {"a": 2, "keep": "me", "b": [1]}
    patch(client, task["id"], new_success=1)  # no metadata: left as it is
    assert task_row(conn, task["id"])["metadata"] == {"a": 2, "keep": "me", "b": [1]}


def test_patch_keeps_a_rule_field_it_does_not_name_and_refuses_to_change_one(client, conn):
    task = running_task(client, conn, metadata={"tenant": "t1"}, rules=[RULE])
    assert patch(client, task["id"], metadata={"n": 1}).json["metadata"] == {
        "tenant": "t1",
        "n": 1,
    }
    assert_error(patch(client, task["id"], metadata={"tenant": "t2"}), 409, "metadata.tenant:")
    assert task_row(conn, task["id"])["metadata"] == {"tenant": "t1", "n": 1}


def test_patch_sets_priority(client, conn):
    task = running_task(client, conn, priority=3)
    result = patch(client, task["id"], priority=-40)
    assert result.status_code == 200 and result.json["priority"] == -40
    row = task_row(conn, task["id"])
    key = conn.execute(
        "SELECT taskrunner._admission_key(kind, priority, rules, metadata) AS k "
        "FROM taskrunner.task WHERE id = %s",
        (task["id"],),
    ).fetchone()["k"]
    assert row["priority"] == -40 and row["admission_key"] == key


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"priority": 1001}, "priority: must be at most 1000"),
        ({"priority": -1001}, "priority: must be at least -1000"),
        ({"priority": "high"}, "priority: must be an integer"),
    ],
)
def test_patch_rejects_a_bad_priority(client, conn, body, detail):
    task = running_task(client, conn)
    assert_error(client.simulate_patch(f"/task/{task['id']}", json=body), 400, detail)
    assert task_row(conn, task["id"])["priority"] == 0


# -- GET /task/{id}: the seed's flat actions beside the grouped form ------------------------


def test_get_task_carries_the_flat_actions_list(client, conn):
    task = create(
        client,
        spec(
            "a",
            on_start=hook("http://x.test/start", body={"n": 1}, headers={"X-A": "1"}),
            on_success=[hook("http://x.test/ok", "Put")],
            on_failure=[hook("http://x.test/ko")],
        ),
    )["a"]
    body = client.simulate_get(f"/task/{task['id']}").json
    assert body["actions"] == [
        {
            "kind": "Webhook",
            "trigger": "Start",
            "params": {
                "url": "http://x.test/start",
                "verb": "Post",
                "body": {"n": 1},
                "headers": {"X-A": "1"},
            },
        },
        {"kind": "Webhook", "trigger": "End", "params": {"url": "http://x.test/ok", "verb": "Put"}},
        {
            "kind": "Webhook",
            "trigger": "End",
            "params": {"url": "http://x.test/ko", "verb": "Post"},
        },
    ]
    # the grouped form is the same actions with ids and deliveries
    grouped = [body["on_start"], *body["on_success"], *body["on_failure"]]
    assert [{k: a[k] for k in ("kind", "trigger", "params")} for a in grouped] == body["actions"]


# -- dead_end_barrier and dead-end cancellation ---------------------------------------------


def test_dead_end_barrier_is_accepted_shown_and_validated(client, conn):
    tasks = create(client, spec("a", dead_end_barrier=True), spec("b"))
    assert tasks["a"]["dead_end_barrier"] is True and tasks["b"]["dead_end_barrier"] is False
    assert client.simulate_get(f"/task/{tasks['a']['id']}").json["dead_end_barrier"] is True
    dag = client.simulate_get(f"/dag/{tasks['a']['batch_id']}").json
    assert [t["dead_end_barrier"] for t in dag["tasks"]] == [True, False]
    result = client.simulate_post("/task", json=[spec("c", dead_end_barrier="yes")])
    assert_error(result, 400, "[0].dead_end_barrier: must be true or false")


def test_dead_end_cancellation_through_the_api(client, conn):
    """a1, a2 -> b: canceling a2 fails b; with the setting on, a1 (its only child failed)
    is canceled too; with it off (the default) a1 stays."""
    for on, expected in ((False, "Pending"), (True, "Canceled")):
        conn.execute("UPDATE taskrunner.settings SET dead_end_cancel = %s", (on,))
        tasks = create(
            client, spec("a1"), spec("a2"), spec("b", dependencies=[{"id": "a1"}, {"id": "a2"}])
        )
        assert client.simulate_delete(f"/task/{tasks['a2']['id']}").status_code == 200
        assert client.simulate_get(f"/task/{tasks['b']['id']}").json["status"] == "Failure"
        a1 = client.simulate_get(f"/task/{tasks['a1']['id']}").json
        assert a1["status"] == expected
    assert a1["status_reason"] == "dead end: every child task has ended"
