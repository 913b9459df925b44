"""Request validation without HTTP or a database: every rule, table-driven."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from taskrunner.api.validation import (
    Invalid,
    batch_input,
    counter_updates,
    find_cycle,
    list_filters,
    update_input,
)


def hook(url: str = "http://example.com/hook", verb: str = "Post", **fields: Any) -> dict:
    return {"kind": "Webhook", "params": {"url": url, "verb": verb}, **fields}


def spec(local_id: str = "a", **fields: Any) -> dict:
    return {"id": local_id, "name": local_id, "kind": "k", "on_start": hook(), **fields}


def rule(fields: list[str] | None = None, **body: Any) -> dict:
    matcher = {"kind": "k", "status": "Running", "fields": fields or []}
    return {"Concurency": {"matcher": matcher, "max_concurency": 1, **body}}


def details(body: Any) -> list[str]:
    with pytest.raises(Invalid) as caught:
        batch_input(body)
    return caught.value.details


# -- accepted input and its normalised form ------------------------------------------------


def test_minimal_task_gets_the_defaults():
    assert batch_input([spec()]) == [
        {
            "local_id": "a",
            "name": "a",
            "kind": "k",
            "timeout": 60,
            "priority": 0,
            "metadata": {},
            "rules": [],
            "dedupe": [],
            "actions": [
                {
                    "event": "start",
                    "url": "http://example.com/hook",
                    "verb": "POST",
                    "body": None,
                    "headers": {},
                }
            ],
            "dependencies": [],
            "retry": {"max_attempts": 1, "backoff_seconds": 5, "backoff_max_seconds": 300},
            "dead_end_barrier": False,
        }
    ]


def test_enums_in_any_case_triggers_by_position_and_nulls_as_absent():
    (task,) = batch_input(
        [
            spec(
                on_start={
                    "kind": "WEBHOOK",
                    "trigger": "start",
                    "params": {"url": "HTTPS://x.test/a", "verb": "dElEtE", "body": None},
                },
                on_success=[hook(trigger="END")],
                on_failure=[hook()],
                on_cancel=[hook(trigger="cancel")],
                rules=[rule(["t"])],
                metadata={"t": "x"},
                dedupe_strategy=[{"kind": "k", "status": "pEnDiNg"}],
                timeout=30.0,
                priority=None,
                dependencies=None,
            )
        ]
    )
    assert [(a["event"], a["verb"]) for a in task["actions"]] == [
        ("start", "DELETE"),
        ("success", "POST"),
        ("failure", "POST"),
        ("cancel", "POST"),
    ]
    assert task["rules"] == [{"kind": "k", "status": "running", "fields": ["t"], "max": 1}]
    assert task["dedupe"] == [{"kind": "k", "status": "pending", "fields": []}]
    assert (task["timeout"], task["priority"], task["dependencies"]) == (30, 0, [])
    assert isinstance(task["timeout"], int)


def test_dependencies_resolve_to_local_ids_or_task_ids():
    parent = uuid.uuid4()
    tasks = batch_input(
        [
            spec(
                "c",
                dependencies=[{"id": "p", "requires_success": False}, {"id": str(parent).upper()}],
            ),
            spec("p"),
        ]
    )
    assert tasks[0]["dependencies"] == [
        {"local_id": "p", "requires_success": False},
        {"task_id": str(parent), "requires_success": True},
    ]


def test_rule_fields_may_name_any_scalar_value():
    metadata = {"s": "x", "i": 1, "f": 1.5, "b": False}
    (task,) = batch_input([spec(metadata=metadata, rules=[rule(list(metadata))])])
    assert task["rules"][0]["fields"] == ["s", "i", "f", "b"]


# -- rejected input: the path and the problem -----------------------------------------------

LONG = "x" * 201

CASES = [
    ({}, "body: must be an array"),
    ([], "body: must not be empty"),
    ([spec(str(i)) for i in range(10_001)], "body: must have at most 10000 items"),
    (["a"], "[0]: must be an object"),
    ([{"name": "a", "kind": "k", "on_start": hook()}], "[0].id: is required"),
    ([{"id": "a", "kind": "k", "on_start": hook()}], "[0].name: is required"),
    ([{"id": "a", "name": "a", "on_start": hook()}], "[0].kind: is required"),
    ([{"id": "a", "name": "a", "kind": "k"}], "[0].on_start: is required"),
    ([spec(colour="red")], "[0].colour: unknown field"),
    ([spec(name=LONG)], "[0].name: must be at most 200 characters"),
    ([spec(kind=LONG)], "[0].kind: must be at most 200 characters"),
    ([spec(LONG)], "[0].id: must be at most 200 characters"),
    ([spec(name="")], "[0].name: must not be empty"),
    ([spec(id=1)], "[0].id: must be a string"),
    ([spec(timeout=0)], "[0].timeout: must be at least 1"),
    ([spec(timeout=86401)], "[0].timeout: must be at most 86400"),
    ([spec(timeout="60")], "[0].timeout: must be an integer"),
    ([spec(timeout=True)], "[0].timeout: must be an integer"),
    ([spec(priority=1001)], "[0].priority: must be at most 1000"),
    ([spec(priority=-1001)], "[0].priority: must be at least -1000"),
    ([spec(metadata=[])], "[0].metadata: must be an object"),
    ([spec(metadata={"x": "y" * 65536})], "[0].metadata: must be at most 65536 bytes"),
    ([spec(on_start=[hook()])], "[0].on_start: must be an object"),
    ([spec(on_start={"params": {"verb": "Post"}})], "[0].on_start.params.url: is required"),
    (
        [spec(on_start={"params": {"url": "http://x.test"}})],
        "[0].on_start.params.verb: is required",
    ),
    (
        [spec(on_start=hook(verb="Fetch"))],
        "[0].on_start.params.verb: must be one of Get, Post, Put, Patch, Delete",
    ),
    ([spec(on_start={**hook(), "kind": "Email"})], "[0].on_start.kind: must be one of Webhook"),
    (
        [spec(on_start=hook(trigger="End"))],
        "[0].on_start.trigger: must be Start (implied by its position)",
    ),
    ([spec(on_success=[hook(trigger="Start")])], "[0].on_success[0].trigger: must be End"),
    ([spec(on_failure=[hook(trigger="Cancel")])], "[0].on_failure[0].trigger: must be End"),
    ([spec(on_cancel=[hook(trigger="End")])], "[0].on_cancel[0].trigger: must be Cancel"),
    ([spec(on_success=hook())], "[0].on_success: must be an array"),
    (
        [spec(on_start=hook("ftp://x.test/a"))],
        "[0].on_start.params.url: must be an absolute http or https URL",
    ),
    (
        [spec(on_start=hook("/relative"))],
        "[0].on_start.params.url: must be an absolute http or https URL",
    ),
    (
        [spec(on_success=[hook("http://")])],
        "[0].on_success[0].params.url: must be an absolute http or https URL",
    ),
    (
        [spec(on_start=hook("http://x.test/" + "a" * 2048))],
        "[0].on_start.params.url: must be at most 2048 characters",
    ),
    (
        [
            spec(
                on_start={
                    "params": {
                        "url": "http://x.test",
                        "verb": "Get",
                        "headers": {f"h{i}": "v" for i in range(51)},
                    }
                }
            )
        ],
        "[0].on_start.params.headers: must have at most 50 entries",
    ),
    (
        [spec(on_start={"params": {"url": "http://x.test", "verb": "Get", "headers": {"A": 1}}})],
        "[0].on_start.params.headers.A: must be a string",
    ),
    ([spec(dependencies=[{"requires_success": True}])], "[0].dependencies[0].id: is required"),
    (
        [spec(), spec("b", dependencies=[{"id": "a", "requires_success": "yes"}])],
        "[1].dependencies[0].requires_success: must be true or false",
    ),
    ([spec(dependencies={"id": "x"})], "[0].dependencies: must be an array"),
    (
        [spec(), spec("b", dependencies=[{"id": "zz"}])],
        "[1].dependencies[0].id: unknown local id 'zz'",
    ),
    ([spec(dependencies=[{"id": "a"}])], "[0].dependencies[0].id: a task cannot depend on itself"),
    (
        [spec("b"), spec(dependencies=[{"id": "b"}, {"id": "b"}])],
        "[1].dependencies[1].id: duplicate dependency on 'b'",
    ),
    ([spec(), spec("b"), spec()], "[2].id: duplicate local id 'a' (first used by [0])"),
    ([spec(rules={"max": 1})], "[0].rules: must be an array"),
    ([spec(rules=["x"])], "[0].rules[0]: must be an object"),
    ([spec(rules=[{"Limit": {}}])], '[0].rules[0]: must be {"Concurency"'),
    ([spec(rules=[{"type": "Rate", "matcher": {}}])], "[0].rules[0].type: must be Concurency"),
    (
        [spec(rules=[{"Concurency": {"matcher": {"kind": "k", "status": "Running"}}}])],
        "[0].rules[0].Concurency.max_concurency: is required",
    ),
    (
        [spec(rules=[rule(max_concurrency=2)])],
        "[0].rules[0].Concurency.max_concurency: give max_concurency only once",
    ),
    (
        [spec(rules=[rule(max_concurency=0)])],
        "[0].rules[0].Concurency.max_concurency: must be at least 1",
    ),
    (
        [spec(rules=[{"type": "Concurency", "max_concurency": 1}])],
        "[0].rules[0].matcher: is required",
    ),
    (
        [
            spec(
                rules=[
                    {"type": "Concurency", "matcher": {"status": "Running"}, "max_concurency": 1}
                ]
            )
        ],
        "[0].rules[0].matcher.kind: is required",
    ),
    (
        [
            spec(
                rules=[
                    {
                        "Concurrency": {
                            "matcher": {"kind": "k", "status": "Busy"},
                            "max_concurrency": 1,
                        }
                    }
                ]
            )
        ],
        "[0].rules[0].Concurrency.matcher.status: must be one of Waiting, Pending, Running",
    ),
    (
        [spec(rules=[rule(["tenant"])])],
        "[0].rules[0].Concurency.matcher.fields[0]: 'tenant' is missing from the task's metadata",
    ),
    (
        [spec(rules=[rule(["t"])], metadata={"t": {"nested": 1}})],
        "[0].rules[0].Concurency.matcher.fields[0]: metadata 't' must be a string, number or bool",
    ),
    (
        [spec(rules=[rule(["t"])], metadata={"t": None})],
        "[0].rules[0].Concurency.matcher.fields[0]: metadata 't' must be a string, number or bool",
    ),
    (
        [
            spec(
                rules=[
                    {
                        "type": "Concurency",
                        "matcher": {"kind": "k", "status": "Running", "fields": ["t"]},
                        "max_concurency": 1,
                    }
                ]
            )
        ],
        "[0].rules[0].matcher.fields[0]: 't' is missing",
    ),
    (
        [spec(rules=[rule(["t", "t"])], metadata={"t": 1})],
        "[0].rules[0].Concurency.matcher.fields: must not repeat a value",
    ),
    (
        [spec(dedupe_strategy=[{"kind": "k", "status": "Gone"}])],
        "[0].dedupe_strategy[0].status: must be one of Waiting",
    ),
    ([spec(dedupe_strategy=[{"status": "Pending"}])], "[0].dedupe_strategy[0].kind: is required"),
]


@pytest.mark.parametrize(("body", "detail"), CASES, ids=[c[1][:60] for c in CASES])
def test_rejected_with_path_and_problem(body, detail):
    found = details(body)
    assert any(d.startswith(detail) for d in found), found


@pytest.mark.parametrize(
    ("tasks", "cycle"),
    [
        (
            [spec("a", dependencies=[{"id": "b"}]), spec("b", dependencies=[{"id": "a"}])],
            "[0].dependencies: cycle a -> b -> a",
        ),
        (
            [
                spec("x", dependencies=[{"id": "b"}]),  # behind the cycle, not on it
                spec("b", dependencies=[{"id": "c"}]),
                spec("c", dependencies=[{"id": "d"}]),
                spec("d", dependencies=[{"id": "b"}]),
            ],
            "[1].dependencies: cycle b -> c -> d -> b",
        ),
    ],
)
def test_cycles_are_reported_with_their_path(tasks, cycle):
    assert details(tasks) == [cycle]


def test_every_problem_is_reported_at_once():
    found = details([spec(timeout=0, colour=1), {"id": "b"}])
    assert {
        "[0].timeout: must be at least 1",
        "[0].colour: unknown field",
        "[1].name: is required",
        "[1].on_start: is required",
    } <= set(found)


def test_reported_problems_are_capped():
    found = details([spec(str(i), timeout=0) for i in range(300)])
    assert len(found) == 101 and found[-1] == "(and 200 more)"


def test_cycle_search_is_iterative_and_linear():
    chain = {str(i): [str(i - 1)] if i else [] for i in range(10_000)}
    started = time.monotonic()
    assert find_cycle(chain) is None
    chain["0"] = ["9999"]
    cycle = find_cycle(chain)
    assert cycle is not None and len(cycle) == 10_001 and cycle[0] == cycle[-1]
    assert time.monotonic() - started < 2


def test_a_10000_task_chain_validates():
    tasks = [spec("0")] + [
        spec(str(i), dependencies=[{"id": str(i - 1)}]) for i in range(1, 10_000)
    ]
    assert len(batch_input(tasks)) == 10_000


# -- PATCH, PUT, GET parameters ----------------------------------------------------------------


def test_update_input_normalises():
    assert update_input(
        {
            "status": "failure",
            "failure_reason": "x",
            "new_success": 2,
            "new_failures": None,
            "metadata": {"a": 1},
            "expected_count": 7,
            "priority": 7,
        }
    ) == {
        "status": "failure",
        "new_success": 2,
        "new_failures": None,
        "metadata": '{"a": 1}',
        "failure_reason": "x",
        "retryable": None,
        "expected_count": 7,
        "priority": 7,
    }
    assert update_input({})["status"] is None
    assert update_input({"status": "Failure", "retryable": False})["retryable"] is False


def test_update_input_rejects_big_metadata():
    with pytest.raises(Invalid) as caught:
        update_input({"metadata": {"x": "y" * 65536}})
    assert caught.value.details[0].startswith("metadata: must be at most 65536 bytes")


def test_counter_updates_forms():
    task = uuid.uuid4()
    assert counter_updates({"task_id": str(task).upper(), "new_success": 1}) == [(str(task), 1, 0)]
    assert counter_updates([{"task_id": str(task), "new_failures": 2}]) == [(str(task), 0, 2)]
    assert counter_updates({"new_success": 3, "new_failures": 4}, task_id="t") == [("t", 3, 4)]
    assert counter_updates([]) == []


def test_list_filters_defaults_and_normalisation():
    assert list_filters({}) == {
        "status": None,
        "kind": None,
        "name": None,
        "batch_id": None,
        "metadata": None,
        "limit": 50,
        "offset": 0,
    }
    got = list_filters(
        {"status": "RUNNING", "page": "2", "page_size": "10", "metadata": '{"a": 1}'}
    )
    assert (got["status"], got["limit"], got["offset"], got["metadata"]) == (
        "running",
        10,
        20,
        '{"a": 1}',
    )


# -- the cost of a rejection (issue 13.11) ---------------------------------------------------


@pytest.fixture
def slow_path_visits(monkeypatch):
    """How many schema nodes jsonschema (the slow path that words errors) visits: every
    descent into a sub-schema evolves the validator once. Deterministic, unlike a timer."""
    visits = [0]
    evolve = Draft202012Validator.evolve

    def counting(self, **changes):
        visits[0] += 1
        return evolve(self, **changes)

    monkeypatch.setattr(Draft202012Validator, "evolve", counting)
    return visits


def test_a_large_invalid_batch_is_not_walked_by_the_slow_path(slow_path_visits):
    """10,000 tasks, each with a problem: 100 are worded, the rest only counted, and the
    slow path's work is bounded whatever the body's size."""
    found = details([spec(str(i), timeout=0) for i in range(10_000)])
    assert len(found) == 101 and found[-1] == "(and 9900 more)"
    assert slow_path_visits[0] < 2_000


def test_one_problem_at_the_end_of_a_large_batch_costs_little(slow_path_visits):
    tasks = [spec(str(i), metadata={"n": i}) for i in range(10_000)]
    tasks[-1]["on_start"]["params"]["verb"] = "Fetch"
    assert details(tasks) == [
        "[9999].on_start.params.verb: must be one of Get, Post, Put, Patch, Delete"
    ]
    assert slow_path_visits[0] < 200
