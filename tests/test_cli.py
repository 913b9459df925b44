"""The ``taskrunner`` command: help texts, migrate against a real database, supervision,
and (once the API and worker exist) ``up`` end to end."""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from procs import free_port, pg_url, start_up
from psycopg import sql

from taskrunner import cli, migrate, supervisor
from taskrunner.config import Config

SUBCOMMANDS = ["up", "api", "worker", "migrate", "psql"]
HAS_MIGRATIONS = any(migrate.MIGRATIONS_DIR.glob("*.sql"))


def _run_cli(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "taskrunner.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


# -- help and argument handling ------------------------------------------------------------


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "taskrunner"
    if not script.exists():
        pytest.skip("the taskrunner console script is not installed beside this Python")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    for command in SUBCOMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])

    assert exit_info.value.code == 0
    assert f"usage: taskrunner {command}" in capsys.readouterr().out


def test_up_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    defaults = Config()

    assert f"$PORT or {defaults.port}" in out
    assert f"$API_PROCESSES or {defaults.api_processes}" in out
    assert f"$WORKER_PROCESSES or {defaults.worker_processes}" in out
    assert f"$WORKER_CONCURRENCY or {defaults.worker_concurrency}" in out
    assert f"$LOG_LEVEL or {defaults.log_level}" in out
    for name in ("DATABASE_URL", "TASKRUNNER_STATE_DIR", "HOST_URL", "WEBHOOK_ALLOW_PRIVATE"):
        assert name in out


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])

    assert exit_info.value.code == 2
    assert "usage: taskrunner" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["migrate", "api", "worker"])
def test_commands_that_need_a_database_say_so(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = _run_cli(command, env=env)

    assert result.returncode == 1
    assert "DATABASE_URL is not set" in result.stderr


def test_port_flag_moves_the_default_host_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOST_URL", raising=False)
    config = cli._override(Config(), port=9999, worker_concurrency=None)

    assert config.port == 9999
    assert config.host_url == "http://127.0.0.1:9999"


def test_port_flag_keeps_an_explicit_host_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_URL", "https://tasks.example.com")
    config = cli._override(Config.from_env(), port=9999)

    assert config.host_url == "https://tasks.example.com"


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, None), ("", None), ("true", True), ("ON", True), ("0", False)]
)
def test_dead_end_cancel_is_a_strict_switch(raw: str | None, expected: bool | None) -> None:
    env = {} if raw is None else {"DEAD_END_CANCEL": raw}
    assert Config.from_env(env).dead_end_cancel is expected


def test_a_misspelt_dead_end_cancel_is_refused() -> None:
    with pytest.raises(SystemExit, match="DEAD_END_CANCEL must be true or false"):
        Config.from_env({"DEAD_END_CANCEL": "ture"})


# -- migrate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db?sslmode=disable"),
        (
            "postgres://u@h/db?application_name=a%20b",
            "postgres://u@h/db?application_name=a%20b&sslmode=disable",
        ),  # noqa: E501
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgresql:///db?host=/run/pg", "postgresql:///db?host=/run/pg&sslmode=disable"),
    ],
)
def test_with_sslmode(url: str, expected: str) -> None:
    assert migrate.with_sslmode(url) == expected


def test_dbmate_is_installed() -> None:
    assert Path(migrate.dbmate_binary()).is_file()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MIGRATIONS, reason="sql/migrations holds no migration yet")
def test_migrate_creates_the_schema_and_rollback_undoes_a_step(fresh_db_url: str) -> None:
    result = _run_cli("migrate", "--database-url", fresh_db_url)
    assert result.returncode == 0, result.stdout + result.stderr

    with psycopg.connect(fresh_db_url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'taskrunner'").fetchone()
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
    assert applied == len(list(migrate.MIGRATIONS_DIR.glob("*.sql")))

    newest = max(p.name.split("_", 1)[0] for p in migrate.MIGRATIONS_DIR.glob("*.sql"))
    assert f"applied {applied} migration(s): the database is at version {newest}" in result.stdout

    again = _run_cli("migrate", "--database-url", fresh_db_url)
    assert again.returncode == 0, again.stderr
    assert "Applying" not in again.stdout
    assert f"nothing to migrate: the database is already at version {newest}" in again.stdout

    back = _run_cli("migrate", "--rollback", "--database-url", fresh_db_url)
    assert back.returncode == 0, back.stdout + back.stderr
    with psycopg.connect(fresh_db_url, autocommit=True) as conn:
        remaining = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
    assert remaining == applied - 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MIGRATIONS, reason="sql/migrations holds no migration yet")
def test_migrate_creates_a_missing_database() -> None:
    name = f"trcli_new_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        result = _run_cli("migrate", "--database-url", pg_url(name))
        assert result.returncode == 0, result.stdout + result.stderr
        with psycopg.connect(pg_url(name)) as conn:
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] >= 1
    finally:
        with psycopg.connect(pg_url("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.skipif(shutil.which("psql") is None, reason="no psql client on PATH")
def test_psql_opens_database_url_and_passes_arguments_through(fresh_db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": fresh_db_url}
    query = "SELECT current_database(), current_setting('application_name')"
    result = _run_cli("psql", "-At", "-c", query, "-c", "SELECT 2", env=env)

    assert result.returncode == 0, result.stderr
    dbname = fresh_db_url.rsplit("/", 1)[1]
    assert result.stdout.split() == [f"{dbname}|psql", "2"]
    dashed = _run_cli("psql", "--", "-At", "-c", "SELECT 3", env=env)
    assert dashed.stdout.strip() == "3", dashed.stderr


def test_other_commands_still_refuse_unknown_arguments() -> None:
    result = _run_cli("migrate", "--bogus")

    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


# -- supervision ---------------------------------------------------------------------------


def _sleeper() -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(60)"]


def test_supervisor_reports_a_dead_child_and_stops_the_others() -> None:
    children = supervisor.Supervisor(grace=5)
    children.spawn("sleeper", _sleeper(), dict(os.environ))
    children.spawn("quitter", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))

    with pytest.raises(
        supervisor.ChildExited, match=r"quitter exited unexpectedly \(exit code 3\)"
    ):
        children.watch()
    children.stop_all()

    assert [proc.poll() for _, proc in children.children] == [-signal.SIGTERM, 3]


def test_supervisor_kills_a_child_that_ignores_sigterm() -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)",
    ]
    children = supervisor.Supervisor(grace=0.5)
    proc = subprocess.Popen(stubborn, stdout=subprocess.PIPE, text=True, process_group=0)
    children.children.append(("stubborn", proc))
    assert proc.stdout.readline().strip() == "ready"

    children.stop_all()

    assert proc.returncode == -signal.SIGKILL


# -- up, end to end ------------------------------------------------------------------------

HAS_SERVICE = all(
    importlib.util.find_spec(name) is not None
    for name in ("taskrunner.api.app", "taskrunner.api.gunicorn_conf", "taskrunner.worker.main")
)


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue, text: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not printed within {timeout}s; output:\n{''.join(seen)}")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SERVICE, reason="the API and worker modules do not exist yet")
@pytest.mark.skipif(not HAS_MIGRATIONS, reason="sql/migrations holds no migration yet")
@pytest.mark.parametrize("database", ["given", "embedded"])
def test_up_serves_health_and_stops_cleanly(database: str, request: pytest.FixtureRequest) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="tr-up-", dir="/tmp"))
    state_dir.chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HOST_URL")}
    env |= {"TASKRUNNER_STATE_DIR": str(state_dir / ".taskrunner"), "PYTHONUNBUFFERED": "1"}
    if database == "given":
        env["DATABASE_URL"] = request.getfixturevalue("fresh_db_url")
    up = start_up(port, env, worker_processes=2)
    try:
        lines = _wait_for_line(_lines(up.stdout), "taskrunner is up", timeout=90)
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}" in output
        assert "WEBHOOK_ALLOW_PRIVATE=true" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        if database == "embedded":
            from taskrunner.embedded import EmbeddedPostgres

            assert not EmbeddedPostgres(state_dir / ".taskrunner").is_running()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        from taskrunner.embedded import EmbeddedPostgres

        EmbeddedPostgres(state_dir / ".taskrunner").stop()
        shutil.rmtree(state_dir, ignore_errors=True)
