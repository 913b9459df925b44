"""What the processes log, read from the output of real subprocesses (issue 14 item 2), and
the metrics of ``up`` (issue 13 item 12): one multiprocess directory per instance, and
every declared metric listed from the start.

Every process here runs with a password in ``DATABASE_URL`` (the test server trusts local
connections, so any password works) and an ``API_TOKEN``: neither may appear in any output.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from conftest import SEED_METRICS, create_batch, task_spec, webhook
from procs import Reply, Sink, free_port, logged, service_env, wait_for, wait_healthy

from taskrunner import metrics

pytestmark = pytest.mark.slow

PASSWORD = "pw-Secret-4711"
TOKEN = "tok-Secret-0815"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def with_password(url: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    user = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}"))


def assert_no_secrets(output: str) -> None:
    assert PASSWORD not in output
    assert TOKEN not in output


def test_worker_log_level_debug_prints_debug_lines(db_url: str, tmp_path: Path) -> None:
    env = service_env(with_password(db_url), free_port(), tmp_path, API_TOKEN=TOKEN)
    with logged(["worker", "--log-level", "debug"], env) as worker:
        start = worker.wait_for("worker starting")
        worker.wait_for("DEBUG taskrunner.worker", "listening for notifications")
        output = worker.stop()

    assert "log_level=debug" in start and "database_url=" in start
    assert "api_token=set" in start
    assert_no_secrets(output)


def test_failed_and_given_up_webhooks_are_logged_at_warning(
    db_url: str, conn, tmp_path: Path
) -> None:
    sink = Sink(respond=lambda req: Reply(status=503))
    env = service_env(
        with_password(db_url),
        free_port(),
        tmp_path,
        LOG_LEVEL="info",
        WEBHOOK_MAX_ATTEMPTS="2",
        WEBHOOK_BACKOFF_BASE="0.05",
        WEBHOOK_BACKOFF_MAX="0.1",
    )
    task = create_batch(conn, [task_spec("a", actions=[webhook(url=f"{sink.url}/start")])])["a"]
    of_task = f"(start of task {task['id']})"
    try:
        with logged(["worker"], env) as worker:
            claimed = worker.wait_for(of_task, "attempt 1 claimed")
            # the delivery was made by the claim: its id is in the line
            name = re.search(r"delivery \S+ \(start of task \S+\)", claimed).group(0)
            first = worker.wait_for(name, "attempt 1 failed")
            second = worker.wait_for(name, "attempt 2 failed")
            gave_up = worker.wait_for(name, "attempt 2 gave up")
            output = worker.stop()
    finally:
        sink.close()

    assert " INFO " in claimed
    delivery = conn.execute(
        "SELECT id FROM taskrunner.delivery WHERE task_id = %s", (task["id"],)
    ).fetchone()["id"]
    assert name == f"delivery {delivery} {of_task}"
    assert " WARNING " in first and "HTTP 503" in first and "retry in" in first
    assert " WARNING " in second and "HTTP 503" in second and "giving up" in second
    assert " WARNING " in gave_up and "HTTP 503" in gave_up
    assert_no_secrets(output)


def test_api_logs_requests_and_the_changes_it_made(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(with_password(db_url), port, tmp_path, LOG_LEVEL="info", API_TOKEN=TOKEN)
    with logged(["api", "--processes", "1"], env) as api:
        wait_healthy(base)
        body = [{"id": "a", "name": "a", "kind": "k", "on_start": _hook("http://127.0.0.1:9/")}]
        created = httpx.post(f"{base}/task", json=body, headers=AUTH)
        assert created.status_code == 201, created.text
        task_id, batch_id = created.json()[0]["id"], created.headers["X-Batch-ID"]
        assert httpx.delete(f"{base}/task/{task_id}", headers=AUTH).status_code == 200
        assert httpx.get(f"{base}/task", params={"batch_id": batch_id}).status_code == 401

        api.wait_for("INFO taskrunner.api.requests", "POST /task 201")
        api.wait_for(f"batch {batch_id} created: 1 tasks")
        api.wait_for(f"task {task_id} canceled -> Canceled")
        api.wait_for(f"DELETE /task/{task_id} 200")
        api.wait_for(f"GET /task?batch_id={batch_id} 401")
        output = api.stop()

    start = next(line for line in output.splitlines() if "API starting" in line)
    assert "database_url=postgresql://" in start and ":***@" in start
    assert_no_secrets(output)


def _hook(url: str) -> dict:
    return {"kind": "Webhook", "params": {"url": url, "verb": "Post"}}


# -- up: start-up lines, metrics ------------------------------------------------------------


@pytest.fixture
def state_dir() -> Path:
    """A checkout's state directory, shared by the `up` instances of one test."""
    root = Path(tempfile.mkdtemp(prefix="tr-logs-", dir="/tmp"))
    yield root / ".taskrunner"
    shutil.rmtree(root, ignore_errors=True)


def _up_env(db_url: str, state_dir: Path, port: int) -> dict[str, str]:
    env = service_env(with_password(db_url), port, state_dir, LOG_LEVEL="info", API_TOKEN=TOKEN)
    del env["PROMETHEUS_MULTIPROC_DIR"]  # `up` chooses it
    env["TASKRUNNER_STATE_DIR"] = str(state_dir)
    return env


def _up(db_url: str, state_dir: Path):
    port = free_port()
    args = ["up", "--port", str(port), "--api-processes", "1", "--worker-processes", "1"]
    return logged(args, _up_env(db_url, state_dir, port)), f"http://127.0.0.1:{port}"


def _metric(base: str, name: str) -> float | None:
    text = httpx.get(f"{base}/metrics").text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def test_up_logs_each_process_start_and_lists_every_seed_metric(
    db_url: str, state_dir: Path
) -> None:
    starting, base = _up(db_url, state_dir)
    with starting as up:
        up.wait_for("taskrunner is up", timeout=90)
        text = httpx.get(f"{base}/metrics").text
        for name in SEED_METRICS:
            assert f"# TYPE {name} " in text, name
        for what in ("up starting", "API starting", "worker starting"):
            up.wait_for(what)
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=60) == 0
        output = up.stop()

    assert "DATABASE_URL=postgresql://" in output
    assert_no_secrets(output)
    assert list((state_dir / "metrics").iterdir()) == []  # removed on a clean exit


def test_two_ups_in_one_checkout_keep_their_own_metrics(db_url: str, state_dir: Path) -> None:
    starting, first_base = _up(db_url, state_dir)
    with starting as first:
        first.wait_for("taskrunner is up", timeout=90)
        body = [{"id": "a", "name": "a", "kind": "k", "on_start": _hook("http://127.0.0.1:9/")}]
        assert httpx.post(f"{first_base}/task", json=body, headers=AUTH).status_code == 201
        wait_for(lambda: _metric(first_base, "tasks_created_total") == 1.0, 10)

        starting, second_base = _up(db_url, state_dir)
        with starting as second:
            second.wait_for("taskrunner is up", timeout=90)
            assert _metric(first_base, "tasks_created_total") == 1.0
            assert _metric(second_base, "tasks_created_total") == 0.0
            assert len(list((state_dir / "metrics").iterdir())) == 2


def test_an_instance_directory_outlives_only_its_own_process(tmp_path: Path) -> None:
    parent = tmp_path / "metrics"
    (parent / "999999999").mkdir(parents=True)  # a pid no process has: a killed instance
    mine = metrics.instance_dir(parent)
    assert sorted(p.name for p in parent.iterdir()) == [mine.name]


def test_log_format_json_makes_every_line_of_up_a_json_object_with_its_ids(
    db_url: str, state_dir: Path
) -> None:
    sink = Sink()  # reports Success through the handle (no API_TOKEN here: it sends none)
    port = free_port()
    env = _up_env(db_url, state_dir, port) | {"LOG_FORMAT": "json"}
    del env["API_TOKEN"]
    args = ["up", "--port", str(port), "--api-processes", "1", "--worker-processes", "1"]
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = [
        {
            "id": "a",
            "name": "a",
            "kind": "k",
            "on_start": _hook(f"{sink.url}/start"),
            "on_success": [_hook(f"{sink.url}/done")],
        }
    ]
    try:
        with logged(args, env) as up:
            up.wait_for("taskrunner is up", timeout=90)
            headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
            created = httpx.post(f"http://127.0.0.1:{port}/task", json=body, headers=headers)
            assert created.status_code == 201, created.text
            up.wait_for("(success of task", "recorded: delivered")
            up.proc.send_signal(signal.SIGTERM)
            assert up.proc.wait(timeout=60) == 0
            output = up.stop()
    finally:
        sink.close()

    lines = [json.loads(line) for line in output.splitlines()]  # each one a JSON object
    task_id, batch_id = created.json()[0]["id"], created.headers["X-Batch-ID"]

    def the(start: str) -> dict:
        return next(line for line in lines if line["message"].startswith(start))

    assert the("up starting")["name"] == "taskrunner.cli"
    assert the("taskrunner is up")["levelname"] == "INFO"
    # up names each worker process by the id the worker logs and records on its claims
    worker = the("worker 1 is ")["worker"]
    assert the(f"worker {worker} started")["worker"] == worker
    created_line = the(f"batch {batch_id} created")
    assert created_line["batch_id"] == batch_id and created_line["trace_id"] == trace
    updated = the(f"task {task_id} updated")
    assert updated["task_id"] == task_id and updated["batch_id"] == batch_id
    claimed = [line for line in lines if line["message"].endswith("claimed (task Running)")]
    (start,) = [line for line in claimed if f"task {task_id}" in line["message"]]
    assert start["task_id"] == task_id and start["batch_id"] == batch_id
    assert start["worker"] == worker and start["trace_id"] == trace
    assert start["delivery_id"] in start["message"]
    assert_no_secrets(output)
