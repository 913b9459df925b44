"""Shared fixtures: a fresh database per test, cloned from a migrated template.

The server is the one the libpq ``PG*`` variables name, else 127.0.0.1:5432 (CI's).
The template is migrated once per session with dbmate (the real migrations), then every
test gets ``CREATE DATABASE ... TEMPLATE`` from pytest-postgresql: real PostgreSQL,
milliseconds per test. Database names carry the pid so parallel runs never collide.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from procs import PG_HOST, PG_PASSWORD, PG_PORT, PG_USER, pg_url
from psycopg import sql
from psycopg.rows import dict_row
from pytest_postgresql import factories

from taskrunner import db, migrate

DB_PREFIX = f"trtest_{os.getpid()}"


def _migrate_template(host, port, user, dbname, password, **_: Any) -> None:
    migrate.migrate(pg_url(dbname))


postgresql_server = factories.postgresql_noproc(
    host=PG_HOST,
    port=PG_PORT,
    user=PG_USER,
    password=PG_PASSWORD,
    dbname=DB_PREFIX,
    maintenance_dbname="postgres",
    load=[_migrate_template],
)
postgresql_db = factories.postgresql("postgresql_server")


@pytest.fixture
def db_url(postgresql_db: psycopg.Connection) -> str:
    """URL of this test's own freshly cloned, migrated database."""
    return pg_url(postgresql_db.info.dbname)


@pytest.fixture
def empty_db() -> Iterator[str]:
    """URL of a new, empty database (not migrated): for tests of the migrations themselves."""
    name = f"trempty_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(pg_url("postgres"), autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    yield pg_url(name)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to this test's database, returning dict rows."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        yield c


@pytest.fixture
def fresh_db_url() -> Iterator[str]:
    """An empty database of its own (not migrated) on the local server, dropped afterwards."""
    name = f"trfresh_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(pg_url("postgres"), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {pg_url('postgres')}: {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield pg_url(name)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pool(db_url: str) -> Iterator[Any]:
    """An open connection pool (the API's kind) on this test's database."""
    pool = db.create_pool(db_url, max_size=4, timeout=5)
    pool.open(wait=True)
    yield pool
    pool.close()


# The metrics the seed's README lists: /metrics names every one of them from the start.
SEED_METRICS = (
    "tasks_created_total",
    "tasks_completed_total",
    "task_status_transitions_total",
    "tasks_blocked_by_concurrency_total",
    "dependency_propagations_total",
    "worker_loop_duration_seconds",
)


# --- small builders for tests: only the fields a test cares about ---------------------


def webhook(
    event: str = "start", url: str = "http://127.0.0.1:9/hook", verb: str = "POST", **extra: Any
) -> dict:
    return {"event": event, "url": url, "verb": verb, **extra}


def task_spec(
    local_id: str,
    *,
    kind: str = "k",
    deps: list | None = None,
    rules: list | None = None,
    metadata: dict | None = None,
    actions: list | None = None,
    **extra: Any,
) -> dict:
    """A normalised create_batch entry (the API's output format, see docs/sql.md)."""
    dependencies = []
    for dep in deps or []:
        if isinstance(dep, str):
            dep = (dep, True)
        ref, requires_success = dep
        key = "task_id" if _is_uuid(ref) else "local_id"
        dependencies.append({key: str(ref), "requires_success": requires_success})
    return {
        "local_id": local_id,
        "name": extra.pop("name", local_id),
        "kind": kind,
        "metadata": metadata or {},
        "rules": rules or [],
        "actions": actions if actions is not None else [webhook()],
        "dependencies": dependencies,
        **extra,
    }


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def create_batch(conn: psycopg.Connection, specs: list[dict], requester: str = "test") -> dict:
    """Create a batch through the SQL function; returns {local_id: task row}."""
    rows = conn.execute(
        "SELECT * FROM taskrunner.create_batch(%s::jsonb, %s)", (json.dumps(specs), requester)
    ).fetchall()
    return {r["local_id"]: r for r in rows}


def status_of(conn: psycopg.Connection, task_id: Any) -> str:
    return conn.execute(
        "SELECT status::text FROM taskrunner.task WHERE id = %s", (task_id,)
    ).fetchone()["status"]


def statuses(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute("SELECT local_id, status::text FROM taskrunner.task").fetchall()
    return {r["local_id"]: r["status"] for r in rows}
