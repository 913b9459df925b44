"""Monitoring, checked with the real tools (issue 11, item 4).

* ``deploy/prometheus/taskrunner.rules.yml``: ``promtool check rules`` and ``promtool
  test rules`` (its unit tests, a firing and a quiet case for every alert).
* ``deploy/grafana/taskrunner.json``: a dashboard Grafana can provision.
* Debian's ``prometheus`` (own config and data directory, a free port, 1 s scrapes)
  scrapes a real ``taskrunner up`` that runs a small DAG; then every recording rule,
  every alert's input and every dashboard panel's query must return data through
  Prometheus' HTTP API, so a renamed metric breaks the build instead of the dashboard.
* The ``metrics_snapshot`` query behind the database gauges, on SQL level.

promtool and prometheus come from Debian's ``prometheus`` package (``.ci/run`` installs
it); without them these tests are skipped, except on CI, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from conftest import create_batch, task_spec
from falcon import testing
from procs import Sink, free_port, hook, logged, service_env, wait_for
from prometheus_client import REGISTRY

from taskrunner import db
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer
from taskrunner.config import Config
from taskrunner.db import QUERIES

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/taskrunner.rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/taskrunner.rules.test.yml"
SCRAPE_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
DASHBOARD = ROOT / "deploy/grafana/taskrunner.json"
# Grafana's own variables, as it would fill them in for a panel (1 s scrapes here)
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s"}


def tool(name: str) -> str:
    """The path of a Debian ``prometheus`` package binary; skip without it (fail on CI)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing: .ci/run installs Debian's prometheus package")
    pytest.skip(f"{name} is not installed (Debian package prometheus)")


def _rules() -> list[dict]:
    return [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]


# --- the files, offline ------------------------------------------------------------------


def test_promtool_checks_the_rules_and_the_example_config() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(SCRAPE_CONFIG)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_runs_the_rules_unit_tests() -> None:
    done = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        cwd=RULE_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for alert in (r["alert"] for r in _rules() if "alert" in r):
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no case where it is quiet"


def test_the_dashboard_is_provisionable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "taskrunner" and "__inputs" not in dashboard  # file provisioning
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


# --- the metrics_snapshot query (the database gauges of /metrics) -----------------------

RULE = {"kind": "k", "status": "running", "fields": [], "max": 1}


def test_snapshot_counts_the_backlog_and_ages_only_tasks_a_rule_does_not_hold(conn) -> None:
    tasks = create_batch(
        conn,
        [
            task_spec("runs", rules=[RULE]),
            task_spec("held", rules=[RULE]),  # its rule's one slot is taken by "runs"
            task_spec("free", kind="other"),
            task_spec("child", kind="other", deps=["runs"]),
        ],
    )
    (claimed,) = conn.execute("SELECT * FROM taskrunner.claim_tasks('w', 1, 60)").fetchall()
    assert claimed["task_id"] == tasks["runs"]["id"]
    conn.execute(
        "UPDATE taskrunner.task SET last_updated = now() - interval '10 minutes' WHERE id = %s",
        (tasks["held"]["id"],),
    )
    snapshot = conn.execute(QUERIES["metrics_snapshot"]).fetchone()
    assert (snapshot["waiting"], snapshot["pending"], snapshot["running"]) == (1, 2, 1)
    assert snapshot["ready_oldest_seconds"] < 60  # "held" waited long, but its rule holds it
    assert (snapshot["deliveries_queued"], snapshot["deliveries_in_flight"]) == (0, 1)

    conn.execute(
        "UPDATE taskrunner.task SET last_updated = now() - interval '10 minutes' WHERE id = %s",
        (tasks["free"]["id"],),
    )
    snapshot = conn.execute(QUERIES["metrics_snapshot"]).fetchone()
    assert 600 <= snapshot["ready_oldest_seconds"] < 660


def test_snapshot_counts_worker_processes_by_their_listen_connection(conn, db_url) -> None:
    assert conn.execute(QUERIES["metrics_snapshot"]).fetchone()["workers_listening"] == 0
    with psycopg.connect(db_url, application_name="taskrunner-listen"):
        snapshot = conn.execute(QUERIES["metrics_snapshot"]).fetchone()
    assert snapshot["workers_listening"] == 1


# --- the API's /metrics: request metrics and the database gauges -------------------------


def _client(pool) -> testing.TestClient:
    return testing.TestClient(create_app(Config(), pool, CounterBuffer(pool, interval=3600)))


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_requests_by_route_template_and_read_the_database(pool, conn) -> None:
    client = _client(pool)
    labels = {"method": "GET", "route": "/task/{id}", "code": "404"}
    missing, unmatched = (
        _sample("http_requests_total", **labels),
        _sample("http_requests_total", method="GET", route="unmatched", code="404"),
    )
    create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])

    assert client.simulate_get(f"/task/{uuid.uuid4()}").status_code == 404
    assert client.simulate_get("/no/such/route").status_code == 404
    text = client.simulate_get("/metrics").text

    assert _sample("http_requests_total", **labels) == missing + 1  # one series for any id
    assert _sample("http_requests_total", method="GET", route="unmatched", code="404") == (
        unmatched + 1
    )
    assert _sample("http_request_duration_seconds_count", method="GET", route="/task/{id}") > 0
    assert "database_up 1.0" in text
    assert 'tasks_by_status{status="pending"} 1.0' in text
    assert 'tasks_by_status{status="waiting"} 1.0' in text
    assert "workers_listening 0.0" in text


def test_metrics_answer_with_database_up_0_while_the_database_is_out_of_reach() -> None:
    pool = db.create_pool(f"postgresql://root@127.0.0.1:{free_port()}/none", timeout=0.5)
    pool.open(wait=False)
    try:
        result = _client(pool).simulate_get("/metrics")
    finally:
        pool.close()
    assert result.status_code == 200
    assert "database_up 0.0" in result.text and "tasks_by_status" not in result.text
    assert "# TYPE tasks_created_total counter" in result.text  # the process's own still answer


# --- Prometheus scraping a real `taskrunner up` ----------------------------------------


def _prometheus(port: int, target: str, directory: Path) -> subprocess.Popen:
    """Debian's prometheus scraping ``target`` every second, with our rules loaded."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "taskrunner", "static_configs": [{"targets": [target]}]}],
    }
    (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    return subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def prometheus_dir(tmp_path_factory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("prometheus")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _query(base: str, expr: str) -> list:
    body = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _queries_to_check() -> dict[str, str]:
    """What must return data, named for the failure message: every recording rule, the
    left side of every alert's comparison, every dashboard panel's queries."""
    queries = {}
    for rule in _rules():
        if "record" in rule:
            queries[f"rule {rule['record']}"] = rule["expr"]
        else:
            left = re.fullmatch(r"(?s)(.+?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.]+\s*", rule["expr"])
            assert left, f"alert {rule['alert']}: not '<query> <op> <number>'"
            queries[f"alert {rule['alert']}"] = left.group(1)
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries[f"panel {panel['title']!r} {target['refId']}"] = expr
    return queries


def test_prometheus_gets_data_for_every_rule_and_panel_from_a_real_up(
    db_url: str, prometheus_dir: Path
) -> None:
    api_port, prom_port = free_port(), free_port()
    env = service_env(db_url, api_port, prometheus_dir, LOG_LEVEL="info")
    del env["PROMETHEUS_MULTIPROC_DIR"]  # `up` makes its own
    env["TASKRUNNER_STATE_DIR"] = str(prometheus_dir / "state")
    args = ["up", "--port", str(api_port), "--api-processes", "1", "--worker-processes", "1"]
    api, prom = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    sink = Sink()
    prometheus = _prometheus(prom_port, f"127.0.0.1:{api_port}", prometheus_dir)
    try:
        with logged(args, env) as up:
            up.wait_for("taskrunner is up", timeout=90)
            # a small DAG: a, then b and c; the sink reports each start a success
            dag = [
                {"id": "a", "name": "a", "kind": "obs", "on_start": hook(sink.url)},
                *(
                    {
                        "id": x,
                        "name": x,
                        "kind": "obs",
                        "on_start": hook(sink.url),
                        "dependencies": [{"id": "a", "requires_success": True}],
                    }
                    for x in ("b", "c")
                ),
            ]
            assert httpx.post(f"{api}/task", json=dag).status_code == 201
            wait_for(lambda: _all_succeeded(api), 30)
            wait_for(lambda: _ready(prom), 30)
            queries = _queries_to_check()
            empty = dict(queries)

            def all_answered() -> bool:
                # concurrently: Prometheus answers each in well under a millisecond, the
                # round trips on a busy machine take long
                with ThreadPoolExecutor(8) as pool:
                    answers = pool.map(lambda expr: _query(prom, expr), empty.values())
                    answered = dict(zip(empty, answers, strict=True))
                for name, answer in answered.items():
                    if answer:
                        del empty[name]
                return not empty

            deadline = time.monotonic() + 30
            while not all_answered() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not empty, "no data: " + json.dumps(empty, indent=1)
            rules = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"]
            unhealthy = {
                r["name"]: (r["health"], r.get("lastError"))
                for group in rules
                for r in group["rules"]
                if r["health"] != "ok" or r.get("lastError")
            }
            assert not unhealthy
    finally:
        prometheus.terminate()
        _, errors = prometheus.communicate(timeout=20)
        sink.close()
    assert "level=error" not in errors, errors


def _all_succeeded(api: str) -> bool:
    tasks = httpx.get(f"{api}/task", params={"kind": "obs"}).json()
    return len(tasks) == 3 and {t["status"] for t in tasks} == {"Success"}


def _ready(prom: str) -> bool:
    try:
        return httpx.get(f"{prom}/-/ready").status_code == 200
    except httpx.TransportError:
        return False
