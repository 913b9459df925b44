"""The PUT /task counter buffer: coalesce increments per process, flush them in one statement.

``add`` sums increments into ``{task_id: [success, failures]}`` under a lock; a daemon
thread (started on first use, so it always lives in the process that serves requests)
flushes every ``interval`` seconds with one ``add_counters`` call. A failed flush puts the
increments back for the next round, so none are lost while the process lives. ``close``
stops the thread and flushes what is left; it runs at interpreter exit and from gunicorn's
``worker_exit`` hook (``close_all``), through a registry of live buffers.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import weakref
from collections.abc import Iterable

import psycopg_pool

from taskrunner.db import QUERIES

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[CounterBuffer] = weakref.WeakSet()
_CLOSE_ATTEMPTS = 3


class CounterBuffer:
    """Per-process, thread-safe sums of PUT /task increments."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, interval: float) -> None:
        self._pool = pool
        self._interval = interval
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _LIVE.add(self)

    def add(self, updates: Iterable[tuple[str, int, int]]) -> None:
        """Add ``(task_id, new_success, new_failures)`` increments."""
        with self._lock:
            for task_id, success, failures in updates:
                sums = self._pending.setdefault(task_id, [0, 0])
                sums[0] += success
                sums[1] += failures
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="taskrunner-counter-flush", daemon=True
                )
                self._thread.start()

    def pending(self) -> dict[str, tuple[int, int]]:
        """A copy of the increments not yet written."""
        with self._lock:
            return {task_id: (s, f) for task_id, (s, f) in self._pending.items()}

    def flush(self) -> int:
        """Write everything buffered in one statement; returns the tasks updated.

        On failure the increments go back into the buffer and the error is raised.
        """
        with self._lock:
            taken, self._pending = self._pending, {}
        if not taken:
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
            self.add((t, s, f) for t, (s, f) in taken.items())
            raise
        return row["updated"]

    def close(self) -> None:
        """Stop the flush thread and write what is left (retrying a few times)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for attempt in range(1, _CLOSE_ATTEMPTS + 1):
            try:
                self.flush()
                return
            except Exception:
                log.exception("counter flush at shutdown failed (attempt %d)", attempt)
        log.error("counter increments lost at shutdown: %s", self.pending())

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
