"""Load with many processes: 4 API processes and 4 worker processes run 5,000 tasks in
mixed DAGs under per-kind and per-metadata-field concurrency rules.

The remote side (the sink) reports progress with PUT /task (both forms) and the outcome
with PATCH, and fails the tasks the scenario says fail. Everything is then checked from
the database's own records: final states, rule peaks, one start per claim, every webhook
delivered, counters summed exactly, history chains unbroken.
"""

from __future__ import annotations

import contextlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from invariants import (
    assert_counters,
    assert_deliveries_settled,
    assert_final_states,
    assert_history_consistent,
    assert_no_double_start,
    assert_rule_respected,
)
from procs import Sink, free_port, service, wait_for

pytestmark = pytest.mark.slow

DAGS = 200
TENANTS = 5
INGEST_PER_TENANT = 3  # rule: ingest tasks running per tenant
RENDER_MAX = 8  # rule: render tasks running at all


def _rule(kind: str, fields: list[str], limit: int) -> dict:
    return {
        "Concurency": {
            "matcher": {"kind": kind, "status": "Running", "fields": fields},
            "max_concurency": limit,
        }
    }


def build_dag(n: int, sink_url: str, rng: random.Random) -> list[dict]:
    """One batch of 25 tasks: 4 ingests -> 10 transforms -> 5 renders -> 5 reports, plus
    one report needing everything. Names ending in '!' are failed by the sink."""
    tenant = f"t{n % TENANTS}"

    def task(local_id: str, kind: str, deps=(), rules=(), fail=False, hooks=False) -> dict:
        spec = {
            "id": local_id,
            "name": f"{n}/{local_id}{'!' if fail else ''}",
            "kind": kind,
            "metadata": {"tenant": tenant, "dag": n},
            "on_start": {"kind": "Webhook", "params": {"url": f"{sink_url}/start", "verb": "Post"}},
            "dependencies": [{"id": d, "requires_success": req} for d, req in deps],
            "rules": list(rules),
        }
        if hooks:
            end = {"kind": "Webhook", "params": {"url": f"{sink_url}/end", "verb": "Put"}}
            spec["on_success"] = [end]
            spec["on_failure"] = [end]
        return spec

    ingest_rule = _rule("ingest", ["tenant"], INGEST_PER_TENANT)
    render_rule = _rule("render", [], RENDER_MAX)
    tasks = [
        task(f"i{i}", "ingest", rules=[ingest_rule], fail=rng.random() < 0.05) for i in range(4)
    ]
    for i in range(10):
        deps = [(f"i{i % 4}", True), (f"i{(i + 1) % 4}", i % 3 != 0)]
        tasks.append(task(f"x{i}", "transform", deps, fail=rng.random() < 0.03))
    for i in range(5):
        deps = [(f"x{2 * i}", True), (f"x{2 * i + 1}", False)]
        tasks.append(task(f"r{i}", "render", deps, rules=[render_rule], hooks=True))
    for i in range(5):
        tasks.append(task(f"p{i}", "report", [(f"r{i}", i % 2 == 0)], hooks=i == 0))
    tasks.append(task("all", "report", [(f"p{i}", False) for i in range(5)], hooks=True))
    return tasks


def expected_states(dag: list[dict]) -> dict[str, tuple[str, bool]]:
    """Each task's final status and whether it runs at all (a task whose required parent
    failed fails without starting). Tasks are listed after their parents."""
    states: dict[str, tuple[str, bool]] = {}
    for t in dag:
        runs = all(
            states[d["id"]][0] == "success" or not d["requires_success"] for d in t["dependencies"]
        )
        ok = runs and not t["name"].endswith("!")
        states[t["id"]] = ("success" if ok else "failure", runs)
    return states


class Remote:
    """The remote side: on each start, PUT some progress, then PATCH more and the outcome."""

    def __init__(self, base: str) -> None:
        self.base = base
        # no keep-alive: a request racing the server's idle close could not be retried
        # safely (counters would double). A generous timeout: this test is about nothing
        # lost or doubled, and a shared CI machine can stall a request for a while.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        self.client = httpx.Client(timeout=120, limits=limits)

    def on_start(self, req: dict) -> None:
        task_id = req["headers"]["x-task-id"]
        s, f = counters_for(task_id)
        if int(task_id[-1], 16) % 2:
            resp = self.client.put(f"{self.base}/task", json={"task_id": task_id, "new_success": s})
        else:
            resp = self.client.put(f"{self.base}/task/{task_id}", json={"new_success": s})
        assert resp.status_code == 202, resp.text
        body = {"new_success": 1, "new_failures": f}
        if req["query"]["handle"] and req["headers"].get("x-task-name", "").endswith("!"):
            body.update(status="Failure", failure_reason="scenario")
        else:
            body["status"] = "Success"
        resp = self.client.patch(req["query"]["handle"][0], json=body)
        assert resp.status_code == 200, resp.text


def counters_for(task_id: str) -> tuple[int, int]:
    """The increments the remote side sends for a task: PUT s, PATCH 1 + f failures."""
    h = int(task_id[:8], 16)
    return h % 7 + 1, h % 3


def test_5000_tasks_4_apis_4_workers_nothing_lost_doubled_or_exceeded(db_url, conn, tmp_path):
    run_load(db_url, conn, tmp_path, DAGS)


def run_load(db_url: str, conn, tmp_path, n_dags: int, **env_extra: str) -> None:
    """``n_dags`` DAGs of 25 tasks through 4 API and 4 worker processes on ``db_url``
    (``env_extra``: more settings for them), then every invariant checked on ``conn``."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = {"API_PROCESSES": "4", "WORKER_CONCURRENCY": "16", "POOL_MAX_SIZE": "4"}
    settings |= env_extra
    remote = Remote(base)
    sink = Sink(on_start=remote.on_start)
    rng = random.Random(3)
    dags = [build_dag(n, sink.url, rng) for n in range(n_dags)]
    # the sink learns from X-Task-Name which tasks to fail: put it in the start headers
    for dag in dags:
        for t in dag:
            t["on_start"]["params"]["headers"] = {"X-Task-Name": t["name"]}
    expected: dict[str, str] = {}
    ran: set[str] = set()
    started = time.monotonic()
    try:
        with service(db_url, tmp_path, port=port, worker_processes=4, **settings):

            def submit(dag: list[dict]) -> None:
                resp = remote.client.post(f"{base}/task", json=dag)
                assert resp.status_code == 201, resp.text
                states = expected_states(dag)
                for row in resp.json():
                    expected[row["id"]], runs = states[row["local_id"]]
                    if runs:
                        ran.add(row["id"])

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(submit, dags))
            assert len(expected) == n_dags * 25

            def settled() -> bool:
                row = conn.execute(
                    """
                    SELECT count(*) FILTER (WHERE status NOT IN ('success', 'failure')) AS open,
                           (SELECT count(*) FROM taskrunner.delivery
                            WHERE status IN ('queued', 'in_flight')) AS deliveries
                    FROM taskrunner.task
                    """
                ).fetchone()
                return row["open"] == 0 and row["deliveries"] == 0

            wait_for(settled, 240, interval=0.5, message="every task and webhook to finish")
            print(f"\nsettled after {time.monotonic() - started:.0f}s")
            want = {t: (0, 0) for t in expected}
            for t in ran:
                s, f = counters_for(t)
                want[t] = (s + 1, f)

            def counters_flushed() -> bool:
                row = conn.execute(
                    "SELECT sum(success) AS s, sum(failures) AS f FROM taskrunner.task"
                ).fetchone()
                return (row["s"], row["f"]) == (
                    sum(s for s, _ in want.values()),
                    sum(f for _, f in want.values()),
                )

            with contextlib.suppress(AssertionError):  # assert_counters names the culprits
                wait_for(counters_flushed, 30, message="PUT /task buffers to be flushed")
    finally:
        sink.close()
        remote.client.close()
    elapsed = time.monotonic() - started

    assert_final_states(conn, expected)
    ingest_peaks = assert_rule_respected(conn, "ingest", ["tenant"], INGEST_PER_TENANT)
    render_peaks = assert_rule_respected(conn, "render", [], RENDER_MAX)
    starts = assert_no_double_start(conn)
    delivered = assert_deliveries_settled(conn, sink.received())
    increments = assert_counters(conn, want)
    transitions = assert_history_consistent(conn)
    assert starts["restarts"] == 0  # no crash in this test: each task started exactly once
    assert len(sink.starts()) == starts["claims"] == len(ran)
    print(
        f"\nload: {len(expected)} tasks in {elapsed:.0f}s, {transitions} transitions, "
        f"{delivered}, {increments} counter increments, starts {starts}, "
        f"peaks ingest {max(ingest_peaks.values())}/{INGEST_PER_TENANT} "
        f"render {max(render_peaks.values())}/{RENDER_MAX}"
    )
