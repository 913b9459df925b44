"""Recording webhook outcomes: the worker's group commit into ``finish_deliveries``.

Each finished attempt becomes an ``Outcome``; ``OutcomeRecorder.record`` queues it and
returns the delivery's new status once it is written. The first outcome starts a writer,
which records everything queued in one call; outcomes that arrive while that call runs go
together in the next. An idle worker records at once, a busy one pays one statement per
round of results instead of one per webhook. ``finish_deliveries_json`` is the one place
that turns outcomes into the JSON that the SQL function reads.

One outcome must never fail the others written with it: when a group fails for anything
but an outage (say PostgreSQL refuses a value in one outcome), its outcomes are written
one by one, and an outcome that still cannot be written is recorded as a failed attempt
saying why (``Outcome.unrecordable``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from taskrunner.db import DatabaseUnavailable
from taskrunner.worker.webhooks import WebhookResult, describe_exception, storable

log = logging.getLogger(__name__)

# run a named query with its parameters, in its own transaction, returning its rows
RunQuery = Callable[[str, dict[str, Any]], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class Outcome:
    """One attempt of one delivery, as ``finish_deliveries`` records it."""

    delivery_id: uuid.UUID
    result: WebhookResult
    # the next attempt is due after this many ms; None: no further attempt
    retry_delay_ms: int | None

    def unrecordable(self, exc: BaseException) -> Outcome:
        """This attempt as a final failure saying why its outcome could not be written."""
        result = WebhookResult(
            ok=False,
            started_at=self.result.started_at,
            status_code=self.result.status_code,
            error=f"outcome could not be recorded: {describe_exception(exc)}",
            retryable=False,
        )
        return Outcome(self.delivery_id, result, None)


def finish_deliveries_json(outcomes: list[Outcome]) -> Jsonb:
    """The ``p_results`` argument of ``taskrunner.finish_deliveries`` (its keys are read
    by that function's ``input`` CTE)."""
    return Jsonb(
        [
            {
                "delivery_id": str(o.delivery_id),
                "ok": o.result.ok,
                "status_code": o.result.status_code,
                "error": None if o.result.error is None else storable(o.result.error),
                "retry_delay_ms": o.retry_delay_ms,
                "cancel_actions": o.result.cancel_actions or None,
                "started_at": o.result.started_at.isoformat(),
            }
            for o in outcomes
        ]
    )


# an outcome waiting to be written, and where its caller waits for the delivery's status
Entry = tuple[Outcome, asyncio.Future[str]]


class OutcomeRecorder:
    """Group commit of outcomes for one worker (see the module docstring)."""

    def __init__(self, run: RunQuery, worker_id: str) -> None:
        self._run = run
        self._worker_id = worker_id
        self._queued: list[Entry] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, outcome: Outcome) -> str:
        """Record one outcome with whatever else is queued; returns the delivery's new
        status (``delivered``, ``queued``, ``failed``, ``stale`` or ``unknown``). Raises
        what the database raised (e.g. DatabaseUnavailable): the caller decides."""
        future = asyncio.get_running_loop().create_future()
        self._queued.append((outcome, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued())
        return await future

    async def _write_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            await self._write_group(batch)

    async def _write_group(self, group: list[Entry]) -> None:
        try:
            statuses = await self._write([o for o, _ in group])
        except DatabaseUnavailable as exc:  # each caller retries through the outage
            _fail(group, exc)
            return
        except Exception as exc:  # bad data in one outcome must not fail the others
            if len(group) == 1:
                await self._write_unrecordable(group[0], exc)
                return
            log.warning("recording %d outcomes together failed (%s); one by one", len(group), exc)
            for entry in group:
                await self._write_group([entry])
            return
        _resolve(group, statuses)

    async def _write_unrecordable(self, entry: Entry, exc: Exception) -> None:
        outcome = entry[0]
        log.error(
            "delivery %s: outcome could not be recorded: %s",
            outcome.delivery_id,
            exc,
            extra={"delivery_id": str(outcome.delivery_id), "worker": self._worker_id},
        )
        try:
            statuses = await self._write([outcome.unrecordable(exc)])
        except Exception as again:
            _fail([entry], again)
            return
        _resolve([entry], statuses)

    async def _write(self, outcomes: list[Outcome]) -> dict[uuid.UUID, str]:
        params = {"worker": self._worker_id, "results": finish_deliveries_json(outcomes)}
        rows = await self._run("finish_deliveries", params)
        return {r["delivery_id"]: r["status"] for r in rows}


def _resolve(group: list[Entry], statuses: dict) -> None:
    for outcome, future in group:
        if not future.done():
            future.set_result(statuses.get(outcome.delivery_id, "unknown"))


def _fail(group: list[Entry], exc: Exception) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(exc)
