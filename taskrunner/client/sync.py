"""``Client``: the blocking client on ``httpx.Client`` (every route is in ``core.Routes``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from taskrunner.client import models
from taskrunner.client.core import Call, Routes, outcome_of

DEFAULT_PER_PAGE = 100


class Client(Routes):
    """``Client(url, token)``; both default to ``TASKRUNNER_URL`` / ``API_TOKEN`` (the URL
    to ``http://127.0.0.1:8085``). Use it as a context manager, or ``close()`` it."""

    HTTP = httpx.Client
    _http: httpx.Client

    def _send(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                outcome: httpx.Response | Exception = self._http.request(
                    call.method, call.path, **call.request_args()
                )
            except httpx.TransportError as exc:
                outcome = exc
            wait = self.retry.delay(call, attempt, outcome)
            if wait is None:
                return outcome_of(call, outcome)
            time.sleep(wait)
            attempt += 1

    def iter_tasks(
        self, *, per_page: int = DEFAULT_PER_PAGE, **filters: Any
    ) -> Iterator[models.Task]:
        """Every task matching ``filters`` (those of ``list_tasks``), page by page."""
        return _pages(self.list_tasks, per_page, filters)

    def iter_batches(
        self, *, per_page: int = DEFAULT_PER_PAGE, **filters: Any
    ) -> Iterator[models.BatchSummary]:
        """Every batch matching ``filters`` (those of ``list_batches``), page by page."""
        return _pages(self.list_batches, per_page, filters)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pages(fetch: Any, per_page: int, filters: dict[str, Any]) -> Iterator[Any]:
    """Offset paging, newest first: items created while it walks may shift a page (seen
    twice or not at all); filter on ``batch_id`` or a time for a stable set."""
    page = 0
    while True:
        items = fetch(page=page, per_page=per_page, **filters)
        yield from items
        if len(items) < per_page:
            return
        page += 1
