"""Where this machine's PostgreSQL server programs are (``initdb``, ``pg_ctl``, ``pg_dump``).

Used by the embedded cluster of ``taskrunner up`` and by ``taskrunner migrate --dump``.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path


class PgToolsNotFound(RuntimeError):
    """No PostgreSQL server programs on this machine; the message says what to do."""


def _version_key(bindir: str) -> tuple[int, ...]:
    name = Path(bindir).parent.name
    return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)


def find_pg_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH, ``pg_config --bindir``, or the
    newest ``/usr/lib/postgresql/*/bin``."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if Path(d, "initdb").is_file()]
    if candidates:
        return Path(max(candidates, key=_version_key))
    raise PgToolsNotFound(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH, via pg_config or "
        "under /usr/lib/postgresql/*/bin: install PostgreSQL (e.g. apt-get install "
        "postgresql) or set DATABASE_URL to use an existing server"
    )
