"""The embedded PostgreSQL cluster of ``taskrunner up``: real initdb/pg_ctl, in a temp dir.

Run as root (as in CI) these exercise the path where the cluster runs as ``postgres``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from procs import free_port, start_up

from taskrunner import embedded, pgtools
from taskrunner.embedded import EmbeddedError, EmbeddedPostgres

try:
    pgtools.find_pg_bindir()
except pgtools.PgToolsNotFound as exc:
    pytest.skip(f"no PostgreSQL server binaries: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow


def _reachable_tempdir() -> Path:
    """A temp dir the ``postgres`` user can traverse (when we are root)."""
    path = Path(tempfile.mkdtemp(prefix="tr-embedded-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def base_dir() -> Iterator[Path]:
    path = _reachable_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(base_dir: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(base_dir / ".taskrunner")
    yield pg
    pg.stop()


def test_find_pg_bindir_has_the_server_tools() -> None:
    bindir = pgtools.find_pg_bindir()
    assert (bindir / "initdb").is_file()
    assert (bindir / "pg_ctl").is_file()


def test_start_stop_restart_keeps_data(cluster: EmbeddedPostgres) -> None:
    url = cluster.start()

    assert cluster.started_here
    assert cluster.port not in (None, 5432)
    assert url == f"postgresql://taskrunner@127.0.0.1:{cluster.port}/taskrunner"
    assert int(cluster.port_file.read_text()) == cluster.port
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "taskrunner",
            "taskrunner",
        )
        conn.execute("CREATE TABLE kept (note text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")

    cluster.stop()
    assert not cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()

    assert cluster.start() == url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT note FROM kept").fetchall() == [("still here",)]
    assert "database system is ready" in cluster.log_file.read_text()


def test_start_reuses_a_running_cluster(cluster: EmbeddedPostgres) -> None:
    url = cluster.start()

    again = EmbeddedPostgres(cluster.base_dir)
    assert again.start() == url
    assert not again.started_here  # so `up` leaves it to whoever started it


def test_start_picks_a_new_port_when_the_old_one_is_taken(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    cluster.stop()
    old_port = cluster.port

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        url = cluster.start()

    assert cluster.port != old_port
    assert int(cluster.port_file.read_text()) == cluster.port
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as 'postgres'")
def test_root_gets_a_clear_error_when_postgres_can_reach_no_dir(
    base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden = base_dir / "private"
    hidden.mkdir(mode=0o700)
    # the places of its own that postgres would use instead are out of its reach too
    monkeypatch.setattr(embedded, "_server_user_dirs", lambda user: [hidden / "own"])
    pg = EmbeddedPostgres(hidden / ".taskrunner")

    with pytest.raises(EmbeddedError, match="'postgres', which cannot reach"):
        pg.start()


def _checkout_in_private_dir() -> Path:
    """A copy of this checkout's code and SQL in a fresh ``mktemp -d`` (mode 700)."""
    private = Path(tempfile.mkdtemp(prefix="tr-private-"))
    assert private.stat().st_mode & 0o777 == 0o700
    checkout = private / "taskrunner"
    repo = Path(__file__).resolve().parents[1]
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("taskrunner", "sql"):
        shutil.copytree(repo / part, checkout / part, ignore=ignore)
    return checkout


def _up(checkout: Path, port: int) -> tuple[subprocess.Popen, str]:
    """``taskrunner up`` running the checkout's own code (its state dir is inside it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HOST_URL")}
    env.pop("TASKRUNNER_STATE_DIR", None)
    env |= {"PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}
    up = start_up(port, env, cwd=checkout)
    output = ""
    for line in up.stdout:
        output += line
        if line.startswith("DATABASE_URL="):  # printed right after "taskrunner is up"
            break  # (else it ends: `up` gives up after its health timeout)
    assert "taskrunner is up" in output, output
    return up, output


def _stop(up: subprocess.Popen) -> None:
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as 'postgres'")
def test_up_as_root_in_a_directory_postgres_cannot_enter(request: pytest.FixtureRequest) -> None:
    checkout = _checkout_in_private_dir()
    request.addfinalizer(lambda: shutil.rmtree(checkout.parent, ignore_errors=True))
    state = checkout / ".taskrunner"
    pg = EmbeddedPostgres(state)
    request.addfinalizer(lambda: (pg.stop(), shutil.rmtree(pg.cluster_dir, ignore_errors=True)))
    assert pg.cluster_dir != state  # postgres cannot enter the checkout: its own dir
    assert pg.cluster_dir.parent == Path(pwd.getpwnam("postgres").pw_dir) / "taskrunner"
    port = free_port()

    up, output = _up(checkout, port)
    try:
        assert f"embedded PostgreSQL started in {pg.data_dir}" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
            assert resp.status == 200
        url = output.split("DATABASE_URL=", 1)[1].split()[0]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
    finally:
        _stop(up)
    assert not pg.is_running()
    assert (pg.cluster_dir / "checkout").read_text().strip() == str(state)

    up, output = _up(checkout, port)  # the same checkout again: the same cluster
    try:
        assert f"embedded PostgreSQL started in {pg.data_dir}" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
            assert resp.status == 200
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("still here",)]
    finally:
        _stop(up)


def _psql(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "taskrunner.cli", "psql", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_psql_opens_the_embedded_cluster_and_says_when_it_is_down(
    cluster: EmbeddedPostgres,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["TASKRUNNER_STATE_DIR"] = str(cluster.base_dir)

    down = _psql("-c", "SELECT 1", env=env)
    assert down.returncode == 1
    assert "is not running: start `taskrunner up` first" in down.stderr

    cluster.start()
    result = _psql("-At", "-c", "SELECT current_database(), current_user", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "taskrunner|taskrunner"
