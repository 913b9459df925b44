"""The PUT /task counter buffer: coalesce increments per process, flush them in one statement.

``add`` sums increments into ``{task_id: [success, failures]}`` under a lock; a daemon
thread (started on first use, so it always lives in the process that serves requests)
flushes every ``interval`` seconds with one ``add_counters`` call. A failed flush puts the
increments back for the next round, so none are lost while the process lives. ``close``
stops the thread and flushes what is left; it runs at interpreter exit and from gunicorn's
``worker_exit`` hook (``close_all``), through a registry of live buffers.

Task ids are checked before anything is kept: an id this process has not seen before is
looked up (one primary-key probe per request, then remembered in a bounded set), and a
request naming a task that does not exist is refused whole with 404. An increment can then
still be dropped only when its task is deleted before the flush, or when the database
stays unreachable while the process stops; both are logged and counted in
``counter_increments_dropped_total{reason}``.

The buffer is bounded, so an outage cannot grow it without end: ``add`` refuses (raises
``Refused``, which the API answers with 503) once a flush found the database down, until
one succeeds again, and whenever the increments would take the buffer past ``max_tasks``
tasks. A refused request keeps nothing: what the buffer accepted is exactly what it
writes.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable

import psycopg_pool

from taskrunner import metrics
from taskrunner.config import Config
from taskrunner.db import QUERIES, DatabaseUnavailable, TaskNotFound, wrap_exceptions

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[CounterBuffer] = weakref.WeakSet()
_CLOSE_ATTEMPTS = 3
# task ids remembered as existing, per process (least recently used forgotten first)
KNOWN_TASKS_MAX = 100_000


class Refused(Exception):
    """``add`` kept none of the increments: the database is down or the buffer is full."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


class CounterBuffer:
    """Per-process, thread-safe, bounded sums of PUT /task increments."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        interval: float,
        max_tasks: int = Config.counter_buffer_max,
    ) -> None:
        self._pool = pool
        self._interval = interval
        self._max_tasks = max_tasks
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}
        self._flushing = 0  # tasks taken by a flush in progress (they may come back)
        self._down = False  # the last flush could not reach the database
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: OrderedDict[str, None] = OrderedDict()  # ids seen to be tasks
        self._lookups_failing = False  # accept ids unchecked until a write succeeds
        _LIVE.add(self)

    def add(self, updates: Iterable[tuple[str, int, int]]) -> None:
        """Add ``(task_id, new_success, new_failures)`` increments, all or none.

        Raises ``TaskNotFound`` (404) when an id is not a task, ``Refused`` while the
        database is known to be down, or when they would take the buffer past its bound.
        """
        updates = [(str(t), s, f) for t, s, f in updates]
        self._check_tasks_exist({t for t, _, _ in updates})
        with self._lock:
            self._check_room(updates)
            self._merge(updates)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="taskrunner-counter-flush", daemon=True
                )
                self._thread.start()

    def _check_tasks_exist(self, ids: set[str]) -> None:
        """Raise ``TaskNotFound`` naming every id that is not a task; look up only ids this
        process has not seen. When the lookup cannot reach the database, ids are accepted
        unchecked (the bound and the flush's view of the outage still apply) until a write
        succeeds again: the flush then writes them, or drops and counts those that are not
        tasks."""
        with self._lock:
            unseen = [t for t in ids if t not in self._known]
            for t in ids - set(unseen):
                self._known.move_to_end(t)
            if not unseen or self._lookups_failing:
                return
        try:
            with wrap_exceptions(), self._pool.connection() as conn:
                rows = conn.execute(QUERIES["existing_tasks"], {"ids": unseen}).fetchall()
        except DatabaseUnavailable as exc:
            log.warning("PUT /task: task ids accepted unchecked, database unavailable: %s", exc)
            with self._lock:
                self._lookups_failing = True
            return
        found = {r["id"] for r in rows}
        with self._lock:
            for t in found:
                self._known[t] = None
            while len(self._known) > KNOWN_TASKS_MAX:
                self._known.popitem(last=False)
        missing = sorted(set(unseen) - found)
        if missing:
            raise TaskNotFound("task not found", [f"task_id: no task {t}" for t in missing[:100]])

    def pending(self) -> dict[str, tuple[int, int]]:
        """A copy of the increments not yet written."""
        with self._lock:
            return {task_id: (s, f) for task_id, (s, f) in self._pending.items()}

    def flush(self) -> int:
        """Write everything buffered in one statement; returns the tasks updated.

        On failure the increments go back into the buffer, the buffer counts the database
        as down (``add`` refuses) and the error is raised. While it is down, a flush with
        nothing to write still asks the database, so the buffer learns it is back.
        """
        with self._lock:
            taken, self._pending = self._pending, {}
            self._flushing += len(taken)
            if not taken and not self._down:
                return 0
        updates = [
            {"task_id": t, "new_success": s, "new_failures": f} for t, (s, f) in taken.items()
        ]
        try:
            with self._pool.connection() as conn:
                row = conn.execute(
                    QUERIES["add_counters"], {"updates": json.dumps(updates)}
                ).fetchone()
        except Exception:
            with self._lock:
                self._merge((t, s, f) for t, (s, f) in taken.items())
                self._flushing -= len(taken)
                self._down = True
            raise
        with self._lock:
            self._flushing -= len(taken)
            self._down = self._lookups_failing = False
        if row["updated"] < len(updates):
            try:
                self._report_deleted(list(taken))
            except Exception as exc:  # the increments are written; only the report failed
                log.warning("could not report dropped PUT /task increments: %s", exc)
        return row["updated"]

    def _report_deleted(self, ids: list[str]) -> None:
        """Some flushed tasks do not exist (deleted since their PUT was accepted, or
        accepted unchecked during an outage): their increments are dropped; log and count
        them, and forget them as known tasks."""
        with self._pool.connection() as conn:
            rows = conn.execute(QUERIES["existing_tasks"], {"ids": ids}).fetchall()
        gone = sorted(set(ids) - {r["id"] for r in rows})
        with self._lock:
            for t in gone:
                self._known.pop(t, None)
        metrics.count_dropped_increments("task_deleted", len(gone))
        log.warning(
            "dropped PUT /task increments of %d deleted task(s): %s",
            len(gone),
            ", ".join(gone[:10]) + (" ..." if len(gone) > 10 else ""),
        )

    def close(self) -> None:
        """Stop the flush thread and write what is left (retrying a few times)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.pending():
            return
        for attempt in range(1, _CLOSE_ATTEMPTS + 1):
            if self._pool.closed:  # its owner closed it first: no retry can write them
                break
            try:
                self.flush()
                return
            except Exception:
                log.exception("counter flush at shutdown failed (attempt %d)", attempt)
        lost = self.pending()
        metrics.count_dropped_increments("shutdown_write_failed", len(lost))
        log.error("counter increments lost at shutdown: %s", lost)

    def _check_room(self, updates: list[tuple[str, int, int]]) -> None:
        """Raise ``Refused`` unless ``updates`` may be kept (the caller holds the lock)."""
        if self._down:
            raise Refused(
                "database unavailable", "counters: the last write of buffered increments failed"
            )
        # tasks a flush in progress took count too: they come back into the buffer if it fails
        new = {task_id for task_id, _, _ in updates if task_id not in self._pending}
        if len(self._pending) + self._flushing + len(new) > self._max_tasks:
            raise Refused(
                "counter buffer full",
                f"counters: {self._max_tasks} tasks' increments are waiting to be written"
                " (COUNTER_BUFFER_MAX)",
            )

    def _merge(self, updates: Iterable[tuple[str, int, int]]) -> None:
        """Sum increments into the buffer (the caller holds the lock)."""
        for task_id, success, failures in updates:
            sums = self._pending.setdefault(task_id, [0, 0])
            sums[0] += success
            sums[1] += failures

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except Exception as exc:
                log.warning("counter flush failed, will retry: %s", exc)


def close_all() -> None:
    """Close every live buffer of this process (gunicorn ``worker_exit``, interpreter exit)."""
    for buffer in list(_LIVE):
        buffer.close()


atexit.register(close_all)
