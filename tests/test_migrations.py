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


def _migration_files() -> list:
    return sorted(migrate.MIGRATIONS_DIR.glob("*.sql"))


def test_up_down_up(empty_db):
    migrate.migrate(empty_db)
    assert _has_schema(empty_db)
    for _ in _migration_files():  # dbmate rolls back one migration at a time
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


def test_each_down_restores_the_schema_before_its_up(empty_db, tmp_path, monkeypatch):
    """Rolling back the newest migrations one by one passes through exactly the schemas
    that applying only the older ones gives (each down restores what its up replaced)."""
    files = _migration_files()
    migrate.migrate(empty_db)
    rolled_back = {}
    for n in range(len(files) - 1, 0, -1):
        migrate.rollback(empty_db)
        rolled_back[n] = tmp_path / f"down_to_{n}.sql"
        migrate.dump_schema(empty_db, schema_file=rolled_back[n])
    for n in range(1, len(files)):
        partial = tmp_path / f"first_{n}"
        partial.mkdir()
        for f in files[:n]:
            (partial / f.name).write_text(f.read_text())
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute("DROP SCHEMA taskrunner CASCADE; DROP TABLE public.schema_migrations")
        monkeypatch.setattr(migrate, "MIGRATIONS_DIR", partial)
        migrate.migrate(empty_db)
        upto = tmp_path / f"up_to_{n}.sql"
        migrate.dump_schema(empty_db, schema_file=upto)
        assert _normalise(upto.read_text()) == _normalise(rolled_back[n].read_text()), (
            f"rolling back {files[n].name} does not restore the schema of the migrations before it"
        )
