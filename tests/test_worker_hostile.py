"""Hostile webhook targets: one bad start response fails that delivery, with a recorded
error, and never touches another delivery -- not even one recorded in the same group
commit (issue 13, item 2).

The end-to-end test runs a real worker process against a real sink that answers 200 to
every start, three of them with a response the worker cannot use; all ten answers are
held until the ten requests have arrived, so their outcomes reach the recorder together.
The recorder test makes the group commit itself deterministic: eight outcomes queued in
one batch, one of which PostgreSQL cannot store.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from functools import partial

import pytest
from conftest import create_batch, task_spec, webhook
from procs import Reply, Sink, count, free_port, running, service_env, wait_for

from taskrunner.db import QUERIES, async_transaction, create_async_pool, run_with_stats_async
from taskrunner.worker.outcomes import Outcome, OutcomeRecorder
from taskrunner.worker.webhooks import WebhookResult

BENIGN = 7


def _cancel_action(url: str, **params) -> dict:
    return {
        "kind": "Webhook",
        "trigger": "Cancel",
        "params": {"url": url, "verb": "Post", **params},
    }


BAD = "bad response: "
INVALID = "invalid cancel actions in the start response: "

# path -> (the start's answer, how its recorded error starts, what else it must say)
HOSTILE = {
    # json.loads raises RecursionError
    "/nested": (Reply(raw=b"[" * 100_000 + b"]" * 100_000), BAD, "RecursionError"),
    # urlsplit would raise ValueError ("Invalid IPv6 URL"): the on_cancel rules refuse it
    "/bad-url": (Reply(body=_cancel_action("http://a[b]/")), INVALID, "not a valid host name"),
    # valid JSON, but PostgreSQL cannot store \u0000 in jsonb or text
    "/nul": (Reply(body=_cancel_action("http://example.com/", body={"x": "\u0000"})), BAD, "NUL"),
}


def _start_deliveries(conn) -> dict[str, dict]:
    rows = conn.execute(
        """
        SELECT t.local_id, t.status::text AS task_status, t.failure_reason, t.started_at,
               d.id, d.status::text AS status, d.attempts, d.last_error,
               (SELECT count(*) FROM taskrunner.task_history h
                WHERE h.task_id = t.id AND h.to_status = 'running') AS claims
        FROM taskrunner.task t JOIN taskrunner.delivery d ON d.task_id = t.id
        WHERE d.event = 'start'
        """
    ).fetchall()
    return {r["local_id"]: r for r in rows}


def _settled(conn, starts: int) -> bool:
    """``starts`` start deliveries exist (the claims happened) and none is in progress."""
    row = conn.execute(
        "SELECT count(*) AS n, count(*) FILTER (WHERE status IN ('queued', 'in_flight')) AS busy"
        " FROM taskrunner.delivery WHERE event = 'start'"
    ).fetchone()
    return (row["n"], row["busy"]) == (starts, 0)


@pytest.mark.slow
def test_one_hostile_response_fails_only_its_own_delivery(db_url, conn, tmp_path):
    arrived = threading.Barrier(len(HOSTILE) + BENIGN)

    def respond(req: dict) -> Reply:
        # hold every start until all have arrived: the answers come back together
        with suppress(threading.BrokenBarrierError):
            arrived.wait(20)
        return HOSTILE.get(req["path"], (Reply(), None))[0]

    sink = Sink(on_start=lambda req: None, respond=respond)  # benign tasks stay Running
    paths = {name.strip("/"): name for name in HOSTILE}
    paths |= {f"ok{i}": f"/ok{i}" for i in range(BENIGN)}
    create_batch(
        conn,
        [task_spec(name, actions=[webhook(url=f"{sink.url}{p}")]) for name, p in paths.items()],
    )
    # WEBHOOK_TIMEOUT=2: a lease of 14 s, longer than the wait below, so an outcome that
    # is not recorded shows as a delivery still in flight
    env = service_env(db_url, free_port(), tmp_path, WEBHOOK_TIMEOUT="2")
    try:
        with running(["worker"], env):
            wait_for(
                lambda: _settled(conn, len(paths)), 10, interval=0.1, message="every start recorded"
            )
    finally:
        sink.close()

    starts = _start_deliveries(conn)
    for path, (_, prefix, reason) in HOSTILE.items():
        row = starts[path.strip("/")]
        assert (row["status"], row["attempts"]) == ("failed", 1), row
        assert row["last_error"].startswith(prefix) and reason in row["last_error"], row
        assert "\x00" not in row["last_error"]
        assert row["task_status"] == "failure"
        assert row["failure_reason"] == f"start webhook failed: {row['last_error']}"
    for i in range(BENIGN):
        row = starts[f"ok{i}"]
        assert (row["status"], row["attempts"], row["claims"]) == ("delivered", 1, 1), row
        assert (row["task_status"], row["last_error"]) == ("running", None)
        assert row["started_at"] is not None
    assert sorted(sink.received().values()) == [1] * (len(HOSTILE) + BENIGN)
    assert count(conn, "SELECT count(*) AS n FROM taskrunner.action WHERE event = 'cancel'") == 0


def _claim(conn, n: int) -> list[dict]:
    rows = conn.execute(
        QUERIES["claim_tasks"], {"worker": "w1", "max": n, "lease_seconds": 60}
    ).fetchall()
    assert len(rows) == n
    return rows


def _ok(delivery_id: uuid.UUID, cancel_url: str | None = None) -> Outcome:
    actions = None
    if cancel_url is not None:
        actions = [{"url": cancel_url, "verb": "POST", "body": None, "headers": {}}]
    result = WebhookResult(
        ok=True, started_at=datetime.now(UTC), status_code=200, cancel_actions=actions
    )
    return Outcome(delivery_id, result, None)


def test_an_outcome_postgres_cannot_store_fails_alone_in_its_group_commit(db_url, conn):
    """Eight outcomes in one finish_deliveries call; one holds a NUL character that got
    past the webhook layer. The other seven are recorded; that one is recorded as failed,
    with an error saying why, and its task fails."""
    create_batch(conn, [task_spec(f"t{i}") for i in range(8)])
    claimed = _claim(conn, 8)
    outcomes = [_ok(r["delivery_id"], "http://example.com/cancel") for r in claimed[:7]]
    outcomes.append(_ok(claimed[7]["delivery_id"], "http://example.com/\x00"))

    async def record_together() -> list[str]:
        pool = create_async_pool(db_url, max_size=2)
        await pool.open(wait=True)

        async def run(name: str, params: dict) -> list[dict]:
            return await run_with_stats_async(partial(async_transaction, pool), name, params)

        try:
            recorder = OutcomeRecorder(run, "w1")
            # gather starts every record() before the writer runs: one batch of eight
            return await asyncio.gather(*(recorder.record(o) for o in outcomes))
        finally:
            await pool.close()

    statuses = asyncio.run(record_together())

    assert statuses == ["delivered"] * 7 + ["failed"]
    rows = {
        r["id"]: r
        for r in conn.execute(
            "SELECT d.id, d.status::text, d.last_error, t.status::text AS task_status,"
            " t.failure_reason FROM taskrunner.delivery d JOIN taskrunner.task t"
            " ON t.id = d.task_id"
        ).fetchall()
    }
    bad = rows[claimed[7]["delivery_id"]]
    assert bad["status"] == "failed" and bad["task_status"] == "failure"
    assert bad["last_error"].startswith("outcome could not be recorded: ")
    assert bad["failure_reason"] == f"start webhook failed: {bad['last_error']}"
    assert [rows[r["delivery_id"]]["status"] for r in claimed[:7]] == ["delivered"] * 7
    assert count(conn, "SELECT count(*) AS n FROM taskrunner.action WHERE event = 'cancel'") == 7
