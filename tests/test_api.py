"""The HTTP API end to end: Falcon's test client on the real, freshly migrated database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SEED_METRICS
from falcon import testing
from prometheus_client import REGISTRY

from taskrunner import db, metrics
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer, Refused
from taskrunner.config import Config
from taskrunner.db import QUERIES

# -- setup -----------------------------------------------------------------------------


@pytest.fixture
def buffer(pool) -> Iterator[CounterBuffer]:
    """A counter buffer that never flushes by itself: tests call flush()."""
    buffer = CounterBuffer(pool, interval=3600)
    yield buffer
    buffer.close()


@pytest.fixture
def client(pool, buffer) -> testing.TestClient:
    return testing.TestClient(create_app(Config(), pool, buffer))


def hook(url: str = "http://example.com/hook", verb: str = "Post", **params: Any) -> dict:
    return {"kind": "Webhook", "params": {"url": url, "verb": verb, **params}}


def spec(local_id: str, **fields: Any) -> dict:
    """A valid task of the API's input format with only the fields a test cares about."""
    return {"id": local_id, "name": local_id, "kind": "k", "on_start": hook(), **fields}


def create(client: testing.TestClient, *tasks: dict, **headers: str) -> dict[str, dict]:
    """POST a batch that must succeed; returns {local_id: task JSON}."""
    result = client.simulate_post("/task", json=list(tasks), headers=headers)
    assert result.status_code == 201, result.text
    return {t["local_id"]: t for t in result.json}


def count_tasks(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM taskrunner.task").fetchone()["n"]


def task_row(conn, task_id: str) -> dict:
    return conn.execute(QUERIES["get_task"], {"id": task_id}).fetchone()


def claim(conn, n: int = 10) -> list[dict]:
    """Move ready tasks to running the way a worker does; returns the work items."""
    return conn.execute(
        QUERIES["claim_tasks"], {"worker": "w", "max": n, "lease_seconds": 60}
    ).fetchall()


def running_task(client, conn, **fields: Any) -> dict:
    task = create(client, spec("r", **fields))["r"]
    assert [w["task_id"] for w in claim(conn)] == [uuid.UUID(task["id"])]
    return task


def assert_error(result, status: int, *detail_parts: str) -> dict:
    """An error response: the status, the JSON shape, and details containing each part."""
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"error", "details"} and isinstance(body["error"], str)
    for part in detail_parts:
        assert any(part in d for d in body["details"]), (part, body["details"])
    return body


# -- POST /task --------------------------------------------------------------------------


def test_create_returns_tasks_with_local_ids_and_batch_header(client, conn):
    result = client.simulate_post(
        "/task",
        json=[spec("a", metadata={"t": 1}, priority=5, timeout=30), spec("b")],
        headers={"X-Requester": "svc"},
    )
    assert result.status_code == 201
    tasks = result.json
    assert [t["local_id"] for t in tasks] == ["a", "b"]
    assert {t["batch_id"] for t in tasks} == {result.headers["x-batch-id"]}
    assert tasks[0]["status"] == "Pending" and tasks[0]["priority"] == 5
    row = task_row(conn, tasks[0]["id"])
    assert (row["requester"], row["timeout"], row["metadata"]) == ("svc", 30, {"t": 1})
    assert str(row["batch_id"]) == result.headers["x-batch-id"]
    assert task_row(conn, tasks[1]["id"])["timeout"] == 60  # the default
    assert count_tasks(conn) == 2


def test_create_stores_actions_normalised(client, conn):
    task = create(
        client,
        spec(
            "a",
            on_start={
                "kind": "webhook",
                "trigger": "START",
                "params": {
                    "url": "https://x.test/s",
                    "verb": "pUt",
                    "body": {"x": 1},
                    "headers": {"A": "b"},
                },
            },
            on_success=[hook("http://x.test/ok")],
            on_failure=[{**hook("http://x.test/ko", "Delete"), "trigger": "End"}],
        ),
    )["a"]
    rows = conn.execute(QUERIES["task_actions"], {"id": task["id"]}).fetchall()
    got = {
        (r["event"], r["url"], r["verb"], json.dumps(r["body"]), json.dumps(r["headers"]))
        for r in rows
    }
    assert got == {
        ("start", "https://x.test/s", "PUT", '{"x": 1}', '{"A": "b"}'),
        ("success", "http://x.test/ok", "POST", "null", "{}"),
        ("failure", "http://x.test/ko", "DELETE", "null", "{}"),
    }


def test_dependencies_by_local_id_in_any_order_and_by_uuid(client, conn):
    parent = create(client, spec("p"))["p"]
    tasks = create(
        client,
        spec(
            "child",
            dependencies=[
                {"id": "mid", "requires_success": True},
                {"id": parent["id"], "requires_success": False},
            ],
        ),
        spec("mid"),
    )
    assert tasks["child"]["status"] == "Waiting" and tasks["mid"]["status"] == "Pending"
    deps = conn.execute(QUERIES["task_dependencies"], {"id": tasks["child"]["id"]}).fetchall()
    assert {(str(d["parent_id"]), d["requires_success"]) for d in deps} == {
        (tasks["mid"]["id"], True),
        (parent["id"], False),
    }


@pytest.mark.parametrize(
    "rule",
    [
        {
            "Concurency": {
                "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
                "max_concurency": 2,
            }
        },
        {
            "type": "Concurency",
            "matcher": {"kind": "k", "status": "running", "fields": ["tenant"]},
            "max_concurency": 2,
        },
        {
            "Concurrency": {
                "matcher": {"kind": "k", "status": "RUNNING", "fields": ["tenant"]},
                "max_concurrency": 2,
            }
        },
        {
            "type": "concurrency",
            "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
            "max_concurrency": 2,
        },
    ],
    ids=["seed", "tagged", "seed-spelling", "tagged-spelling"],
)
def test_rule_forms_are_normalised_and_returned_in_seed_form(client, conn, rule):
    task = create(client, spec("a", metadata={"tenant": "t1"}, rules=[rule]))["a"]
    assert task_row(conn, task["id"])["rules"] == [
        {"kind": "k", "status": "running", "fields": ["tenant"], "max": 2}
    ]
    assert task["rules"] == [
        {
            "Concurency": {
                "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
                "max_concurency": 2,
            }
        }
    ]


@pytest.mark.parametrize(
    ("tasks", "detail"),
    [
        (
            [spec("a", dependencies=[{"id": "b"}]), spec("b", dependencies=[{"id": "a"}])],
            "[0].dependencies: cycle a -> b -> a",
        ),
        ([spec("a", dependencies=[{"id": "x"}])], "[0].dependencies[0].id: unknown local id 'x'"),
        ([spec("a"), spec("a")], "[1].id: duplicate local id 'a'"),
        ([spec("a", dependencies=[{"id": "a"}])], "[0].dependencies[0].id: a task cannot depend"),
        (
            [spec("a"), spec("b", dependencies=[{"id": "a"}, {"id": "a"}])],
            "[1].dependencies[1].id: duplicate dependency on 'a'",
        ),
        ([spec("a", dependencies=[{"id": str(uuid.uuid4())}])], "[0].dependencies: unknown task"),
        ([spec("a"), {"id": "b"}], "[1].on_start: is required"),
    ],
    ids=[
        "cycle",
        "unknown-local",
        "duplicate-id",
        "self",
        "duplicate-dep",
        "unknown-uuid",
        "shape",
    ],
)
def test_rejected_batch_writes_nothing(client, conn, tasks, detail):
    result = client.simulate_post("/task", json=tasks)
    assert_error(result, 400, detail)
    assert count_tasks(conn) == 0


def test_dedupe_skipping_every_task_is_204(client, conn):
    dedupe = [{"kind": "k", "status": "Pending", "fields": ["tenant"]}]
    create(client, spec("a", metadata={"tenant": "t1"}))
    result = client.simulate_post(
        "/task", json=[spec("b", metadata={"tenant": "t1"}, dedupe_strategy=dedupe)]
    )
    assert result.status_code == 204 and "x-batch-id" not in result.headers
    assert count_tasks(conn) == 1
    other = create(client, spec("c", metadata={"tenant": "t2"}, dedupe_strategy=dedupe))
    assert list(other) == ["c"] and count_tasks(conn) == 2


def test_requester_header_too_long_is_400(client, conn):
    result = client.simulate_post("/task", json=[spec("a")], headers={"X-Requester": "x" * 201})
    assert_error(result, 400, "X-Requester: must be at most 200 characters")
    assert count_tasks(conn) == 0


# -- GET /task/{id} ------------------------------------------------------------------------


def test_get_task_has_dependencies_actions_deliveries_and_attempts(client, conn):
    parent = create(client, spec("p"))["p"]
    child = create(
        client,
        spec("c", dependencies=[{"id": parent["id"]}], on_success=[hook("http://x.test/ok")]),
    )["c"]
    (item,) = claim(conn)
    conn.execute(
        QUERIES["finish_delivery"],
        {
            "delivery_id": item["delivery_id"],
            "worker": "w",
            "ok": True,
            "status_code": 200,
            "error": None,
            "retry_delay_ms": None,
            "cancel_actions": None,
            "started_at": None,
        },
    )

    body = client.simulate_get(f"/task/{parent['id']}").json
    assert body["status"] == "Running" and body["dependencies"] == []
    start = body["on_start"]
    assert start["kind"] == "Webhook" and start["trigger"] == "Start"
    assert start["params"] == {"url": "http://example.com/hook", "verb": "Post"}
    (delivery,) = start["deliveries"]
    assert delivery["id"] == str(item["delivery_id"]) and delivery["status"] == "Delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    assert body["on_success"] == body["on_failure"] == body["on_cancel"] == []

    body = client.simulate_get(f"/task/{child['id']}").json
    assert body["dependencies"] == [{"id": parent["id"], "requires_success": True}]
    (ok,) = body["on_success"]
    assert ok["trigger"] == "End" and ok["deliveries"] == []
    assert body["status"] == "Waiting" and body["local_id"] == "c"


def test_get_unknown_or_malformed_task_id_is_404(client):
    assert_error(client.simulate_get(f"/task/{uuid.uuid4()}"), 404)
    assert_error(client.simulate_get("/task/not-a-uuid"), 404, "id: 'not-a-uuid' is not a UUID")


# -- GET /task -------------------------------------------------------------------------------


def test_list_filters_and_pagination(client, conn):
    first = create(
        client, spec("a", kind="ingest", name="Ingest alpha", metadata={"tenant": "t1", "n": 1})
    )
    second = create(
        client,
        spec("b", kind="ingest", name="Ingest beta", metadata={"tenant": "t2"}),
        spec("c", kind="cluster", name="Cluster", metadata={"tenant": "t1"}),
    )
    client.simulate_patch(f"/task/pause/{second['c']['id']}")

    def names(query: str) -> list[str]:
        result = client.simulate_get("/task", query_string=query)
        assert result.status_code == 200, result.text
        return [t["local_id"] for t in result.json]

    assert names("") == ["c", "b", "a"]  # newest first
    assert names("kind=ingest") == ["b", "a"]
    assert names("status=pAuSeD") == ["c"]
    assert names("status=Pending&kind=ingest") == ["b", "a"]
    assert names("name=beta") == ["b"]
    assert names("batch_id=" + first["a"]["batch_id"]) == ["a"]
    assert names("metadata=" + json.dumps({"tenant": "t1"})) == ["c", "a"]
    assert names("metadata=" + json.dumps({"tenant": "t1", "n": 1})) == ["a"]
    assert names("page=0&per_page=2") == ["c", "b"]
    assert names("page=1&per_page=2") == ["a"]
    assert names("page=1&page_size=1") == ["b"]
    assert names("page=5") == []


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("page=-1", "page: must be between 0 and"),
        ("page=x", "page: must be an integer"),
        ("per_page=501", "per_page: must be between 1 and 500"),
        ("page_size=0", "page_size: must be between 1 and 500"),
        ("status=Done", "status: must be one of Waiting"),
        ("batch_id=nope", "batch_id: must be a UUID"),
        ("metadata=[1]", "metadata: must be a JSON object"),
        ("metadata={", "metadata: must be a JSON object"),
    ],
)
def test_list_rejects_bad_parameters(client, query, detail):
    assert_error(client.simulate_get("/task", query_string=query), 400, detail)


def test_list_per_page_defaults_to_50(client):
    create(client, *[spec(f"t{i}") for i in range(51)])
    assert len(client.simulate_get("/task").json) == 50


# -- PATCH /task/{id} ----------------------------------------------------------------------


def test_patch_counters_metadata_and_heartbeat(client, conn):
    task = running_task(client, conn)
    conn.execute(
        "UPDATE taskrunner.task SET last_updated = now() - interval '1 hour' WHERE id = %s",
        (task["id"],),
    )
    before = task_row(conn, task["id"])["last_updated"]
    result = client.simulate_patch(
        f"/task/{task['id']}",
        json={"new_success": 3, "new_failures": 1, "metadata": {"progress": "half"}},
    )
    assert result.status_code == 200, result.text
    assert (result.json["success"], result.json["failures"]) == (3, 1)
    client.simulate_patch(f"/task/{task['id']}", json={"new_success": 2})
    row = task_row(conn, task["id"])
    assert (row["success"], row["failures"], row["metadata"]) == (5, 1, {"progress": "half"})
    assert row["status"] == "running" and row["last_updated"] > before


def test_patch_success_once_then_409(client, conn):
    task = running_task(client, conn)
    result = client.simulate_patch(f"/task/{task['id']}", json={"status": "success"})
    assert result.status_code == 200 and result.json["status"] == "Success"
    again = client.simulate_patch(
        f"/task/{task['id']}", json={"status": "Failure", "failure_reason": "late"}
    )
    body = assert_error(again, 409, "status: task is Success")
    assert "success" not in body["error"] + " ".join(body["details"])  # the JSON spelling
    row = task_row(conn, task["id"])
    assert row["status"] == "success" and row["failure_reason"] is None
    history = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history "
        "WHERE task_id = %s AND to_status = 'success'",
        (task["id"],),
    ).fetchone()
    assert history["n"] == 1


def test_patch_failure_records_reason(client, conn):
    task = running_task(client, conn)
    result = client.simulate_patch(
        f"/task/{task['id']}", json={"status": "FAILURE", "failure_reason": "boom"}
    )
    assert result.json["status"] == "Failure" and result.json["failure_reason"] == "boom"
    assert task_row(conn, task["id"])["failure_reason"] == "boom"


def test_patch_on_a_task_that_is_not_running_is_409(client, conn):
    task = create(client, spec("a"))["a"]
    assert_error(client.simulate_patch(f"/task/{task['id']}", json={"new_success": 1}), 409)
    assert task_row(conn, task["id"])["success"] == 0


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"status": "Failure"}, "failure_reason: is required when status is Failure"),
        ({"failure_reason": "x"}, "failure_reason: only allowed when status is Failure"),
        ({"status": "Running"}, "status: must be one of Success, Failure"),
        ({"new_success": -1}, "new_success: must be at least 0"),
        ({"new_failures": 1.5}, "new_failures: must be an integer"),
        ({"metadata": [1]}, "metadata: must be an object"),
        ({"color": "red"}, "color: unknown field"),
        ([], "body: must be an object"),
    ],
)
def test_patch_rejects_bad_input(client, conn, body, detail):
    task = running_task(client, conn)
    assert_error(client.simulate_patch(f"/task/{task['id']}", json=body), 400, detail)
    row = task_row(conn, task["id"])
    assert (row["status"], row["success"], row["failures"]) == ("running", 0, 0)


def test_patch_unknown_task_is_404(client):
    assert_error(client.simulate_patch(f"/task/{uuid.uuid4()}", json={}), 404)


# -- DELETE, pause, resume -----------------------------------------------------------------


def test_cancel_then_409(client, conn):
    task = create(client, spec("a"))["a"]
    result = client.simulate_delete(f"/task/{task['id']}")
    assert result.status_code == 200 and result.json["status"] == "Canceled"
    assert task_row(conn, task["id"])["status"] == "canceled"
    assert_error(client.simulate_delete(f"/task/{task['id']}"), 409)
    assert_error(client.simulate_delete(f"/task/{uuid.uuid4()}"), 404)


def test_cancel_running_task_queues_its_cancel_actions(client, conn):
    task = running_task(client, conn, on_cancel=[hook("http://x.test/stop")])
    assert client.simulate_delete(f"/task/{task['id']}").json["status"] == "Canceled"
    cancel = client.simulate_get(f"/task/{task['id']}").json["on_cancel"]
    assert [len(a["deliveries"]) for a in cancel] == [1]


def test_pause_and_resume(client, conn):
    task = create(client, spec("a"))["a"]
    paused = client.simulate_patch(f"/task/pause/{task['id']}")
    assert paused.status_code == 200 and paused.json["status"] == "Paused"
    assert claim(conn) == []  # never claimed while paused
    assert_error(client.simulate_patch(f"/task/pause/{task['id']}"), 409)
    resumed = client.simulate_patch(f"/task/resume/{task['id']}")
    assert resumed.json["status"] == "Pending"
    assert task_row(conn, task["id"])["status"] == "pending"
    assert_error(client.simulate_patch(f"/task/resume/{task['id']}"), 409)


# -- PUT /task -------------------------------------------------------------------------------


def test_put_counters_are_buffered_then_summed_exactly(client, conn, buffer):
    tasks = create(client, spec("a"), spec("b"))
    a, b = tasks["a"]["id"], tasks["b"]["id"]
    r1 = client.simulate_put("/task", json={"task_id": a, "new_success": 5, "new_failures": 1})
    r2 = client.simulate_put(
        "/task", json=[{"task_id": a.upper(), "new_success": 2}, {"task_id": b, "new_failures": 7}]
    )
    r3 = client.simulate_put(f"/task/{b}", json={"new_success": 4})
    assert [r.status_code for r in (r1, r2, r3)] == [202, 202, 202]
    assert r2.json == {"accepted": 2}
    assert (task_row(conn, a)["success"], task_row(conn, b)["failures"]) == (0, 0)
    assert buffer.flush() == 2
    assert buffer.pending() == {}
    ra, rb = task_row(conn, a), task_row(conn, b)
    assert (ra["success"], ra["failures"], rb["success"], rb["failures"]) == (7, 1, 4, 7)


def test_put_buffer_is_flushed_on_close(pool, conn):
    buffer = CounterBuffer(pool, interval=3600)
    task_id = str(
        conn.execute(
            QUERIES["create_batch"],
            {"tasks": json.dumps([{"local_id": "a", "name": "a", "kind": "k"}]), "requester": None},
        ).fetchone()["id"]
    )
    buffer.add([(task_id, 3, 0), (task_id, 4, 2)])
    buffer.close()
    row = task_row(conn, task_id)
    assert (row["success"], row["failures"]) == (7, 2)


def test_put_buffer_thread_flushes_by_itself(pool, conn):
    buffer = CounterBuffer(pool, interval=0.05)
    task_id = str(
        conn.execute(
            QUERIES["create_batch"],
            {"tasks": json.dumps([{"local_id": "a", "name": "a", "kind": "k"}]), "requester": None},
        ).fetchone()["id"]
    )
    try:
        buffer.add([(task_id, 1, 0)])
        for _ in range(100):
            if task_row(conn, task_id)["success"] == 1:
                break
            conn.execute("SELECT pg_sleep(0.02)")
        assert task_row(conn, task_id)["success"] == 1
    finally:
        buffer.close()


def test_put_buffer_keeps_increments_when_a_flush_fails():
    dead = db.create_pool("postgresql://nobody@127.0.0.1:1/none", timeout=0.3)
    dead.open(wait=False)
    buffer = CounterBuffer(dead, interval=3600)
    try:
        buffer.add([("t1", 1, 2)])
        with pytest.raises(Exception):  # noqa: B017 - any connection error will do
            buffer.flush()
        # the database is now known down: nothing more is accepted, what was is kept
        with pytest.raises(Refused, match="database unavailable"):
            buffer.add([("t1", 1, 0)])
        assert buffer.pending() == {"t1": (1, 2)}
    finally:
        buffer._stop.set()
        dead.close()


def test_put_buffer_refuses_past_its_bound_all_or_nothing(pool, conn):
    buffer = CounterBuffer(pool, interval=3600, max_tasks=3)
    client = testing.TestClient(create_app(Config(), pool, buffer))
    try:
        tasks = create(client, spec("a"), spec("b"), spec("c"), spec("d"))
        a, b, c, d = (tasks[k]["id"] for k in "abcd")
        put = client.simulate_put
        assert (
            put("/task", json=[{"task_id": a, "new_success": 1}, {"task_id": b}]).status_code == 202
        )
        over = put("/task", json=[{"task_id": a, "new_success": 5}, {"task_id": c}, {"task_id": d}])
        body = assert_error(over, 503, "COUNTER_BUFFER_MAX")
        assert body["error"] == "counter buffer full" and over.headers["retry-after"] == "1"
        assert buffer.pending() == {a: (1, 0), b: (0, 0)}  # nothing of the refused request
        assert put(f"/task/{a}", json={"new_success": 2}).status_code == 202  # no new task
        assert put(f"/task/{c}", json={"new_failures": 1}).status_code == 202  # the third
        assert_error(put(f"/task/{d}", json={"new_success": 1}), 503)
        assert buffer.flush() == 3
        assert put(f"/task/{d}", json={"new_success": 1}).status_code == 202  # room again
        assert buffer.flush() == 1
        rows = [task_row(conn, t) for t in (a, b, c, d)]
        assert [(r["success"], r["failures"]) for r in rows] == [(3, 0), (0, 0), (0, 1), (1, 0)]
    finally:
        buffer.close()


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/task", {"new_success": 1}, "task_id: is required"),
        ("/task", {"task_id": "nope"}, "task_id: must be a UUID"),
        (
            "/task",
            [{"task_id": str(uuid.uuid4()), "new_success": -2}],
            "[0].new_success: must be at least 0",
        ),
        ("/task", "x", "body: must be an object or an array"),
        (f"/task/{uuid.uuid4()}", {"task_id": "x"}, "task_id: unknown field"),
    ],
)
def test_put_rejects_bad_input(client, buffer, path, body, detail):
    assert_error(client.simulate_put(path, json=body), 400, detail)
    assert buffer.pending() == {}


def _dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("counter_increments_dropped_total", {"reason": reason}) or 0.0


def test_put_for_a_task_that_does_not_exist_is_404_and_keeps_nothing(client, buffer):
    known = create(client, spec("a"))["a"]["id"]
    ghost, other = str(uuid.uuid4()), str(uuid.uuid4())

    one = client.simulate_put(f"/task/{ghost}", json={"new_success": 1})
    many = client.simulate_put(
        "/task",
        json=[{"task_id": known, "new_success": 1}, {"task_id": ghost}, {"task_id": other}],
    )

    assert_error(one, 404, f"task_id: no task {ghost}")
    body = assert_error(many, 404, f"task_id: no task {ghost}", f"task_id: no task {other}")
    assert not any(known in d for d in body["details"])
    assert buffer.pending() == {}  # all or nothing: the known task's increment is not kept


def test_put_for_an_ended_task_still_adds_to_its_counters(client, conn, buffer):
    task = running_task(client, conn)
    client.simulate_patch(f"/task/{task['id']}", json={"status": "Success"})

    resp = client.simulate_put(f"/task/{task['id']}", json={"new_success": 3})

    assert resp.status_code == 202
    assert buffer.flush() == 1
    assert task_row(conn, task["id"])["success"] == 3


def test_put_for_a_task_deleted_before_the_flush_is_dropped_counted_and_logged(
    client, conn, buffer, caplog
):
    tasks = create(client, spec("a"), spec("b"))
    a, b = tasks["a"]["id"], tasks["b"]["id"]
    assert client.simulate_put("/task", json=[{"task_id": a}, {"task_id": b}]).status_code == 202
    before = _dropped("task_deleted")
    conn.execute("DELETE FROM taskrunner.task WHERE id = %s", (b,))

    assert buffer.flush() == 1

    assert _dropped("task_deleted") - before == 1
    assert any(b in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    # the deleted task is forgotten: the next PUT naming it is a 404
    assert_error(client.simulate_put(f"/task/{b}", json={"new_success": 1}), 404, b)


# -- POST /delivery/{id}/retry ---------------------------------------------------------------


def give_up_end_delivery(client, conn, task: dict) -> str:
    """Report the running ``task`` successful, then record its one end delivery as given
    up after an HTTP 500, as a worker does; returns the delivery's id."""
    client.simulate_patch(f"/task/{task['id']}", json={"status": "Success"})
    (item,) = conn.execute(
        QUERIES["claim_deliveries"], {"worker": "w", "max": 10, "lease_seconds": 60}
    ).fetchall()
    conn.execute(
        QUERIES["finish_delivery"],
        {
            "delivery_id": item["delivery_id"],
            "worker": "w",
            "ok": False,
            "status_code": 500,
            "error": "HTTP 500",
            "retry_delay_ms": None,
            "cancel_actions": None,
            "started_at": None,
        },
    )
    return str(item["delivery_id"])


def test_retry_a_delivery_that_gave_up(client, conn):
    task = running_task(client, conn, on_success=[hook("http://x.test/ok")])
    delivery_id = give_up_end_delivery(client, conn, task)

    result = client.simulate_post(f"/delivery/{delivery_id}/retry")
    assert result.status_code == 200 and result.json["status"] == "Queued"
    status = conn.execute(
        "SELECT status::text FROM taskrunner.delivery WHERE id = %s", (delivery_id,)
    ).fetchone()["status"]
    assert status == "queued"
    assert_error(client.simulate_post(f"/delivery/{delivery_id}/retry"), 409)
    assert_error(client.simulate_post(f"/delivery/{uuid.uuid4()}/retry"), 404)
    assert_error(client.simulate_post("/delivery/x/retry"), 404, "id: 'x' is not a UUID")


# -- protocol errors ---------------------------------------------------------------------------


def test_not_json_is_415(client, conn):
    result = client.simulate_post(
        "/task", body=json.dumps([spec("a")]), headers={"Content-Type": "text/plain"}
    )
    assert_error(result, 415, "Content-Type: must be application/json")
    assert_error(client.simulate_put("/task", body="{}"), 415)
    assert count_tasks(conn) == 0


def test_body_over_10_mib_is_413(client, conn):
    body = json.dumps([spec("a", metadata={"x": "y" * (10 * 1024 * 1024)})])
    result = client.simulate_post("/task", body=body, headers={"Content-Type": "application/json"})
    assert_error(result, 413, "body: must be at most 10485760 bytes")
    assert count_tasks(conn) == 0


def test_malformed_json_is_400(client):
    result = client.simulate_post("/task", body="[{", headers={"Content-Type": "application/json"})
    assert assert_error(result, 400)["error"] == "malformed JSON"


def test_unknown_route_is_404_and_wrong_method_405(client):
    assert assert_error(client.simulate_get("/nope"), 404)["error"] == "not found"
    result = client.simulate_delete("/task")
    assert assert_error(result, 405)["error"] == "method not allowed"
    assert "GET" in result.headers["allow"]


def test_unknown_route_and_wrong_method_name_the_route_and_method(client):
    missing = assert_error(client.simulate_get("/nope/x"), 404)
    assert missing["details"] == ["path: no route GET /nope/x"]
    result = client.simulate_delete("/task")
    wrong = assert_error(result, 405)
    assert wrong["details"] == [f"method: DELETE /task allows only {result.headers['allow']}"]
    assert "GET" in result.headers["allow"]


def test_delivery_errors_name_the_delivery_and_its_state(client, conn):
    unknown = uuid.uuid4()
    assert_error(
        client.simulate_post(f"/delivery/{unknown}/retry"), 404, f"id: no delivery {unknown}"
    )
    task = running_task(client, conn, on_success=[hook("http://x.test/ok")])
    client.simulate_patch(f"/task/{task['id']}", json={"status": "Success"})
    (queued,) = conn.execute(
        "SELECT id FROM taskrunner.delivery WHERE event = 'success'"
    ).fetchall()
    body = assert_error(
        client.simulate_post(f"/delivery/{queued['id']}/retry"), 409, "status: delivery is Queued"
    )
    assert "queued" not in body["error"]  # the JSON spelling: Queued
    assert "Failed" in body["error"]  # what it would have to be


def test_start_delivery_retry_409_names_why(client, conn):
    task = running_task(client, conn)
    conn.execute(
        "UPDATE taskrunner.delivery SET status = 'failed' WHERE task_id = %s AND event = 'start'",
        (task["id"],),
    )
    (start,) = conn.execute("SELECT id FROM taskrunner.delivery").fetchall()
    assert_error(client.simulate_post(f"/delivery/{start['id']}/retry"), 409, "is a start")


@pytest.mark.parametrize("verb", ["patch", "delete"])
def test_task_errors_name_the_task_and_use_json_statuses(client, conn, verb):
    unknown = uuid.uuid4()
    path = f"/task/{unknown}"
    not_found = client.simulate_request(verb.upper(), path, json={})
    assert_error(not_found, 404, f"id: no task {unknown}")
    task = create(client, spec("a"))["a"]
    client.simulate_delete(f"/task/{task['id']}")
    ended = assert_error(client.simulate_request(verb.upper(), f"/task/{task['id']}", json={}), 409)
    assert ended["details"] == ["status: task is Canceled"]
    assert "Canceled" in ended["error"] and "canceled" not in ended["error"]


def test_pause_errors_use_json_statuses(client, conn):
    task = create(client, spec("a"))["a"]
    client.simulate_patch(f"/task/pause/{task['id']}")
    again = assert_error(client.simulate_patch(f"/task/pause/{task['id']}"), 409)
    assert again["details"] == ["status: task is Paused"]
    assert again["error"] == f"cannot pause task {task['id']}: it is Paused"


def test_string_postgres_refuses_is_400_not_500(client, conn):
    result = client.simulate_post("/task", json=[spec("a", metadata={"x": "nul\u0000"})])
    assert_error(result, 400)
    assert count_tasks(conn) == 0


def test_unexpected_error_is_500_json(pool, buffer, monkeypatch):
    client = testing.TestClient(create_app(Config(), pool, buffer))

    def broken(*_args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("taskrunner.api.store.Store.read", broken)
    result = client.simulate_get("/task")
    assert result.status_code == 500
    assert result.json == {"error": "internal error", "details": []}


def test_database_down_is_503_and_health_still_200():
    dead = db.create_pool("postgresql://nobody@127.0.0.1:1/none", timeout=0.3)
    dead.open(wait=False)
    buffer = CounterBuffer(dead, interval=3600)
    try:
        client = testing.TestClient(create_app(Config(), dead, buffer))
        assert_error(client.simulate_get(f"/task/{uuid.uuid4()}"), 503)
        assert_error(client.simulate_post("/task", json=[spec("a")]), 503)
        # PUT /task is buffered: accepted until a flush finds the database down, then 503
        task_id = str(uuid.uuid4())
        assert client.simulate_put(f"/task/{task_id}", json={"new_success": 1}).status_code == 202
        with pytest.raises(Exception):  # noqa: B017 - any connection error will do
            buffer.flush()
        put = client.simulate_put("/task", json={"task_id": task_id, "new_success": 1})
        assert assert_error(put, 503)["error"] == "database unavailable"
        assert buffer.pending() == {task_id: (1, 0)}
        assert assert_error(client.simulate_get("/ready"), 503)["error"] == "not ready"
        health = client.simulate_get("/health")
        assert health.status_code == 200 and health.json == {"status": "ok"}
    finally:
        dead.close()


def test_ready_when_migrated(client):
    result = client.simulate_get("/ready")
    assert result.status_code == 200 and result.json["status"] == "ready"


# -- metrics -----------------------------------------------------------------------------------


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_activity_including_cascades(client):
    created = _sample("tasks_created_total")
    canceled = _sample("tasks_completed_total", outcome="canceled", kind="metrics-k")
    failed = _sample("tasks_completed_total", outcome="failure", kind="metrics-k")
    moved = _sample("task_status_transitions_total", from_status="waiting", to_status="failure")
    propagated = _sample("dependency_propagations_total", parent_outcome="canceled")

    tasks = create(
        client, spec("p", kind="metrics-k"), spec("c", kind="metrics-k", dependencies=[{"id": "p"}])
    )
    client.simulate_delete(f"/task/{tasks['p']['id']}")  # the child fails by cascade

    assert _sample("tasks_created_total") == created + 2
    assert _sample("tasks_completed_total", outcome="canceled", kind="metrics-k") == canceled + 1
    assert _sample("tasks_completed_total", outcome="failure", kind="metrics-k") == failed + 1
    assert (
        _sample("task_status_transitions_total", from_status="waiting", to_status="failure")
        == moved + 1
    )
    assert _sample("dependency_propagations_total", parent_outcome="canceled") == propagated + 1

    result = client.simulate_get("/metrics")
    assert result.status_code == 200 and result.headers["content-type"].startswith("text/plain")
    for name in SEED_METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in result.text
    assert 'tasks_completed_total{kind="metrics-k",outcome="canceled"}' in result.text
    assert 'outcome="Canceled"' not in result.text  # the seed's lowercase values


def test_record_stats_parses_every_entry_kind():
    blocked = _sample("tasks_blocked_by_concurrency_total")
    done = _sample("tasks_completed_total", outcome="success", kind="a>b")
    moved = _sample("task_status_transitions_total", from_status="pending", to_status="running")
    metrics.record_stats("blocked>3;running>success>a>b>2;pending>running>k>4;bad;x>y>z>w;")
    metrics.record_stats(None)
    assert _sample("tasks_blocked_by_concurrency_total") == blocked + 3
    assert _sample("tasks_completed_total", outcome="success", kind="a>b") == done + 2
    assert (
        _sample("task_status_transitions_total", from_status="pending", to_status="running")
        == moved + 4
    )


def test_observe_worker_loop():
    before = _sample("worker_loop_duration_seconds_count")
    metrics.observe_worker_loop(0.25)
    assert _sample("worker_loop_duration_seconds_count") == before + 1


@pytest.mark.parametrize("value", ["caf\u00e9", "\u20ac5", " padded", "line\n", "tab\t", "\x01"])
def test_a_header_value_the_worker_cannot_send_is_refused_at_creation(client, conn, value):
    """httpx sends header values as ASCII and h11 refuses control characters and
    whitespace at either end: such a value would fail every attempt, so it is a 400
    naming the header, and nothing is created."""
    result = client.simulate_post(
        "/task", json=[spec("a", on_success=[hook(headers={"X-Note": value})])]
    )

    assert result.status_code == 400, result.text
    assert result.json["details"] == [
        "[0].on_success[0].params.headers.X-Note: must be a header value of printable ASCII "
        "characters (spaces and tabs only between them)"
    ]
    assert count_tasks(conn) == 0


def test_header_values_the_worker_can_send_are_accepted(client):
    values = {"X-A": "Bearer abc.def=", "X-B": "two  words\tand a tab", "X-C": ""}
    created = create(client, spec("a", on_start=hook(headers=values)))
    detail = client.simulate_get(f"/task/{created['a']['id']}").json

    assert detail["on_start"]["params"]["headers"] == values
