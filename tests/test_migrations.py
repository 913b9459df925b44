"""Migrations: up/down/up works, each migrate:down undoes exactly its own migrate:up, the
committed sql/schema.sql matches the migrations, and released migrations never change
(append-only, see tests/releases.py)."""

from __future__ import annotations

import re
import shutil

import psycopg
import pytest
from releases import FIX, RELEASED_FILE, migration_files, problems, released

from taskrunner import migrate


def _has_schema(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return (
            conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'taskrunner'"
            ).fetchone()[0]
            == 1
        )


def _rollback_all(url: str) -> None:
    for _ in migration_files():
        migrate.rollback(url)


def test_up_down_up(empty_db):
    migrate.migrate(empty_db)
    assert _has_schema(empty_db)
    _rollback_all(empty_db)
    assert not _has_schema(empty_db)
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM public.schema_migrations").fetchone()[0] == 0
    migrate.migrate(empty_db)
    assert _has_schema(empty_db)
    with psycopg.connect(empty_db) as conn:  # and it works after the round trip
        conn.execute("SELECT taskrunner.tick()")


def _normalise(text: str) -> str:
    return "\n".join(
        line for line in text.splitlines() if not re.match(r"-- Dumped (from|by) ", line)
    ).strip()


def _dump(url: str, path) -> str:
    migrate.dump_schema(url, schema_file=path)
    return _normalise(path.read_text())


def test_each_down_undoes_exactly_its_up(empty_db, tmp_path):
    """Apply the migrations one at a time, dumping the schema after each; then roll back
    one at a time: each rollback must give back the dump from before that migration."""
    files = migration_files()
    steps = tmp_path / "steps"
    steps.mkdir()
    before = [_dump(empty_db, tmp_path / "0.sql")]
    for i, path in enumerate(files, 1):
        shutil.copyfile(path, steps / path.name)  # dbmate sees migrations 1..i only
        migrate.migrate(empty_db, migrations_dir=steps)
        before.append(_dump(empty_db, tmp_path / f"{i}.sql"))
    for i in range(len(files), 0, -1):
        migrate.rollback(empty_db)
        after = _dump(empty_db, tmp_path / f"down{i}.sql")
        assert after == before[i - 1], f"the migrate:down of {files[i - 1].name} is not exact"
    assert not _has_schema(empty_db)


def test_schema_file_matches_migrations(empty_db, tmp_path):
    migrate.migrate(empty_db)
    dumped = tmp_path / "schema.sql"
    migrate.dump_schema(empty_db, schema_file=dumped)
    committed = migrate.SCHEMA_FILE.read_text()
    assert _normalise(dumped.read_text()) == _normalise(committed), (
        "sql/schema.sql is out of date: run `bin/taskrunner migrate --dump` on a fresh "
        "database and commit it"
    )


# -- append-only: released migrations never change ----------------------------------------


def test_released_migrations_are_unchanged():
    found = problems()
    assert not found, "\n".join(found) + f"\n{FIX}"


def test_the_first_release_is_listed():
    releases = {entry.release for entry in released()}
    assert "v0.1.0" in releases
    assert len(released()) == len({entry.name for entry in released()}), "a file listed twice"


@pytest.mark.parametrize(
    "tamper, complaint",
    [
        (lambda d, f: (d / f).write_text((d / f).read_text() + "\n-- edited\n"), "was changed"),
        (lambda d, f: (d / f).unlink(), "was deleted or renamed"),
        (lambda d, f: (d / "20000101000000_early.sql").write_text("-- migrate:up\n"), "order"),
    ],
    ids=["edited", "deleted", "inserted-before"],
)
def test_the_append_only_check_catches(tmp_path, tamper, complaint):
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, copy)
    assert problems(copy, RELEASED_FILE) == []
    tamper(copy, released()[0].name)
    found = problems(copy, RELEASED_FILE)
    assert found and complaint in found[0]
