"""The one place that opens database connections, runs named queries and maps errors.

Queries live in ``queries.sql`` as ``-- name: <query_name>`` blocks; Python code refers to
them by name (``QUERIES["claim_tasks"]``) and never assembles SQL from strings.
Database errors raised by the state machine carry our own SQLSTATEs (``TR400``, ``TR404``,
``TR409``); ``wrap_exceptions`` turns them, and connection failures, into domain errors.
A call that may change tasks goes through ``run_with_stats`` (the API) or
``run_with_stats_async`` (the worker), which feed its counted transitions to metrics.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from taskrunner import metrics

_QUERY_FILE = Path(__file__).with_name("queries.sql")


def load_queries(path: Path = _QUERY_FILE) -> dict[str, str]:
    """Parse ``-- name: x`` blocks into a dict of query texts."""
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
        queries[name.strip()] = "\n".join(lines).strip().rstrip(";")
    return queries


QUERIES = load_queries()


class DomainError(Exception):
    """An error the state machine raised on purpose; ``status`` is the HTTP status."""

    status = 400

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class BadInput(DomainError):
    status = 400


class TaskNotFound(DomainError):
    status = 404


class IllegalTransition(DomainError):
    status = 409


class DatabaseUnavailable(DomainError):
    status = 503


class TransientConflict(DatabaseUnavailable):
    """A deadlock or serialization failure: PostgreSQL rolled the transaction back, so
    running it again is safe (``CONFLICT_ATTEMPTS`` times, then it is a 503)."""


CONFLICT_ATTEMPTS = 3


def is_conflict(exc: BaseException) -> bool:
    """A deadlock (40P01) or serialization failure (40001): SQLSTATE class 40, rolled back.
    (psycopg's DeadlockDetected is not a TransactionRollback subclass, hence the code.)"""
    return (getattr(exc, "sqlstate", None) or "").startswith("40")


Before = Sequence[tuple[str, dict[str, Any]]]


class StatsCall:
    """One call that may change tasks, as the API (sync) and the worker (asyncio) run it.

    The named query, then ``take_stats`` in the same transaction (the transitions its
    triggers counted), handed to metrics after commit. A transaction PostgreSQL rolled
    back for a conflict (a deadlock between two completions propagating into shared
    children, say) is run again, ``CONFLICT_ATTEMPTS`` times in all. Only the waiting
    differs between ``run_with_stats`` and ``run_with_stats_async``. ``before``: named
    queries to run first in the same transaction (``set_batch_trace`` before
    ``create_batch``).
    """

    def __init__(self, name: str, params: dict[str, Any], before: Before = ()) -> None:
        self.statements = (
            *((QUERIES[n], p) for n, p in before),
            (QUERIES[name], params),
            (QUERIES["take_stats"], None),
        )
        self.attempt = 0
        self.results: list[list[dict]] | None = None

    @contextlib.contextmanager
    def retrying(self) -> Iterator[None]:
        """Around one attempt: a conflict is swallowed (the caller tries again) unless
        this was the last attempt."""
        self.attempt += 1
        try:
            yield
        except TransientConflict:
            if self.attempt >= CONFLICT_ATTEMPTS:
                raise

    def rows(self) -> list[dict]:
        """After commit: record the transitions, return the query's rows."""
        *_, rows, stats = self.results
        if stats and stats[0]["stats"]:  # nothing to count when no transition happened
            metrics.record_stats(stats[0]["stats"])
        return rows


Transaction = Callable[[], contextlib.AbstractContextManager[psycopg.Connection]]
AsyncTransaction = Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection]]


def run_with_stats(
    transaction: Transaction, name: str, params: dict[str, Any], before: Before = ()
) -> list[dict]:
    """Run ``name`` as a ``StatsCall`` in transactions opened by ``transaction()``."""
    call = StatsCall(name, params, before)
    while call.results is None:
        with call.retrying(), transaction() as conn:
            # every statement sent before the first read: in pipeline mode they travel together
            cursors = [conn.execute(q, p) for q, p in call.statements]
            call.results = [cursor.fetchall() for cursor in cursors]
    return call.rows()


async def run_with_stats_async(
    transaction: AsyncTransaction, name: str, params: dict[str, Any]
) -> list[dict]:
    """The asyncio form of ``run_with_stats``. Every statement is sent before the first
    result is read, so in pipeline mode (``async_transaction``) they travel together."""
    call = StatsCall(name, params)
    while call.results is None:
        with call.retrying():
            async with transaction() as conn:
                cursors = [await conn.execute(q, p) for q, p in call.statements]
                call.results = [await cursor.fetchall() for cursor in cursors]
    return call.rows()


_BY_SQLSTATE = {"TR400": BadInput, "TR404": TaskNotFound, "TR409": IllegalTransition}
QUERY_CANCELED = "57014"  # statement_timeout (or a DBA's pg_cancel_backend)
FOREIGN_KEY_VIOLATION = "23503"


@contextlib.contextmanager
def wrap_exceptions() -> Iterator[None]:
    """Translate database errors into DomainError subclasses."""
    try:
        yield
    except psycopg.Error as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        cls = _BY_SQLSTATE.get(sqlstate or "")
        if cls is not None:
            diag = exc.diag
            details = [d for d in (diag.message_detail or "").split("\n") if d]
            raise cls(diag.message_primary or str(exc), details) from exc
        if (
            sqlstate == FOREIGN_KEY_VIOLATION
            and exc.diag.constraint_name == "dependency_parent_id_fkey"
        ):
            # create_batch linked to an existing task that retention deleted meanwhile
            raise BadInput(
                "unknown dependency", ["dependencies: a parent task was deleted (retention)"]
            ) from exc
        if is_conflict(exc):
            raise TransientConflict("database conflict; retry") from exc
        if sqlstate == QUERY_CANCELED:
            raise DatabaseUnavailable("statement timeout (STATEMENT_TIMEOUT)") from exc
        if isinstance(exc, psycopg.OperationalError) or (sqlstate or "").startswith(("08", "57P")):
            raise DatabaseUnavailable("database unavailable") from exc
        raise
    except psycopg_pool.PoolTimeout as exc:
        raise DatabaseUnavailable("database unavailable") from exc


@contextlib.asynccontextmanager
async def async_transaction(
    pool: psycopg_pool.AsyncConnectionPool,
) -> AsyncIterator[psycopg.AsyncConnection]:
    """A transaction on a connection from an asyncio pool, its errors mapped by
    ``wrap_exceptions`` (the worker's form of the API store's ``_transaction``).

    In pipeline mode: BEGIN and the statements sent before the first read go to the server
    in one round trip, COMMIT in a second (the worker's claim cost five round trips before:
    BEGIN, the claim, ``take_stats``, COMMIT each waited for its answer; docs/performance.md,
    S1). An error still surfaces inside the transaction block, which rolls back."""
    with wrap_exceptions():
        async with pool.connection() as conn, conn.pipeline(), conn.transaction():
            yield conn


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A single autocommit connection returning dict rows."""
    return psycopg.connect(url, autocommit=True, row_factory=dict_row, **kwargs)


def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    timeout: float = 5.0,
    name: str = "taskrunner",
    application_name: str = "taskrunner-api",
    statement_timeout: float = 0,
    pooler: str = "",
    cls: type = psycopg_pool.ConnectionPool,
):
    """A pool of autocommit, dict-row connections, checked on checkout and opened by the
    caller (so it never blocks startup); ``cls=psycopg_pool.AsyncConnectionPool`` for the
    asyncio worker (see ``create_async_pool``). ``application_name`` says who changed a
    task in its history (unless the URL names one): ``taskrunner-api`` or
    ``taskrunner-worker``, where a DBA's psql says ``psql``; a startup parameter, so it
    survives PgBouncer, which sets it on whichever server connection serves us.
    ``statement_timeout`` (s, 0 = none) bounds every statement on its connections (the
    API's: STATEMENT_TIMEOUT), as a startup ``options`` parameter, which PgBouncer does not
    pass on: behind it, set the timeout on the server (``ALTER ROLE ... SET
    statement_timeout``) or in PgBouncer (``query_timeout``), see deploy/README.md.
    ``pooler="pgbouncer"`` (``DATABASE_POOLER``): ``url`` is PgBouncer in transaction mode."""
    kwargs: dict = {"autocommit": True, "row_factory": dict_row}
    if statement_timeout > 0 and pooler != "pgbouncer":
        kwargs["options"] = f"-c statement_timeout={round(statement_timeout * 1000)}"
    if pooler == "pgbouncer":
        # a pooler in transaction mode hands each transaction any server connection, where
        # a statement psycopg prepared (after 5 runs) does not exist: never prepare. Off
        # by default: preparing saves ~0.1-0.2 ms per read on a direct connection.
        kwargs["prepare_threshold"] = None
    if "application_name" not in conninfo_to_dict(url):
        kwargs["application_name"] = application_name
    return cls(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        name=name,
        open=False,
        kwargs=kwargs,
        check=cls.check_connection,
    )


def create_async_pool(
    url: str,
    *,
    name: str = "taskrunner-worker",
    application_name: str = "taskrunner-worker",
    **kwargs,
) -> psycopg_pool.AsyncConnectionPool:
    """The asyncio twin of ``create_pool`` for workers."""
    return create_pool(
        url,
        name=name,
        application_name=application_name,
        cls=psycopg_pool.AsyncConnectionPool,
        **kwargs,
    )
