"""PostgreSQL stopping and coming back mid-run, on a cluster this test starts itself
(``EmbeddedPostgres``: as user ``postgres`` when we are root).

While the database is down the API answers 503 JSON within a bound (the pool timeout
plus slack), /health stays 200, and the remote side's reports are retried by it; when it
is back, the API and the workers recover by themselves (no restart) and every task ends
where the promise says, every delivery recorded.

PUT /task (buffered counters) keeps the same promise: its buffer is bounded
(``COUNTER_BUFFER_MAX``) and, once a flush found the database down, PUT answers 503 like
every other route; every increment it accepted is written once the database is back.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import create_batch, task_spec
from invariants import (
    assert_counters,
    assert_deliveries_settled,
    assert_final_states,
    assert_history_consistent,
    assert_no_double_start,
)
from procs import (
    Reply,
    Sink,
    free_port,
    running,
    service,
    service_env,
    stop,
    wait_for,
    wait_healthy,
)
from psycopg.rows import dict_row

from taskrunner import migrate, pgtools
from taskrunner.embedded import EmbeddedPostgres

try:
    pgtools.find_pg_bindir()
except pgtools.PgToolsNotFound as exc:
    pytest.skip(f"no PostgreSQL server binaries: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow

POOL_TIMEOUT = 5.0  # taskrunner.db.create_pool's default
BOUND_503 = POOL_TIMEOUT + 2


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    base = Path(tempfile.mkdtemp(prefix="tr-pgrestart-", dir="/tmp"))
    base.chmod(0o755)  # the postgres user must reach it when we are root
    pg = EmbeddedPostgres(base / "cluster")
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _open(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT (SELECT count(*) FROM taskrunner.task"
        "        WHERE status NOT IN ('success', 'failure', 'canceled'))"
        "     + (SELECT count(*) FROM taskrunner.delivery"
        "        WHERE status IN ('queued', 'in_flight')) AS n"
    ).fetchone()["n"]


def test_postgres_restart_mid_run(cluster, tmp_path):
    url = cluster.start()
    migrate.migrate(url)
    # WEBHOOK_TIMEOUT=2: leases of 14 s outlive the outage, so in-flight results are
    # recorded once the database is back rather than expiring
    settings = {"WEBHOOK_TIMEOUT": "2", "WORKER_CONCURRENCY": "8"}
    sink = Sink(respond=lambda req: Reply(delay=0.05))
    hook = {"kind": "Webhook", "params": {"url": f"{sink.url}/start", "verb": "Post"}}
    done = {"kind": "Webhook", "params": {"url": f"{sink.url}/done", "verb": "Post"}}
    # 10 chains of 30: work is still pending when the database goes away
    batch = [
        {
            "id": f"c{c}-{i}",
            "name": f"c{c}-{i}",
            "kind": "chain",
            "on_start": hook,
            "on_success": [done],
            "dependencies": [{"id": f"c{c}-{i - 1}", "requires_success": True}] if i else [],
        }
        for c in range(10)
        for i in range(30)
    ]
    outage: dict[str, float] = {}
    try:
        with service(url, tmp_path, **settings) as svc:
            base = svc.base
            tasks = svc.post(batch).json()
            with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
                wait_for(
                    lambda: (
                        conn.execute(
                            "SELECT count(*) AS n FROM taskrunner.task WHERE status = 'success'"
                        ).fetchone()["n"]
                        >= 50
                    ),
                    60,
                    message="the run to get going",
                )
            cluster.stop()  # pg_ctl stop -m fast: every connection is cut

            # while it is down: 503 JSON within the bound, for a write and a read
            for method, path, body in [
                ("POST", "/task", batch[:1]),
                ("GET", f"/task/{tasks[-1]['id']}", None),
                ("PATCH", f"/task/{tasks[-1]['id']}", {"new_success": 1}),
            ]:
                started = time.monotonic()
                resp = httpx.request(method, f"{base}{path}", json=body, timeout=30)
                took = time.monotonic() - started
                outage[f"{method} {path.split('/')[1]}"] = round(took, 2)
                assert resp.status_code == 503, resp.text
                assert resp.headers["content-type"].startswith("application/json")
                assert resp.json()["error"] == "database unavailable"
                assert took <= BOUND_503, f"{method} {path}: 503 after {took:.1f}s"
            assert httpx.get(f"{base}/health").status_code == 200
            assert httpx.get(f"{base}/ready").status_code == 503

            assert cluster.start() == url  # same port, same data
            wait_for(
                lambda: httpx.get(f"{base}/ready").status_code == 200,
                30,
                message="the API to be ready again by itself",
            )
            with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
                wait_for(lambda: _open(conn) == 0, 120, interval=0.3, message="the run to end")
    finally:
        sink.close()

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        assert_final_states(conn, {t["id"]: "success" for t in tasks})
        starts = assert_no_double_start(conn)
        settled = assert_deliveries_settled(conn, sink.received())
        assert_history_consistent(conn)
    print(f"\npostgres restart: {len(tasks)} tasks, 503 in {outage}, {starts}, {settled}")


# -- PUT /task while the database is down ---------------------------------------------------


def _put(base: str, task_id: str, success: int = 1) -> httpx.Response:
    body = {"task_id": task_id, "new_success": success}
    return httpx.put(f"{base}/task", json=body, timeout=30)


def _assert_written(url: str, accepted: dict[str, int]) -> int:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return assert_counters(conn, {t: (s, 0) for t, s in accepted.items()})


def _counters_setup(
    cluster: EmbeddedPostgres, tmp_path: Path, tasks: int, **extra: str
) -> tuple[str, list[str], str, dict[str, str]]:
    """A migrated cluster with ``tasks`` tasks and the env of a one-process API on it:
    (database URL, task ids, API base URL, env)."""
    url = cluster.start()
    migrate.migrate(url)
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        created = create_batch(conn, [task_spec(f"t{i}") for i in range(tasks)])
    port = free_port()
    env = service_env(url, port, tmp_path, API_PROCESSES="1", **extra)
    return url, [str(t["id"]) for t in created.values()], f"http://127.0.0.1:{port}", env


def test_put_task_buffer_is_bounded_while_postgres_is_down(cluster, tmp_path):
    # the flush timer never fires, so the buffer never learns the database is down: only
    # the bound stands between an outage and unbounded memory
    url, ids, base, env = _counters_setup(
        cluster, tmp_path, 25, COUNTER_FLUSH_INTERVAL="3600", COUNTER_BUFFER_MAX="10"
    )
    accepted: dict[str, int] = {}
    refused = []
    with running(["api"], env) as api:
        wait_healthy(base)
        cluster.stop()
        for task_id in ids:
            resp = _put(base, task_id)
            if resp.status_code == 202:
                accepted[task_id] = 1
            else:
                assert resp.status_code == 503, resp.text
                assert resp.json()["error"] == "counter buffer full", resp.text
                refused.append(task_id)
        # a task already buffered adds to its sums, not to the buffer
        assert _put(base, ids[0], 4).status_code == 202
        accepted[ids[0]] += 4
        # a request that would go past the bound is refused whole
        resp = httpx.put(
            f"{base}/task",
            json=[{"task_id": ids[1], "new_success": 1}, {"task_id": ids[-1], "new_success": 1}],
            timeout=30,
        )
        assert resp.status_code == 503, resp.text
        assert cluster.start() == url
        code = stop(api)  # the graceful stop writes what the buffer holds

    assert (len(accepted), len(refused)) == (10, 15)
    assert code == 0
    total = _assert_written(url, {t: accepted.get(t, 0) for t in ids})
    print(
        f"\nPUT buffer bound 10: {len(accepted)} tasks accepted ({total} increments, all written)"
    )


def test_put_task_is_503_once_the_buffer_knows_postgres_is_down(cluster, tmp_path):
    url, ids, base, env = _counters_setup(
        cluster, tmp_path, 5, COUNTER_FLUSH_INTERVAL="0.1", COUNTER_BUFFER_MAX="100"
    )
    accepted = dict.fromkeys(ids, 0)
    with running(["api"], env) as api:
        wait_healthy(base)
        assert _put(base, ids[0]).status_code == 202
        accepted[ids[0]] += 1
        cluster.stop()
        # the first PUTs may land before a flush has failed: they are held, not lost
        down_after = 0
        deadline = time.monotonic() + BOUND_503 + 5
        while True:
            resp = _put(base, ids[1])
            if resp.status_code != 202:
                break
            accepted[ids[1]] += 1
            down_after += 1
            assert time.monotonic() < deadline, (
                "PUT /task still accepted while the database is down"
            )
            time.sleep(0.05)
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"] == "database unavailable"
        for task_id in ids:  # whatever the task, as long as the database is down
            assert _put(base, task_id).status_code == 503

        assert cluster.start() == url
        deadline = time.monotonic() + 30
        while (resp := _put(base, ids[2])).status_code != 202:
            assert resp.status_code == 503, resp.text
            assert time.monotonic() < deadline, "PUT /task did not recover by itself"
            time.sleep(0.1)
        accepted[ids[2]] += 1
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            wait_for(
                lambda: (
                    conn.execute("SELECT sum(success) AS n FROM taskrunner.task").fetchone()["n"]
                    == sum(accepted.values())
                ),
                30,
                message="the held increments to be written",
            )
        code = stop(api)

    assert code == 0
    total = _assert_written(url, accepted)
    print(f"\nPUT while down: {down_after} accepted before 503, {total} increments, all written")
