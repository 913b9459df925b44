"""Through PgBouncer in transaction pooling mode (Debian's ``pgbouncer``, a real one).

The API and the workers reach PostgreSQL only through PgBouncer (``DATABASE_URL``); the
workers' LISTEN connection goes direct (``LISTEN_DATABASE_URL``), since a LISTEN through a
transaction pooler hears nothing. Transaction pooling hands each transaction whichever
server connection is free: no server-side prepared statements (``DATABASE_POOLER=pgbouncer``),
no session state.
A DAG end to end, then the load test's scenario and invariants at a small size.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pgbouncer
import pytest
from procs import Sink, free_port, hook, running, service_env, wait_for, wait_healthy
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from test_load import run_load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not pgbouncer.binary(), reason="pgbouncer is not installed"),
]


def behind_pgbouncer(direct_url: str) -> dict[str, str]:
    """The settings (besides DATABASE_URL) of a service behind PgBouncer."""
    return {"DATABASE_POOLER": "pgbouncer", "LISTEN_DATABASE_URL": direct_url}


@pytest.fixture
def bouncer_url(db_url: str) -> Iterator[str]:
    """``db_url`` through a PgBouncer of its own (transaction pooling)."""
    params = conninfo_to_dict(db_url)
    with pgbouncer.running(params["user"], params["host"], int(params["port"])) as port:
        yield make_conninfo(db_url, host="127.0.0.1", port=str(port))


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_dag_runs_through_pgbouncer_with_listen_direct(db_url, bouncer_url, conn, tmp_path):
    sink = Sink()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # polls and ticks 30 s apart: the DAG finishes sooner only if NOTIFY wakes the workers
    slow_polls = {"POLL_INTERVAL": "30", "TICK_INTERVAL": "30"}
    env = service_env(bouncer_url, port, tmp_path, **behind_pgbouncer(db_url), **slow_polls)
    dag = [
        {"id": "a", "name": "a", "kind": "etl", "on_start": hook(f"{sink.url}/start/a")},
        {"id": "b", "name": "b", "kind": "etl", "on_start": hook(f"{sink.url}/start/b")},
        {
            "id": "c",
            "name": "c",
            "kind": "etl",
            "on_start": hook(f"{sink.url}/start/c"),
            "on_success": [hook(f"{sink.url}/done/c")],
            "dependencies": [{"id": d, "requires_success": True} for d in ("a", "b")],
        },
    ]
    try:
        with running(["api"], env), running(["worker", "--processes", "2"], env):
            wait_healthy(base)
            # enough rounds on each pooled connection to pass psycopg's prepare threshold
            for _ in range(20):
                assert httpx.get(f"{base}/task", params={"kind": "etl"}).status_code == 200
            # the trace context is set for create_batch's transaction (SET LOCAL): it must
            # stay in that transaction, which PgBouncer keeps on one server connection
            headers = {"X-Requester": "bouncer", "traceparent": TRACEPARENT}
            resp = httpx.post(f"{base}/task", json=dag, headers=headers)
            assert resp.status_code == 201, resp.text
            batch = resp.headers["X-Batch-ID"]

            def all_done():
                tasks = httpx.get(f"{base}/task", params={"batch_id": batch}).json()
                return all(t["status"] == "Success" for t in tasks) and tasks

            # (a LISTEN through PgBouncer hears nothing: this then times out)
            assert len(wait_for(all_done, 25, message="the DAG to finish")) == 3
            wait_for(lambda: len(sink.requests) == 4, 20, message="the on_success webhook")
            assert httpx.get(f"{base}/ready").status_code == 200
    finally:
        sink.close()
    order = [r["path"] for r in sink.starts()]
    assert order[-1] == "/start/c" and len(order) == 3
    assert {r["headers"]["traceparent"][3:35] for r in sink.requests} == {TRACEPARENT[3:35]}
    actors = {
        r["actor"]
        for r in conn.execute("SELECT DISTINCT actor FROM taskrunner.task_history").fetchall()
    }
    # application_name reaches the server through PgBouncer: history still says who
    assert {a.split(" ")[0] for a in actors} >= {"taskrunner-api", "taskrunner-worker"}


def test_load_invariants_through_pgbouncer(db_url, bouncer_url, conn, tmp_path):
    run_load(bouncer_url, conn, tmp_path, 8, **behind_pgbouncer(db_url))
