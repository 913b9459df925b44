"""A real PgBouncer (Debian's ``pgbouncer``) in transaction pooling mode, in front of the
test server, for tests that run the service through it.

It refuses to run as root, so as root it runs as ``postgres``; its config, auth file, log
and pid file live in a temp dir of its own. Clients connect to 127.0.0.1:<port> as the
test server's user (listed in the auth file, ``auth_type = trust``); PgBouncer connects
on to the test server, which trusts 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from procs import free_port, wait_for

DEBIAN_PATH = "/usr/sbin/pgbouncer"


def binary() -> str | None:
    return shutil.which("pgbouncer") or (DEBIAN_PATH if os.path.exists(DEBIAN_PATH) else None)


def _config(dir: Path, port: int, server_host: str, server_port: int) -> str:
    return f"""\
[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
"""


@contextmanager
def running(user: str, server_host: str, server_port: int) -> Iterator[int]:
    """Run PgBouncer for clients logging in as ``user``; yields its port."""
    exe = binary()
    assert exe, "pgbouncer is not installed (apt-get install pgbouncer)"
    dir = Path(tempfile.mkdtemp(prefix="tr-pgbouncer-"))
    port = free_port()
    (dir / "userlist.txt").write_text(f'"{user}" ""\n')
    (dir / "pgbouncer.ini").write_text(_config(dir, port, server_host, server_port))
    as_user: dict = {}
    if os.geteuid() == 0:  # "PgBouncer should not run as root"
        pg = pwd.getpwnam("postgres")
        as_user = {"user": pg.pw_uid, "group": pg.pw_gid, "extra_groups": []}
        for path in [dir, *dir.iterdir()]:
            os.chown(path, pg.pw_uid, pg.pw_gid)
    proc = subprocess.Popen([exe, str(dir / "pgbouncer.ini")], cwd=dir, **as_user)
    try:
        url = f"postgresql://{user}@127.0.0.1:{port}/postgres"
        wait_for(lambda: _answers(url) or proc.poll() is not None, 30, message="pgbouncer")
        assert proc.poll() is None, (dir / "pgbouncer.log").read_text()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False
