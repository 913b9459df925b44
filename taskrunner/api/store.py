"""Database access for the API: run one named query, map errors, feed metrics.

A call that changes tasks goes through ``db.run_with_stats``: one transaction, its counted
transitions recorded in Prometheus after commit, run again after a deadlock.

While the database is out of reach, waiting the pool's full timeout on every request
would tie up every server thread and let 503s queue behind each other; so once a request
found it down, the next ones wait only ``DOWN_TIMEOUT`` for a connection until one
succeeds again (the pool keeps reconnecting in the background).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool

from taskrunner.db import QUERIES, Before, is_conflict, run_with_stats, wrap_exceptions

DOWN_TIMEOUT = 0.5  # seconds to wait for a connection while the database seems down


class Store:
    """The API's access to PostgreSQL through a connection pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self.pool = pool
        self._down = False  # the last attempt could not reach the database

    def call(self, name: str, params: dict[str, Any], before: Before = ()) -> list[dict]:
        """Run a query that may change tasks (``db.run_with_stats``, after the queries
        ``before`` in the same transaction); returns its rows. In pipeline mode: BEGIN, the
        query and ``take_stats`` travel in one round trip, COMMIT in a second (four before;
        docs/performance.md, S1)."""
        return run_with_stats(
            functools.partial(self._transaction, pipeline=True), name, params, before
        )

    def read(self, *queries: tuple[str, dict[str, Any]]) -> list[list[dict]]:
        """Run read-only queries on one connection, in one transaction."""
        with self._transaction() as conn:
            return [conn.execute(QUERIES[name], params).fetchall() for name, params in queries]

    @contextlib.contextmanager
    def _transaction(self, pipeline: bool = False) -> Iterator[psycopg.Connection]:
        timeout = DOWN_TIMEOUT if self._down else None  # None: the pool's own timeout
        with wrap_exceptions():
            try:
                with self.pool.connection(timeout=timeout) as conn:
                    self._down = False  # the pool checked it: the database answers
                    with (
                        conn.pipeline() if pipeline else contextlib.nullcontext(),
                        conn.transaction(),
                    ):
                        yield conn
            except psycopg_pool.PoolTimeout:
                self._down = True
                raise
            except psycopg.OperationalError as exc:
                if not is_conflict(exc):
                    self._down = True
                raise
