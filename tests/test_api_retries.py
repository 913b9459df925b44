"""Task retries and delayed start through the API: validation (field-named 400s), the
fields GET /task shows, PATCH ``retryable``, TASK_RETRY_MAX_ATTEMPTS, the retry metric.
The SQL transitions are in test_sql_retries.py; real workers in test_e2e_retries.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from falcon import testing
from prometheus_client import REGISTRY
from test_api import assert_error, buffer, claim, create, spec  # noqa: F401 (fixture)

from taskrunner.api.app import create_app
from taskrunner.api.validation import Invalid, batch_input
from taskrunner.config import Config


def client_with(pool, buffer, **settings: Any) -> testing.TestClient:  # noqa: F811
    return testing.TestClient(create_app(Config(**settings), pool, buffer))


@pytest.fixture
def client(pool, buffer) -> testing.TestClient:  # noqa: F811
    return client_with(pool, buffer)


def details(task: dict) -> list[str]:
    with pytest.raises(Invalid) as caught:
        batch_input([spec("a", **task)])
    return caught.value.details


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"retry": {"max_attempts": 0}}, "[0].retry.max_attempts: must be at least 1"),
        ({"retry": {"max_attempts": 101}}, "[0].retry.max_attempts: must be at most 100"),
        ({"retry": {"max_attempts": 2.5}}, "[0].retry.max_attempts: must be an integer"),
        ({"retry": {"backoff_seconds": -1}}, "[0].retry.backoff_seconds: must be at least 0"),
        ({"retry": {"backoff_seconds": "1"}}, "[0].retry.backoff_seconds: must be a number"),
        ({"retry": {"tries": 3}}, "[0].retry.tries: unknown field"),
        ({"retry": 3}, "[0].retry: must be an object"),
        (
            {"retry": {"backoff_seconds": 10, "backoff_max_seconds": 5}},
            "[0].retry.backoff_max_seconds: must be at least backoff_seconds (10)",
        ),
        ({"not_before": "tomorrow"}, "[0].not_before: must be an RFC 3339 date-time"),
        ({"not_before": "2026-11-28T10:00:00"}, "[0].not_before: must be an RFC 3339 date-time"),
        ({"delay_seconds": -1}, "[0].delay_seconds: must be at least 0"),
        ({"delay_seconds": True}, "[0].delay_seconds: must be a number"),
        (
            {"delay_seconds": 1, "not_before": "2026-11-28T10:00:00Z"},
            "[0].delay_seconds: not allowed with not_before",
        ),
    ],
)
def test_bad_retry_and_schedule_fields_are_named(fields, detail):
    assert any(d.startswith(detail) for d in details(fields)), details(fields)


def test_retry_defaults_and_normal_forms():
    (task,) = batch_input([spec("a", retry={"backoff_seconds": 600}, delay_seconds=1.5)])
    assert task["retry"] == {"max_attempts": 1, "backoff_seconds": 600, "backoff_max_seconds": 600}
    assert task["delay_seconds"] == 1.5 and "not_before" not in task
    (task,) = batch_input([spec("a", retry={"backoff_max_seconds": 2})])
    assert task["retry"] == {"max_attempts": 1, "backoff_seconds": 2, "backoff_max_seconds": 2}
    (task,) = batch_input([spec("a", not_before="2026-11-28t10:00:00+01:00", retry=None)], None, 4)
    assert task["not_before"] == "2026-11-28T10:00:00+01:00"
    assert task["retry"]["max_attempts"] == 4


def test_get_task_shows_the_run_the_retry_settings_and_the_schedule(client, conn):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    tasks = create(
        client,
        spec("r", retry={"max_attempts": 3, "backoff_seconds": 60}),
        spec("s", not_before=later.isoformat()),
    )
    r, s = tasks["r"], tasks["s"]
    assert (r["attempt"], r["not_before"]) == (0, None)
    assert r["retry"] == {"max_attempts": 3, "backoff_seconds": 60, "backoff_max_seconds": 300}
    assert dt.datetime.fromisoformat(s["not_before"]) == later
    claim(conn)
    # the target reports a failure: a retry, shown by GET /task and the list
    result = client.simulate_patch(
        f"/task/{r['id']}", json={"status": "Failure", "failure_reason": "flaky"}
    )
    assert result.status_code == 200, result.text
    assert result.json["status"] == "Pending"
    got = client.simulate_get(f"/task/{r['id']}").json
    assert got["attempt"] == 1 and got["not_before"] is not None
    assert got["status_reason"].startswith("retry 1 of 2 in ")
    why = got["why_not_running"]
    assert why["reason"] == "scheduled"
    assert dt.datetime.fromisoformat(why["not_before"]) == dt.datetime.fromisoformat(
        got["not_before"]
    )
    listed = {t["id"]: t for t in client.simulate_get("/task").json}
    assert listed[r["id"]]["attempt"] == 1
    retries = REGISTRY.get_sample_value("task_retries_total", {"kind": "k"})
    assert retries is not None and retries >= 1


def test_patch_retryable_false_fails_at_once(client, conn):
    task = create(client, spec("r", retry={"max_attempts": 5}))["r"]
    claim(conn)
    result = client.simulate_patch(
        f"/task/{task['id']}",
        json={"status": "Failure", "failure_reason": "bad input", "retryable": False},
    )
    assert result.status_code == 200, result.text
    assert result.json["status"] == "Failure"
    assert result.json["failure_reason"] == "bad input"


def test_patch_retryable_without_failure_is_a_400(client, conn):
    task = create(client, spec("r", retry={"max_attempts": 5}))["r"]
    claim(conn)
    result = client.simulate_patch(f"/task/{task['id']}", json={"retryable": False})
    assert_error(result, 400, "retryable: only allowed when status is Failure")
    result = client.simulate_patch(
        f"/task/{task['id']}", json={"status": "Failure", "failure_reason": "x", "retryable": 1}
    )
    assert_error(result, 400, "retryable: must be true or false")


def test_task_retry_max_attempts_is_the_default(pool, buffer):  # noqa: F811
    client = client_with(pool, buffer, task_retry_max_attempts=3)
    tasks = create(client, spec("d"), spec("own", retry={"max_attempts": 1}))
    assert tasks["d"]["retry"]["max_attempts"] == 3
    assert tasks["own"]["retry"]["max_attempts"] == 1


def test_task_retry_max_attempts_from_the_environment():
    assert Config.from_env({"TASK_RETRY_MAX_ATTEMPTS": "4"}).task_retry_max_attempts == 4
    assert Config.from_env({}).task_retry_max_attempts == 1
    with pytest.raises(SystemExit, match="TASK_RETRY_MAX_ATTEMPTS"):
        Config.from_env({"TASK_RETRY_MAX_ATTEMPTS": "0"})
