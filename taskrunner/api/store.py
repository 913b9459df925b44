"""Database access for the API: run one named query, map errors, feed metrics.

A call that changes tasks runs in one transaction and reads the trigger-counted
transitions (``take_stats``) before commit; they are recorded in Prometheus after commit.
A transaction PostgreSQL rolled back for a deadlock or a serialization failure (two
completions propagating into shared children, say) is run again, a few times.

While the database is out of reach, waiting the pool's full timeout on every request
would tie up every server thread and let 503s queue behind each other; so once a request
found it down, the next ones wait only ``DOWN_TIMEOUT`` for a connection until one
succeeds again (the pool keeps reconnecting in the background).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool

from taskrunner import metrics
from taskrunner.db import (
    CONFLICT_ATTEMPTS,
    QUERIES,
    TransientConflict,
    is_conflict,
    wrap_exceptions,
)

DOWN_TIMEOUT = 0.5  # seconds to wait for a connection while the database seems down


class Store:
    """The API's access to PostgreSQL through a connection pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self.pool = pool
        self._down = False  # the last attempt could not reach the database

    def call(self, name: str, params: dict[str, Any]) -> list[dict]:
        """Run a query that may change tasks; returns its rows."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                with self._transaction() as conn:
                    rows = conn.execute(QUERIES[name], params).fetchall()
                    stats = conn.execute(QUERIES["take_stats"]).fetchone()["stats"]
                break
            except TransientConflict:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
        metrics.record_stats(stats)
        return rows

    def read(self, *queries: tuple[str, dict[str, Any]]) -> list[list[dict]]:
        """Run read-only queries on one connection, in one transaction."""
        with self._transaction() as conn:
            return [conn.execute(QUERIES[name], params).fetchall() for name, params in queries]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        timeout = DOWN_TIMEOUT if self._down else None  # None: the pool's own timeout
        with wrap_exceptions():
            try:
                with self.pool.connection(timeout=timeout) as conn:
                    self._down = False  # the pool checked it: the database answers
                    with conn.transaction():
                        yield conn
            except psycopg_pool.PoolTimeout:
                self._down = True
                raise
            except psycopg.OperationalError as exc:
                if not is_conflict(exc):
                    self._down = True
                raise
