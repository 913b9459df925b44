"""Upgrade: a database at release v0.1.0 that holds live work is migrated to the head with
dbmate, then the head's API and worker processes run that work to completion.

The live work is made through v0.1.0's own SQL interface, as a v0.1.0 service would leave
it when it is stopped for the upgrade: running tasks whose start was acknowledged or is
still in flight (leased to a worker that is gone), a waiting child, end webhooks queued
and in flight, a paused task. While the head is v0.1.0 itself the upgrade step applies
nothing; every migration added later is applied here, under that work.
"""

from __future__ import annotations

from collections import Counter

import httpx
import psycopg
import pytest
from conftest import create_batch, task_spec, webhook
from invariants import (
    assert_deliveries_settled,
    assert_final_states,
    assert_history_consistent,
    assert_no_double_start,
)
from procs import Sink, count, service, wait_for
from psycopg.rows import dict_row
from releases import copy_release, migration_files, version

from taskrunner import migrate

pytestmark = pytest.mark.slow

RELEASE = "v0.1.0"
OLD_WORKER = "worker-of-v0.1.0"  # stopped for the upgrade: its leases are never honoured
LEASE = 1  # seconds: the old worker's leases run out soon after the upgrade
NAMES = ("started", "start_in_flight", "end_queued", "end_in_flight", "paused", "child")


def _spec(sink_url: str, name: str, **extra) -> dict:
    actions = [
        webhook("start", f"{sink_url}/start/{name}"),
        webhook("success", f"{sink_url}/done/{name}"),
    ]
    return task_spec(name, kind="upgrade", actions=actions, **extra)


def _make_live_work(conn: psycopg.Connection, sink_url: str) -> dict[str, str]:
    """The work a v0.1.0 service leaves behind; returns {name: task id}."""
    specs = [_spec(sink_url, name) for name in NAMES[:-1]]
    specs.append(_spec(sink_url, "child", deps=["started", "start_in_flight"]))
    ids = {name: str(row["id"]) for name, row in create_batch(conn, specs).items()}
    conn.execute("SELECT taskrunner.pause_task(%s)", (ids["paused"],))
    claimed = conn.execute(
        "SELECT task_id::text, delivery_id FROM taskrunner.claim_tasks(%s, 10, %s)",
        (OLD_WORKER, LEASE),
    ).fetchall()
    starts = {row["task_id"]: row["delivery_id"] for row in claimed}
    for name in ("started", "end_queued", "end_in_flight"):  # the targets acknowledged
        conn.execute(
            "SELECT taskrunner.finish_delivery(%s, %s, true, 200)", (starts[ids[name]], OLD_WORKER)
        )
    succeed = "SELECT taskrunner.update_task(%s, 'success'::taskrunner.task_status)"
    conn.execute(succeed, (ids["end_in_flight"],))
    leased = conn.execute(
        "SELECT task_id::text FROM taskrunner.claim_deliveries(%s, 10, %s)", (OLD_WORKER, LEASE)
    ).fetchall()
    assert [row["task_id"] for row in leased] == [ids["end_in_flight"]]
    conn.execute(succeed, (ids["end_queued"],))
    return ids


def _state(conn: psycopg.Connection, ids: dict[str, str]) -> dict[str, tuple]:
    """Per task: its status and the status of each of its deliveries, by event."""
    rows = conn.execute(
        """
        SELECT t.id::text, t.status::text,
               coalesce(array_agg(d.event || ':' || d.status ORDER BY d.event, d.status)
                        FILTER (WHERE d.id IS NOT NULL), '{}') AS deliveries
        FROM taskrunner.task t LEFT JOIN taskrunner.delivery d ON d.task_id = t.id
        GROUP BY t.id
        """
    ).fetchall()
    by_id = {row["id"]: (row["status"], row["deliveries"]) for row in rows}
    return {name: by_id[task_id] for name, task_id in ids.items()}


def test_live_work_survives_the_upgrade_to_head(empty_db, tmp_path):
    sink = Sink()
    released_dir = tmp_path / RELEASE
    copy_release(RELEASE, released_dir)
    migrate.migrate(empty_db, migrations_dir=released_dir)
    conn = psycopg.connect(empty_db, autocommit=True, row_factory=dict_row)
    try:
        ids = _make_live_work(conn, sink.url)
        assert _state(conn, ids) == {
            "started": ("running", ["start:delivered"]),
            "start_in_flight": ("running", ["start:in_flight"]),
            "end_queued": ("success", ["start:delivered", "success:queued"]),
            "end_in_flight": ("success", ["start:delivered", "success:in_flight"]),
            "paused": ("paused", []),
            "child": ("waiting", []),
        }

        migrate.migrate(empty_db)  # to the head: every migration after the release
        applied = conn.execute("SELECT version FROM public.schema_migrations").fetchall()
        assert sorted(row["version"] for row in applied) == [
            version(path.name) for path in migration_files()
        ]

        _run_to_completion(empty_db, conn, ids, sink, tmp_path)
        _check_outcome(conn, ids, sink)
    finally:
        sink.close()
        conn.close()


def _run_to_completion(url: str, conn, ids: dict[str, str], sink: Sink, tmp_path) -> None:
    """Start the head's API and workers; the remote side finishes "started" and a client
    resumes "paused"; everything else is the service's own doing."""
    with service(url, tmp_path) as svc:
        base = svc.base
        done = httpx.patch(f"{base}/task/{ids['started']}", json={"status": "Success"})
        assert done.status_code == 200, done.text
        resumed = httpx.patch(f"{base}/task/resume/{ids['paused']}")
        assert resumed.status_code == 200, resumed.text
        wait_for(
            lambda: (
                count(
                    conn,
                    "SELECT count(*) AS n FROM taskrunner.task WHERE status = 'success'",
                )
                == len(ids)
            ),
            60,
            message="every task to succeed",
        )
        wait_for(
            lambda: (
                count(
                    conn,
                    "SELECT count(*) AS n FROM taskrunner.delivery"
                    " WHERE status IN ('queued', 'in_flight')",
                )
                == 0
            ),
            60,
            message="the outbox to drain",
        )


def _check_outcome(conn, ids: dict[str, str], sink: Sink) -> None:
    assert_final_states(conn, {task_id: "success" for task_id in ids.values()})
    assert_history_consistent(conn)
    assert assert_no_double_start(conn)["restarts"] == 1  # the start of the gone worker
    assert_deliveries_settled(conn, sink.received())
    paths = Counter(req["path"] for req in sink.requests)
    assert {name: paths[f"/done/{name}"] for name in NAMES} == dict.fromkeys(NAMES, 1)
    assert sorted(p for p in paths if p.startswith("/start/")) == [
        "/start/child",
        "/start/paused",
        "/start/start_in_flight",
    ]
