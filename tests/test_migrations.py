"""Migrations: up/down/up works, and the committed sql/schema.sql matches the migrations."""

from __future__ import annotations

import os
import re

import psycopg
import pytest
from conftest import pg_url

from taskrunner import migrate


@pytest.fixture
def empty_db():
    name = f"trmig_{os.getpid()}"
    admin = psycopg.connect(pg_url("postgres"), autocommit=True)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.execute(f'CREATE DATABASE "{name}"')
    yield pg_url(name)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _has_schema(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return (
            conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'taskrunner'"
            ).fetchone()[0]
            == 1
        )


def test_up_down_up(empty_db):
    migrate.migrate(empty_db)
    assert _has_schema(empty_db)
    for _ in sorted(migrate.MIGRATIONS_DIR.glob("*.sql")):  # down, one migration at a time
        migrate.rollback(empty_db)
    assert not _has_schema(empty_db)
    migrate.migrate(empty_db)
    assert _has_schema(empty_db)
    with psycopg.connect(empty_db) as conn:  # and it works after the round trip
        conn.execute("SELECT taskrunner.tick()")


def _normalise(text: str) -> str:
    return "\n".join(
        line for line in text.splitlines() if not re.match(r"-- Dumped (from|by) ", line)
    ).strip()


def test_schema_file_matches_migrations(empty_db, tmp_path):
    migrate.migrate(empty_db)
    dumped = tmp_path / "schema.sql"
    migrate.dump_schema(empty_db, schema_file=dumped)
    committed = migrate.SCHEMA_FILE.read_text()
    assert _normalise(dumped.read_text()) == _normalise(committed), (
        "sql/schema.sql is out of date: run `bin/taskrunner migrate --dump` on a fresh "
        "database and commit it"
    )
