"""Recording webhook outcomes: the worker's group commit into ``finish_deliveries``.

Each finished attempt becomes an ``Outcome``; ``OutcomeRecorder.record`` queues it and
returns the delivery's new status once it is written. The first outcome starts a writer,
which records everything queued in one call; outcomes that arrive while that call runs go
together in the next. An idle worker records at once, a busy one pays one statement per
round of results instead of one per webhook. ``finish_deliveries_json`` is the one place
that turns outcomes into the JSON that the SQL function reads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from taskrunner.worker.webhooks import WebhookResult

# run a named query with its parameters, in its own transaction, returning its rows
RunQuery = Callable[[str, dict[str, Any]], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class Outcome:
    """One attempt of one delivery, as ``finish_deliveries`` records it."""

    delivery_id: uuid.UUID
    result: WebhookResult
    # the next attempt is due after this many ms; None: no further attempt
    retry_delay_ms: int | None


def finish_deliveries_json(outcomes: list[Outcome]) -> Jsonb:
    """The ``p_results`` argument of ``taskrunner.finish_deliveries`` (its keys are read
    by that function's ``input`` CTE)."""
    return Jsonb(
        [
            {
                "delivery_id": str(o.delivery_id),
                "ok": o.result.ok,
                "status_code": o.result.status_code,
                "error": o.result.error,
                "retry_delay_ms": o.retry_delay_ms,
                "cancel_actions": o.result.cancel_actions or None,
                "started_at": o.result.started_at.isoformat(),
            }
            for o in outcomes
        ]
    )


class OutcomeRecorder:
    """Group commit of outcomes for one worker (see the module docstring)."""

    def __init__(self, run: RunQuery, worker_id: str) -> None:
        self._run = run
        self._worker_id = worker_id
        self._queued: list[tuple[Outcome, asyncio.Future[str]]] = []
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
            try:
                statuses = await self._write([o for o, _ in batch])
            except Exception as exc:  # each caller decides (retry through an outage)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for outcome, future in batch:
                if not future.done():
                    future.set_result(statuses.get(outcome.delivery_id, "unknown"))

    async def _write(self, outcomes: list[Outcome]) -> dict[uuid.UUID, str]:
        params = {"worker": self._worker_id, "results": finish_deliveries_json(outcomes)}
        rows = await self._run("finish_deliveries", params)
        return {r["delivery_id"]: r["status"] for r in rows}
