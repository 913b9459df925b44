"""The OpenAPI document: it matches the app's routes, and schemathesis finds no server
error and no response that contradicts it (on the real app and a real database)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from falcon import inspect, testing
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from taskrunner import db
from taskrunner.api import openapi
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer
from taskrunner.config import Config
from taskrunner.db import QUERIES

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def app(db_url: str) -> Iterator[Any]:
    pool = db.create_pool(db_url, max_size=4, timeout=5)
    pool.open(wait=True)
    counters = CounterBuffer(pool, interval=0.05)
    yield create_app(Config(), pool, counters)
    counters.close()
    pool.close()


def test_document_lists_exactly_the_apps_routes(app):
    routes = {
        (route.path, method.method)
        for route in inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal and method.method in METHODS
    }
    documented = {
        (path, method.upper())
        for path, item in openapi.document()["paths"].items()
        for method in item
        if method.upper() in METHODS
    }
    assert documented == routes


def _objects_with_properties(schema: Any) -> Iterator[dict]:
    if isinstance(schema, list):
        for item in schema:
            yield from _objects_with_properties(item)
    elif isinstance(schema, dict):
        if "properties" in schema:
            yield schema
        for value in schema.values():
            yield from _objects_with_properties(value)


def test_response_objects_refuse_undocumented_fields():
    """So the schemathesis run below fails on a field the document does not name."""
    doc = openapi.document()
    request_schemas = {"TaskBatch", "TaskUpdate", "Counters", "CounterUpdate", "CounterBatch"}
    responses = [
        s for name, s in doc["components"]["schemas"].items() if name not in request_schemas
    ]
    responses += [
        op["responses"]
        for item in doc["paths"].values()
        for method, op in item.items()
        if method != "parameters"
    ]
    objects = list(_objects_with_properties(responses))
    assert len(objects) >= 8
    assert [o for o in objects if o.get("additionalProperties") is not False] == []


def test_document_is_served_without_auth(app, db_url):
    served = testing.TestClient(app).simulate_get("/openapi.json")
    assert served.status_code == 200
    assert served.json == openapi.document()


# Response checks only: the document names the canonical enum spellings while the API also
# accepts any letter case, so "negative" data can be valid (negative_data_rejection would
# misfire), and schema-valid batches can still be refused for cross-field reasons (unknown
# dependency ids), which positive_data_acceptance would flag.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Bounded and repeatable: 25 examples per operation and input kind, derandomized.
FUZZ_SETTINGS = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _fuzz(operation: Any, statuses: Counter, **strategy: Any) -> None:
    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(**strategy))
    def run(case: Any) -> None:
        response = case.call()
        statuses[operation.label, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    run()


def _has_input(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or operation.path_parameters or operation.body)


def _seed(app: Any, conn: Any) -> dict[str, str]:
    """Tasks for the fuzzer to find: the document's own example batch, one task Running."""
    example = openapi.document()["paths"]["/task"]["post"]["requestBody"]["content"]
    created = testing.TestClient(app).simulate_post(
        "/task", json=example["application/json"]["example"]
    )
    assert created.status_code == 201, created.text
    ids = {t["local_id"]: t["id"] for t in created.json}
    (item,) = conn.execute(
        QUERIES["claim_tasks"], {"worker": "w", "max": 1, "lease_seconds": 60}
    ).fetchall()
    return {
        "running": ids["ingest"],
        "waiting": ids["report"],
        "delivery": item["delivery_id"],
        "batch": created.headers["X-Batch-ID"],
    }


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(app, conn):
    """Every operation with valid and invalid input, and the id-taking ones also on
    existing tasks, through the WSGI app on a real database. (schemathesis' pytest plugin
    is not used: it breaks on pytest 9's node ids.)"""
    known = _seed(app, conn)
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    statuses: Counter = Counter()
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()
        runs: list[dict[str, Any]] = [{"generation_mode": GenerationMode.POSITIVE}]
        if _has_input(operation):
            runs.append({"generation_mode": GenerationMode.NEGATIVE})
        if "{id}" in operation.path:
            if operation.path.startswith(("/batch/", "/dag/")):
                keys = ("batch",)
            elif operation.path.startswith("/delivery"):
                keys = ("delivery", "waiting")
            else:
                keys = ("running", "waiting")
            runs += [{"path_parameters": {"id": str(known[k])}} for k in keys]
        for run in runs:
            try:
                _fuzz(operation, statuses, **run)
            except Exception as exc:  # collect all, so one run shows every problem
                failures.append(f"{operation.label} {run}:\n{exc}")
    assert not failures, "\n\n".join(failures)
    # the fuzzing reached the happy paths, not only the error answers
    for label, code in [
        ("POST /task", 201),
        ("GET /task", 200),
        ("GET /task/{id}", 200),
        ("PATCH /task/{id}", 200),
        ("PUT /task", 202),
        ("GET /task/{id}/history", 200),
        ("GET /batches", 200),
        ("GET /batch/{id}", 200),
        ("PATCH /batch/{id}/rules", 200),
        ("GET /dag/{id}", 200),
        ("DELETE /batch/{id}", 200),
        ("GET /problems", 200),
        ("GET /ui", 200),
    ]:
        assert statuses[label, code], f"{label} never answered {code}: {statuses}"
