"""The worker: claims ready work from PostgreSQL and runs webhooks concurrently.

All state lives in the database; this loop only moves work between the SQL functions
(``claim_tasks``, ``claim_deliveries``, ``finish_deliveries``, ``release_deliveries``,
``tick``) and the HTTP client (``webhooks``); ``retrypolicy`` says when a failed attempt
is tried again and ``outcomes`` records the results (group commit). It wakes on NOTIFY
(one dedicated LISTEN connection), on a freed slot, on a retry it scheduled falling due,
when the earliest scheduled task falls due (a delayed start or a task's retry backoff:
``next_wakeup()``, so it starts on time, not at the next poll), or on the poll timeout,
so a lost notification only costs latency. A database outage is
logged and retried, never fatal. ``stop()`` drains in-flight webhooks for
``shutdown_grace`` seconds and hands back what was not recorded, so another worker takes
it over. With RETENTION_DAYS, each tick also starts ``purge_finished`` beside the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from typing import Any

import httpx
import psycopg
import psycopg_pool

from taskrunner import metrics, tracing
from taskrunner.config import Config
from taskrunner.db import (
    QUERIES,
    DatabaseUnavailable,
    async_transaction,
    create_async_pool,
    run_with_stats_async,
)
from taskrunner.worker import retrypolicy, webhooks
from taskrunner.worker.outcomes import Outcome, OutcomeRecorder
from taskrunner.worker.webhooks import WorkItem

log = logging.getLogger(__name__)

CLAIMS = ("claim_tasks", "claim_deliveries")
# what a notification on each channel asks for (docs/sql.md, "Notifications"): new work
# of one kind needs only its own claim, not a round trip for the other kind as well
CHANNEL_CLAIMS = {"taskrunner_task": ("claim_tasks",), "taskrunner_delivery": ("claim_deliveries",)}


def default_worker_id() -> str:
    """``hostname:pid``, recorded on claims and delivery attempts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _log_tick(rows: list[dict[str, Any]]) -> None:
    """Warn about what ``tick()`` did: tasks it failed by Timeout, webhooks whose worker
    vanished (their leases expired: requeued, or for a start, the task back to Pending)."""
    counts = (rows[0]["result"] if rows else None) or {}  # NULL: another worker's tick ran
    if counts.get("timed_out"):
        log.warning("%d running tasks timed out (failure_reason Timeout)", counts["timed_out"])
    if counts.get("expired_leases"):
        log.warning(
            "%d webhook deliveries abandoned (lease expired) and requeued",
            counts["expired_leases"],
        )


# Tasks per purge_finished() call (one transaction: 2-4 s of deletes on this shared 2-core
# machine, docs/performance.md "Retention"); it holds no lock that a claim waits for.
PURGE_CHUNK = 1000


class Backoff:
    """Exponential delay for reconnecting to the database (0.2 s doubling to 5 s)."""

    def __init__(self, first: float = 0.2, most: float = 5.0) -> None:
        self.first, self.most, self.delay = first, most, first

    def reset(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.most, self.delay * 2)
        return delay


class Worker:
    """One worker process's loop. ``run()`` until ``stop()`` (thread-safe) is called."""

    _pool: psycopg_pool.AsyncConnectionPool
    _client: httpx.AsyncClient

    def __init__(self, config: Config, worker_id: str | None = None) -> None:
        if not config.database_url:
            raise ValueError("the worker needs config.database_url")
        self.config = config
        self.worker_id = worker_id or default_worker_id()
        # lease long enough for an attempt (bounded by webhook_timeout) plus recording it
        self.lease_seconds = math.ceil(2 * config.webhook_timeout + 10)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        # the claims the next round runs; none named: both (a timer, a freed slot, start-up)
        self._claims: set[str] = set()
        self._in_flight: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._unrecorded: set[uuid.UUID] = set()  # leased to us, outcome not yet recorded
        self._next_retry: float | None = None  # loop time when a retry we scheduled is due
        self._next_due: float | None = None  # loop time when a scheduled task falls due
        self._overdue_rounds = 0  # rounds in a row that found a due task left unclaimed
        self._next_tick = 0.0
        self._tasks_first = True
        self._purge: asyncio.Task[None] | None = None
        self._outcomes = OutcomeRecorder(self._call, self.worker_id)

    def stop(self) -> None:
        """Stop claiming and shut down gracefully; safe from any thread or a signal."""
        if self._loop is None:
            self._stopping.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: run() already returned
            self._loop.call_soon_threadsafe(self._stop_now)

    def _stop_now(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _wake_for(self, *claims: str) -> None:
        """Wake the loop for a round that runs these claims (at least)."""
        self._claims.update(claims)
        self._wake.set()

    async def run(self) -> None:
        """Claim and deliver until stopped; then drain, release and close."""
        self._loop = asyncio.get_running_loop()
        url = self.config.database_url
        self._pool = create_async_pool(
            url, max_size=self.config.pool_max_size, pooler=self.config.database_pooler
        )
        # LISTEN is session state: a transaction pooler would drop it, hence its own URL
        listen_url = self.config.listen_database_url or url
        # its own application_name: /metrics counts worker processes by it (workers_listening)
        listen_pool = create_async_pool(
            listen_url, max_size=1, name="taskrunner-listen", application_name="taskrunner-listen"
        )
        await self._pool.open(wait=False)
        await listen_pool.open(wait=False)
        log.info("worker %s started", self.worker_id, extra={"worker": self.worker_id})
        async with webhooks.create_client(self.config) as self._client:
            listener = asyncio.create_task(self._listen(listen_pool))
            try:
                await self._loop_until_stopped()
            finally:
                listener.cancel()
                await self._drain()
                purge = [self._purge] if self._purge else []  # ends after its current chunk
                await asyncio.gather(listener, *purge, return_exceptions=True)
                await listen_pool.close()
                await self._pool.close()
        log.info("worker %s stopped", self.worker_id, extra={"worker": self.worker_id})

    # --- the main loop -------------------------------------------------------------------

    async def _loop_until_stopped(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            self._wake.clear()  # before the round: a wake-up during it is not lost
            claims, self._claims = self._claims or set(CLAIMS), set()
            started = asyncio.get_running_loop().time()
            try:
                await self._round(claims)
            except DatabaseUnavailable as exc:
                log.warning(
                    "database unavailable (%s); retrying", exc.__cause__, extra=self._fields()
                )
                await self._sleep(backoff.next())
                continue
            except psycopg.Error:
                # not an outage (a bug or bad data): log it and keep the worker alive
                log.exception("worker round failed; retrying", extra=self._fields())
                await self._sleep(backoff.next())
                continue
            backoff.reset()
            metrics.observe_worker_loop(asyncio.get_running_loop().time() - started)
            await self._wait()

    async def _round(self, claims: set[str]) -> None:
        now = asyncio.get_running_loop().time()
        if self._next_retry is not None and now >= self._next_retry:
            self._next_retry = None
        # claims first: new work does not wait behind tick()
        await self._claim_while_full(claims)
        if now >= self._next_tick:
            _log_tick(await self._call("tick", {"max_attempts": self.config.webhook_max_attempts}))
            self._start_purge()
            self._next_tick = now + self.config.tick_interval
        self._next_due = await self._scheduled_due() if self._free_slots() > 0 else None

    async def _claim_while_full(self, claims: set[str]) -> None:
        """Run ``claims`` into free slots; claim again at once while they come back full."""
        while not self._stopping.is_set() and (free := self._free_slots()) > 0:
            # alternate which kind goes first so starts and end webhooks cannot starve
            # each other when one of them alone could fill every slot
            order = [query for query in CLAIMS if query in claims]
            if not self._tasks_first:
                order.reverse()
            self._tasks_first = not self._tasks_first
            claimed = 0
            for query in order:
                began = time.time_ns()
                rows = await self._call(query, self._claim_params(free - claimed))
                for row in rows:
                    item = WorkItem.from_row(row)
                    self._claim_span(query, item, began)
                    self._start(item)
                claimed += len(rows)
            if claimed < free:
                return

    async def _scheduled_due(self) -> float | None:
        """Loop time at which to claim again for a scheduled task (``next_wakeup()``);
        None when nothing is scheduled."""
        (row,) = await self._call("next_wakeup", {})
        seconds, now = row["seconds"], asyncio.get_running_loop().time()
        if seconds is None:
            return None
        if seconds > 0:
            self._overdue_rounds = 0
            return now + seconds + 0.001  # just after: the claim's now() must have passed it
        # Due, yet our claim left it: it fell due just after the claim (claim again now),
        # or another claim holds its row. Look again soon, backing off so that a row held
        # for long does not make the worker spin.
        self._overdue_rounds += 1
        return now + min(self.config.poll_interval, 0.005 * 2 ** (self._overdue_rounds - 1))

    def _claim_span(self, query: str, item: WorkItem, began: int) -> None:
        """With spans on, a claim span in the batch's trace for each item claimed: the
        claim call's duration (a claim that found nothing leaves no span)."""
        if not tracing.enabled():
            return
        facts = {
            "taskrunner.worker": self.worker_id,
            "taskrunner.task_id": str(item.task_id),
            "taskrunner.delivery_id": str(item.delivery_id),
            "taskrunner.event": item.event,
            "db.system": "postgresql",
        }
        span = tracing.start_span(query, parent=item.trace, attributes=facts, start_time=began)
        tracing.end_span(span)

    def _claim_params(self, free: int) -> dict[str, Any]:
        return {"worker": self.worker_id, "max": free, "lease_seconds": self.lease_seconds}

    def _free_slots(self) -> int:
        return self.config.worker_concurrency - len(self._in_flight)

    async def _wait(self) -> None:
        """Until a notification, a freed slot, a due retry, a scheduled task falling due,
        a tick or the poll timeout."""
        now = asyncio.get_running_loop().time()
        deadlines = [now + self.config.poll_interval, self._next_tick]
        if self._next_retry is not None:
            deadlines.append(self._next_retry)
        if self._next_due is not None:
            deadlines.append(self._next_due)
        timeout = max(0.0, min(deadlines) - now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _call(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run a named query in its own transaction, feeding its transitions to metrics."""
        transaction = functools.partial(async_transaction, self._pool)
        return await run_with_stats_async(transaction, query, params)

    # --- retention -----------------------------------------------------------------------

    def _start_purge(self) -> None:
        """With RETENTION_DAYS, purge old batches beside the loop (claims never wait for
        it), unless this worker's previous purge is still at it."""
        if self.config.retention_days is None or (self._purge and not self._purge.done()):
            return
        self._purge = asyncio.create_task(self._purge_finished(), name="retention")

    async def _purge_finished(self) -> None:
        """Delete chunks of old batches until one comes back short (or another worker is
        purging: NULL). An error is logged and left to the next tick."""
        params = {
            "older_than_seconds": self.config.retention_days * 86400,
            "max_tasks": PURGE_CHUNK,
        }
        try:
            while not self._stopping.is_set():
                deleted = (await self._call("purge_finished", params))[0]
                if deleted["tasks"]:
                    metrics.count_purged(deleted["tasks"])
                    log.info(
                        "retention: deleted %d tasks (%d batches, %d history rows)",
                        deleted["tasks"],
                        deleted["batches"],
                        deleted["history"],
                        extra={"worker": self.worker_id},
                    )
                if (deleted["tasks"] or 0) < PURGE_CHUNK:
                    return
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.warning("retention purge failed (%s); trying again next tick", exc)

    # --- one webhook ---------------------------------------------------------------------

    def _start(self, item: WorkItem) -> None:
        # a claimed start moved its task Pending -> Running
        self._log(
            item, logging.INFO, "claimed%s", " (task Running)" if item.event == "start" else ""
        )
        self._unrecorded.add(item.delivery_id)
        task = asyncio.create_task(self._deliver(item), name=f"delivery {item.delivery_id}")
        self._in_flight[item.delivery_id] = task
        task.add_done_callback(functools.partial(self._finished, item.delivery_id))

    def _finished(self, delivery_id: uuid.UUID, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(delivery_id, None)
        if not task.cancelled() and task.exception() is not None:
            # a bug or bad data, not an outage: the lease expires and tick() recovers it
            log.error(
                "delivery %s failed in the worker",
                delivery_id,
                exc_info=task.exception(),
                extra=self._fields(delivery_id),
            )
        if self._free_slots() == 1:  # we were full: claim into the freed slot now
            self._wake_for(*CLAIMS)

    async def _deliver(self, item: WorkItem) -> None:
        started = asyncio.get_running_loop().time()
        deadline = started + self.lease_seconds
        result = await webhooks.call(self._client, item, self.config)
        seconds = asyncio.get_running_loop().time() - started
        delay_ms = retrypolicy.delay_ms(result.ok, result.retryable, item.attempt, self.config)
        if not result.ok:
            then = "giving up" if delay_ms is None else f"retry in {delay_ms} ms"
            self._log(item, logging.WARNING, "failed: %s; %s", result.error, then)
        status = await self._record(Outcome(item.delivery_id, result, delay_ms), deadline)
        metrics.observe_webhook(item.event, status, seconds)
        if status == "failed":
            self._log(item, logging.WARNING, "gave up: %s", result.error)
        elif status is not None:
            self._log(item, logging.INFO, "recorded: %s", status)

    def _fields(self, delivery_id: uuid.UUID | None = None) -> dict[str, str]:
        """The JSON log fields of a line about this worker (and one of its deliveries)."""
        if delivery_id is None:
            return {"worker": self.worker_id}
        return {"worker": self.worker_id, "delivery_id": str(delivery_id)}

    def _log(self, item: WorkItem, level: int, message: str, *args: Any) -> None:
        """A line about one attempt, naming its delivery, task, event and attempt."""
        if log.isEnabledFor(level):
            log.log(
                level,
                "delivery %s (%s of task %s) attempt %d " + message,
                item.delivery_id,
                item.event,
                item.task_id,
                item.attempt,
                *args,
                extra={
                    "delivery_id": str(item.delivery_id),
                    "task_id": str(item.task_id),
                    "batch_id": str(item.batch_id) if item.batch_id else None,
                    "trace_id": item.trace.trace_id if item.trace else None,
                    "worker": self.worker_id,
                },
            )

    async def _record(self, outcome: Outcome, deadline: float) -> str | None:
        """Record the attempt (group commit, see ``outcomes``), retried through a database
        outage until the lease runs out; the delivery's new status, None if not recorded."""
        delivery_id, delay_ms = outcome.delivery_id, outcome.retry_delay_ms
        backoff = Backoff()
        while True:
            try:
                status = await self._outcomes.record(outcome)
                break
            except DatabaseUnavailable as exc:
                if asyncio.get_running_loop().time() + backoff.delay > deadline:
                    log.warning(
                        "delivery %s not recorded (%s); its lease will expire",
                        delivery_id,
                        exc.__cause__,
                        extra=self._fields(delivery_id),
                    )
                    return None
                await asyncio.sleep(backoff.next())
        self._unrecorded.discard(delivery_id)
        if status == "stale":
            log.info(
                "delivery %s: lease lost before recording",
                delivery_id,
                extra=self._fields(delivery_id),
            )
        if delay_ms is not None:
            self._retry_due(delay_ms / 1000)
        return status

    def _retry_due(self, seconds: float) -> None:
        due = asyncio.get_running_loop().time() + seconds
        if self._next_retry is None or due < self._next_retry:
            self._next_retry = due
            self._wake.set()  # re-arm the wait with the earlier deadline

    # --- wake-ups ------------------------------------------------------------------------

    async def _listen(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        """Turn NOTIFYs into wake-ups; reconnect with backoff when the connection drops."""
        backoff = Backoff()
        while True:
            try:
                async with pool.connection() as conn:
                    await conn.execute(QUERIES["listen"])
                    log.debug("listening for notifications")
                    backoff.reset()
                    self._wake_for(*CLAIMS)  # notifications may have been missed while away
                    async for notify in conn.notifies():
                        self._wake_for(*CHANNEL_CLAIMS.get(notify.channel, CLAIMS))
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(backoff.next())

    # --- shutdown ------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Let in-flight webhooks finish for the grace period, then hand the rest back."""
        pending = set(self._in_flight.values())
        if pending:
            log.info("waiting up to %ss for %d webhooks", self.config.shutdown_grace, len(pending))
            _, pending = await asyncio.wait(pending, timeout=self.config.shutdown_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._unrecorded:
            await self._release(sorted(self._unrecorded))

    async def _release(self, ids: list[uuid.UUID]) -> None:
        try:
            rows = await self._call("release_deliveries", {"worker": self.worker_id, "ids": ids})
        except DatabaseUnavailable as exc:
            log.warning(
                "could not release %d deliveries (%s); their leases will expire",
                len(ids),
                exc.__cause__,
            )
            return
        log.info("released %d of %d unfinished deliveries", rows[0]["released"], len(ids))
        self._unrecorded.clear()
