"""PostgreSQL stopping and coming back mid-run, on a cluster this test starts itself
(``EmbeddedPostgres``: as user ``postgres`` when we are root).

While the database is down the API answers 503 JSON within a bound (the pool timeout
plus slack), /health stays 200, and the remote side's reports are retried by it; when it
is back, the API and the workers recover by themselves (no restart) and every task ends
where the promise says, every delivery recorded.
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
from invariants import (
    assert_deliveries_settled,
    assert_final_states,
    assert_history_consistent,
    assert_no_double_start,
)
from procs import Reply, Sink, free_port, running, service_env, wait_for, wait_healthy
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
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # WEBHOOK_TIMEOUT=2: leases of 14 s outlive the outage, so in-flight results are
    # recorded once the database is back rather than expiring
    env = service_env(url, port, tmp_path, WEBHOOK_TIMEOUT="2", WORKER_CONCURRENCY="8")
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
        with running(["api"], env), running(["worker", "--processes", "2"], env):
            wait_healthy(base)
            resp = httpx.post(f"{base}/task", json=batch)
            assert resp.status_code == 201, resp.text
            tasks = resp.json()
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
