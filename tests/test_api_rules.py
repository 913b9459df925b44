"""Capacity and RateLimit rules and expected_count over HTTP (Falcon's test client, real
database): both tagged forms, the seed form in responses, field-named 400s, PATCH, the
batch routes, why_not_running, and the client's builders and models."""

from __future__ import annotations

import pytest
from test_api import assert_error, claim, create, running_task, spec, task_row
from test_api import buffer as buffer  # noqa: F401 (fixtures, by their fixture names)
from test_api import client as client  # noqa: F401

from taskrunner.client import capacity, rate_limit
from taskrunner.client.models import BasicTask, BatchStats, Task

CAPACITY = {
    "Capacity": {
        "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
        "max_capacity": 10,
    }
}
RATE = {
    "RateLimit": {
        "matcher": {"kind": "k", "fields": ["tenant"]},
        "max_starts": 2,
        "per_seconds": 60,
    }
}
STORED_CAPACITY = {
    "type": "capacity",
    "kind": "k",
    "status": "running",
    "fields": ["tenant"],
    "max": 10,
}
STORED_RATE = {"type": "rate_limit", "kind": "k", "fields": ["tenant"], "max": 2, "per_seconds": 60}


@pytest.mark.parametrize(
    ("rule", "stored"),
    [
        (CAPACITY, STORED_CAPACITY),
        ({"type": "Capacity", **CAPACITY["Capacity"]}, STORED_CAPACITY),
        (RATE, STORED_RATE),
        ({"type": "ratelimit", **RATE["RateLimit"]}, STORED_RATE),
    ],
    ids=["capacity", "capacity-tagged", "rate", "rate-tagged"],
)
def test_rule_forms_are_normalised_and_returned_in_seed_form(client, conn, rule, stored):
    task = create(client, spec("a", metadata={"tenant": "t"}, expected_count=4, rules=[rule]))
    task = task["a"]
    assert task_row(conn, task["id"])["rules"] == [stored]
    assert task["rules"] == [CAPACITY if stored is STORED_CAPACITY else RATE]
    assert task["expected_count"] == 4
    # the client's builders write the same rules
    assert capacity("k", 10, fields=["tenant"]) == CAPACITY
    assert rate_limit("k", 2, 60, fields=["tenant"]) == RATE


@pytest.mark.parametrize(
    ("task", "detail"),
    [
        (
            spec("a", rules=[CAPACITY], metadata={"tenant": "t"}),
            "[0].expected_count: is required by the Capacity rule [0].rules[0].Capacity",
        ),
        (spec("a", expected_count=-1), "[0].expected_count: must be at least 0"),
        (
            spec(
                "a",
                expected_count=1,
                metadata={"tenant": "t"},
                rules=[
                    {
                        "Capacity": {
                            **CAPACITY["Capacity"],
                            "matcher": {"kind": "k", "status": "Pending"},
                        }
                    }
                ],
            ),
            "[0].rules[0].Capacity.matcher.status: must be Running",
        ),
        (
            spec(
                "a",
                expected_count=1,
                rules=[{"Capacity": {"matcher": {"kind": "k", "status": "Running"}}}],
            ),
            "[0].rules[0].Capacity.max_capacity: is required",
        ),
        (
            spec(
                "a",
                expected_count=1,
                rules=[
                    {
                        "type": "Capacity",
                        "max_capacity": 0,
                        "matcher": {"kind": "k", "status": "Running"},
                    }
                ],
            ),
            "[0].rules[0].max_capacity: must be at least 1",
        ),
        (
            spec("a", rules=[RATE]),
            "[0].rules[0].RateLimit.matcher.fields[0]: 'tenant' is missing",
        ),
        (
            spec(
                "a",
                metadata={"tenant": "t"},
                rules=[{"RateLimit": {**RATE["RateLimit"], "matcher": {"kind": "other"}}}],
            ),
            "[0].rules[0].RateLimit.matcher.kind: must be the task's kind 'k'",
        ),
        (
            spec(
                "a",
                rules=[
                    {
                        "RateLimit": {
                            **RATE["RateLimit"],
                            "matcher": {"kind": "k", "status": "Running"},
                        }
                    }
                ],
            ),
            "[0].rules[0].RateLimit.matcher.status: unknown field",
        ),
        (
            spec("a", rules=[{"RateLimit": {"matcher": {"kind": "k"}, "max_starts": 1}}]),
            "[0].rules[0].RateLimit.per_seconds: is required",
        ),
        (
            spec(
                "a",
                rules=[
                    {
                        "RateLimit": {
                            "matcher": {"kind": "k"},
                            "max_starts": 1,
                            "per_seconds": 86_401,
                        }
                    }
                ],
            ),
            "[0].rules[0].RateLimit.per_seconds: must be at most 86400",
        ),
        (
            spec("a", rules=[{"type": "Throttle"}]),
            "[0].rules[0].type: must be Concurency, Capacity or RateLimit",
        ),
    ],
    ids=lambda v: v[:50] if isinstance(v, str) else None,
)
def test_bad_rules_are_400s_naming_the_field(client, conn, task, detail):
    assert_error(client.simulate_post("/task", json=[task]), 400, detail)
    assert conn.execute("SELECT count(*) AS n FROM taskrunner.task").fetchone()["n"] == 0


def test_patch_expected_count(client, conn):
    task = running_task(client, conn, expected_count=3)
    result = client.simulate_patch(f"/task/{task['id']}", json={"expected_count": 8})
    assert result.status_code == 200, result.text
    assert result.json["expected_count"] == 8
    assert Task.from_json(result.json).expected_count == 8
    assert_error(
        client.simulate_patch(f"/task/{task['id']}", json={"expected_count": -1}),
        400,
        "expected_count: must be at least 0",
    )
    assert task_row(conn, task["id"])["expected_count"] == 8


def test_why_not_running_shows_capacity_and_rate_limit_with_their_counts(client, conn):
    rules = [CAPACITY, RATE]
    first = create(
        client,
        *[spec(f"a{i}", metadata={"tenant": "t"}, expected_count=6, rules=rules) for i in range(2)],
    )
    assert len(claim(conn)) == 2  # capacity: sums 0 and 6 < 10; rate: 2 starts of 2
    later = create(client, spec("b", metadata={"tenant": "t"}, expected_count=6, rules=rules))
    why = client.simulate_get(f"/task/{later['b']['id']}").json["why_not_running"]
    assert why == {
        "reason": "rule",
        "rules": [{"rule": CAPACITY, "count": 12, "max": 10}, {"rule": RATE, "count": 2, "max": 2}],
    }
    # progress frees capacity; the rate window stays full
    client.simulate_patch(f"/task/{first['a0']['id']}", json={"new_success": 6})
    why = client.simulate_get(f"/task/{later['b']['id']}").json["why_not_running"]
    assert why["rules"] == [{"rule": RATE, "count": 2, "max": 2}]


def test_batch_routes_carry_expected_count(client, conn):
    result = client.simulate_post(
        "/task", json=[spec("a", expected_count=5), spec("b", expected_count=7), spec("c")]
    )
    batch = result.headers["X-Batch-ID"]
    stats = client.simulate_get(f"/batch/{batch}").json
    assert stats["total_expected"] == 12
    assert BatchStats.from_json(stats).total_expected == 12
    nodes = client.simulate_get(f"/dag/{batch}").json["tasks"]
    assert [n["expected_count"] for n in nodes] == [5, 7, None]
    assert BasicTask.from_json(nodes[0]).expected_count == 5
    none = client.simulate_post("/task", json=[spec("x")]).headers["X-Batch-ID"]
    assert client.simulate_get(f"/batch/{none}").json["total_expected"] is None


def test_patch_batch_rules_takes_capacity_and_rate_limit(client, conn):
    result = client.simulate_post(
        "/task",
        json=[
            spec("a", metadata={"tenant": "t"}),
            spec("b", metadata={"tenant": "t"}, expected_count=2),
        ],
    )
    batch = result.headers["X-Batch-ID"]
    path = f"/batch/{batch}/rules"
    assert_error(
        client.simulate_patch(path, json={"kind": "k", "rules": [CAPACITY]}),
        400,
        "rules[0]: a Capacity rule needs expected_count, which 1 task(s)",
    )
    assert_error(
        client.simulate_patch(
            path,
            json={
                "kind": "k",
                "rules": [{"RateLimit": {**RATE["RateLimit"], "matcher": {"kind": "x"}}}],
            },
        ),
        400,
        "rules[0].RateLimit.matcher.kind: must be the task's kind 'k'",
    )
    assert_error(
        client.simulate_patch(
            path,
            json={
                "kind": "k",
                "rules": [
                    {
                        "Capacity": {
                            **CAPACITY["Capacity"],
                            "matcher": {"kind": "k", "status": "Waiting"},
                        }
                    }
                ],
            },
        ),
        400,
        "rules[0].Capacity.matcher.status: must be Running",
    )
    result = client.simulate_patch(path, json={"kind": "k", "rules": [RATE]})
    assert result.status_code == 200 and result.json["updated_count"] == 2
    rows = conn.execute("SELECT rules FROM taskrunner.task").fetchall()
    assert [r["rules"] for r in rows] == [[STORED_RATE]] * 2
