"""The one place that opens database connections, loads named queries and maps errors.

Queries live in ``queries.sql`` as ``-- name: <query_name>`` blocks; Python code refers to
them by name (``QUERIES["claim_tasks"]``) and never assembles SQL from strings.
Database errors raised by the state machine carry our own SQLSTATEs (``TR400``, ``TR404``,
``TR409``); ``wrap_exceptions`` turns them, and connection failures, into domain errors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

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


_BY_SQLSTATE = {"TR400": BadInput, "TR404": TaskNotFound, "TR409": IllegalTransition}
QUERY_CANCELED = "57014"  # statement_timeout (or a DBA's pg_cancel_backend)


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
        if is_conflict(exc):
            raise TransientConflict("database conflict; retry") from exc
        if sqlstate == QUERY_CANCELED:
            raise DatabaseUnavailable("statement timeout (STATEMENT_TIMEOUT)") from exc
        if isinstance(exc, psycopg.OperationalError) or (sqlstate or "").startswith(("08", "57P")):
            raise DatabaseUnavailable("database unavailable") from exc
        raise
    except psycopg_pool.PoolTimeout as exc:
        raise DatabaseUnavailable("database unavailable") from exc


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A single autocommit connection returning dict rows."""
    return psycopg.connect(url, autocommit=True, row_factory=dict_row, **kwargs)


def _pool(
    cls,
    url: str,
    min_size: int,
    max_size: int,
    timeout: float,
    name: str,
    application_name: str,
    **connect,
):
    """A pool of ``cls`` (sync or async) with the settings every pool here shares:
    autocommit dict-row connections, checked on checkout, opened by the caller.
    ``application_name`` says who changed a task in its history (unless the URL names
    one): ``taskrunner-api`` or ``taskrunner-worker``, where a DBA's psql says ``psql``."""
    kwargs: dict = {"autocommit": True, "row_factory": dict_row, **connect}
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


def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    timeout: float = 5.0,
    name: str = "taskrunner",
    application_name: str = "taskrunner-api",
    statement_timeout: float = 0,
) -> psycopg_pool.ConnectionPool:
    """A pool of autocommit, dict-row connections (opened lazily, never blocks startup).
    ``statement_timeout`` (s, 0 = none) bounds every statement on its connections."""
    ms = round(statement_timeout * 1000)
    connect = {"options": f"-c statement_timeout={ms}"} if ms > 0 else {}
    return _pool(
        psycopg_pool.ConnectionPool,
        url,
        min_size,
        max_size,
        timeout,
        name,
        application_name,
        **connect,
    )


def create_async_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    timeout: float = 5.0,
    name: str = "taskrunner-worker",
    application_name: str = "taskrunner-worker",
) -> psycopg_pool.AsyncConnectionPool:
    """The asyncio twin of ``create_pool`` for workers."""
    return _pool(
        psycopg_pool.AsyncConnectionPool, url, min_size, max_size, timeout, name, application_name
    )
