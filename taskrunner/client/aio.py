"""``AsyncClient``: the asyncio client on ``httpx.AsyncClient``; every method of
``core.Routes`` is awaited (``await client.get_task(id)``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from taskrunner.client import models
from taskrunner.client.core import Call, Routes, outcome_of
from taskrunner.client.sync import DEFAULT_PER_PAGE


class AsyncClient(Routes):
    """Like ``Client``; ``async with AsyncClient(...) as client:`` or ``await aclose()``."""

    HTTP = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def _send(self, call: Call) -> Any:  # type: ignore[override]
        attempt = 0
        while True:
            try:
                outcome: httpx.Response | Exception = await self._http.request(
                    call.method, call.path, **call.request_args()
                )
            except httpx.TransportError as exc:
                outcome = exc
            wait = self.retry.delay(call, attempt, outcome)
            if wait is None:
                return outcome_of(call, outcome)
            await asyncio.sleep(wait)
            attempt += 1

    def iter_tasks(
        self, *, per_page: int = DEFAULT_PER_PAGE, **filters: Any
    ) -> AsyncIterator[models.Task]:
        """``async for task in client.iter_tasks(...)``: every page of ``list_tasks``."""
        return _pages(self.list_tasks, per_page, filters)

    def iter_batches(
        self, *, per_page: int = DEFAULT_PER_PAGE, **filters: Any
    ) -> AsyncIterator[models.BatchSummary]:
        """``async for batch in client.iter_batches(...)``: every page of ``list_batches``."""
        return _pages(self.list_batches, per_page, filters)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _pages(fetch: Any, per_page: int, filters: dict[str, Any]) -> AsyncIterator[Any]:
    """As ``sync._pages`` (same caveat on rows created while it walks)."""
    page = 0
    while True:
        items = await fetch(page=page, per_page=per_page, **filters)
        for item in items:
            yield item
        if len(items) < per_page:
            return
        page += 1
