"""Database access for the API: run one named query, map errors, feed metrics.

A call that changes tasks runs in one transaction and reads the trigger-counted
transitions (``take_stats``) before commit; they are recorded in Prometheus after commit.
A transaction PostgreSQL rolled back for a deadlock or a serialization failure (two
completions propagating into shared children, say) is run again, a few times.
"""

from __future__ import annotations

from typing import Any

import psycopg_pool

from taskrunner import metrics
from taskrunner.db import CONFLICT_ATTEMPTS, QUERIES, TransientConflict, wrap_exceptions


class Store:
    """The API's access to PostgreSQL through a connection pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self.pool = pool

    def call(self, name: str, params: dict[str, Any]) -> list[dict]:
        """Run a query that may change tasks; returns its rows."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                with wrap_exceptions(), self.pool.connection() as conn, conn.transaction():
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
        with wrap_exceptions(), self.pool.connection() as conn, conn.transaction():
            return [conn.execute(QUERIES[name], params).fetchall() for name, params in queries]
