"""The embedded default database of ``taskrunner up``: a private PostgreSQL cluster.

The cluster lives in the state directory, ``$TASKRUNNER_STATE_DIR`` or else ``.taskrunner/``
in the current directory (``bin/taskrunner`` runs from the checkout, so there it is
``<repo>/.taskrunner/``): ``pgdata/``, ``port``, ``run/`` for the unix socket,
``postgres.log``. It is run with the machine's own ``initdb`` and ``pg_ctl`` (found by
``taskrunner.pgtools``). It listens on 127.0.0.1 only, on a free port picked at first start
(never 5432, so it does not collide with a system server), and trusts local connections;
its superuser is ``taskrunner``.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to, and runs as,
the unprivileged ``postgres`` user. When that user cannot reach the checkout (a clone in
root's home, or in a ``mktemp -d`` directory, mode 700), the cluster's files (``pgdata/``,
``run/``, ``postgres.log``) live in a directory of its own instead, one per checkout:
``~postgres/taskrunner/<hash of the state dir>/`` (else ``/var/tmp/taskrunner-postgres/...``),
with a ``checkout`` file naming the state dir it belongs to. A cluster found in either
place is reused, so the choice is stable across restarts.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg import sql

from taskrunner.pgtools import PgToolsNotFound, find_pg_bindir
from taskrunner.ports import pick_free_port, port_is_free

DEFAULT_PORT_AVOID = 5432
SERVER_USER_WHEN_ROOT = "postgres"
SUPERUSER = "taskrunner"
DATABASE = "taskrunner"
# A unix socket path must fit in sun_path (108 bytes on Linux); longer ones disable the socket.
_MAX_SOCKET_PATH = 100


class EmbeddedError(RuntimeError):
    """The embedded cluster cannot be set up or started; the message says what to do."""


def state_dir() -> Path:
    """Where ``up`` keeps its local state: ``$TASKRUNNER_STATE_DIR`` or ``./.taskrunner``.

    The current directory, not the package's: an installed copy lives in site-packages,
    which is no place for a database cluster (and may not be writable)."""
    override = os.environ.get("TASKRUNNER_STATE_DIR")
    return Path(override or ".taskrunner").resolve()


def _server_user_dirs(user: pwd.struct_passwd) -> list[Path]:
    """Where a cluster of ``user`` may live when it cannot reach the checkout, in order."""
    return [Path(user.pw_dir) / "taskrunner", Path("/var/tmp") / f"taskrunner-{user.pw_name}"]


class EmbeddedPostgres:
    """A private cluster for the state dir ``base_dir`` (default: ``state_dir()``); its
    files are in ``cluster_dir``: ``base_dir`` itself unless the server's user cannot
    reach it (see the module docstring)."""

    def __init__(self, base_dir: Path | str | None = None) -> None:
        self.base_dir = Path(base_dir).resolve() if base_dir else state_dir()
        self.port_file = self.base_dir / "port"
        self.started_here = False
        self._bindir: Path | None = None
        self._as_user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._as_user = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
            except KeyError:
                self._as_user = None
        self.cluster_dir = self._choose_cluster_dir()
        self.data_dir = self.cluster_dir / "pgdata"
        self.socket_dir = self.cluster_dir / "run"
        self.log_file = self.cluster_dir / "postgres.log"

    # -- public ---------------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def is_running(self) -> bool:
        """True when the cluster's postmaster is alive (``pg_ctl status``)."""
        if not (self.data_dir / "PG_VERSION").is_file():
            return False
        result = self._pg(["pg_ctl", "status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def start(self) -> str:
        """Initialise the cluster if needed, start it unless it already runs, make sure the
        ``taskrunner`` database exists, and return its URL."""
        self._check_server_user()
        if self.is_running():
            running_port = self._running_port()
            if running_port:
                self.port_file.write_text(f"{running_port}\n")
        else:
            if not (self.data_dir / "PG_VERSION").is_file():
                self._initdb()
            # Set first: a start interrupted half-way must still be stopped by `up`.
            self.started_here = True
            self._start_server()
        self._ensure_database()
        return self.url()

    def stop(self) -> None:
        """Stop the cluster (``pg_ctl stop -m fast``); the data stays for the next start."""
        if not self.is_running():
            return
        self._pg(["pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60"])
        self.started_here = False

    # -- internals ------------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            try:
                self._bindir = find_pg_bindir()
            except PgToolsNotFound as exc:
                raise EmbeddedError(str(exc)) from exc
        return self._bindir

    def _choose_cluster_dir(self) -> Path:
        """``base_dir``, unless we run the server as another user who cannot reach it:
        then its own directory for this checkout (an existing cluster wins, so a restart
        finds its data). ``_check_server_user`` says so when none of them can work."""
        if self._as_user is None or (self.base_dir / "pgdata" / "PG_VERSION").is_file():
            return self.base_dir
        key = hashlib.sha256(str(self.base_dir).encode()).hexdigest()[:16]
        elsewhere = [d / key for d in _server_user_dirs(self._as_user)]
        for candidate in elsewhere:
            if (candidate / "pgdata" / "PG_VERSION").is_file():
                return candidate
        for candidate in [self.base_dir, *elsewhere]:
            if self._reachable(candidate):
                return candidate
        return self.base_dir

    def _reachable(self, path: Path) -> bool:
        """Whether the server's user can enter ``path``, or, while it does not exist, its
        nearest existing parent (we create the rest, reachable, with a 022 umask)."""
        while not path.exists() and path != path.parent:
            path = path.parent
        return self._pg(["test", "-x", str(path)], check=False, tool=False).returncode == 0

    def _check_server_user(self) -> None:
        if os.geteuid() != 0:
            return
        if self._as_user is None:
            raise EmbeddedError(
                "PostgreSQL refuses to run as root and there is no "
                f"'{SERVER_USER_WHEN_ROOT}' user to run the embedded cluster as: create one "
                f"(useradd --system {SERVER_USER_WHEN_ROOT}), run as a normal user, or set "
                "DATABASE_URL to use an existing server"
            )
        if not self._reachable(self.cluster_dir):
            own_dirs = ", ".join(str(d) for d in _server_user_dirs(self._as_user))
            raise EmbeddedError(
                f"PostgreSQL refuses to run as root, so the embedded cluster runs as user "
                f"'{SERVER_USER_WHEN_ROOT}', which cannot reach {self.base_dir} nor a "
                f"directory of its own ({own_dirs}): give it search permission on every "
                "parent directory (chmod o+x), move the checkout (or set "
                "TASKRUNNER_STATE_DIR) somewhere it can reach, or set DATABASE_URL to use an "
                "existing server"
            )

    def _pg(
        self, args: list[str], *, check: bool = True, tool: bool = True, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool (from ``bindir``), as the server user when we are root."""
        argv = [str(self.bindir / args[0]), *args[1:]] if tool else args
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        extra: dict = {}
        if self._as_user is not None and os.geteuid() == 0:
            extra = {
                "user": self._as_user.pw_uid,
                "group": self._as_user.pw_gid,
                "extra_groups": [],
            }
            env["HOME"] = self._as_user.pw_dir
            env["USER"] = env["LOGNAME"] = self._as_user.pw_name
        result = subprocess.run(
            argv,
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
            **extra,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise EmbeddedError(
                f"{' '.join(argv)} failed (exit code {result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()}\n(server log: {self.log_file})"
            )
        return result

    def _own(self, path: Path) -> None:
        if self._as_user is not None and os.geteuid() == 0:
            os.chown(path, self._as_user.pw_uid, self._as_user.pw_gid)

    def _prepare_dirs(self) -> None:
        """Create the directories the server writes to, owned by the server's user."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.cluster_dir != self.base_dir:
            for path in (self.cluster_dir.parent, self.cluster_dir):
                path.mkdir(mode=0o755, exist_ok=True)  # 0o755 whatever our umask
            self._own(self.cluster_dir)
            (self.cluster_dir / "checkout").write_text(f"{self.base_dir}\n")
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._own(self.data_dir)
        self.socket_dir.mkdir(mode=0o755, exist_ok=True)
        self._own(self.socket_dir)
        self.log_file.touch()
        self._own(self.log_file)

    def _initdb(self) -> None:
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise EmbeddedError(
                f"{self.data_dir} is not empty but holds no cluster: remove it to start afresh"
            )
        self._prepare_dirs()
        self._pg(
            [
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ]
        )
        self.port_file.write_text(f"{pick_free_port(avoid=DEFAULT_PORT_AVOID)}\n")

    def _server_options(self, port: int) -> str:
        sock = str(self.socket_dir)
        sockets = sock if len(sock) + len("/.s.PGSQL.65535") <= _MAX_SOCKET_PATH else ""
        # pg_ctl hands -o to /bin/sh, hence the shell quoting.
        return " ".join(
            [
                f"-p {port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={shlex.quote(sockets)}",
            ]
        )

    def _start_server(self) -> None:
        self._prepare_dirs()
        port = self.port
        if port is None or port == DEFAULT_PORT_AVOID or not port_is_free(port):
            port = pick_free_port(avoid=DEFAULT_PORT_AVOID)
            self.port_file.write_text(f"{port}\n")
        self._pg(
            [
                "pg_ctl",
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                self._server_options(port),
                "-w",
                "-t",
                "60",
            ],
            # Its own session: a Ctrl-C meant for `up` must not reach the postmaster, which
            # `up` stops in order once its API and workers are down.
            start_new_session=True,
        )

    def _running_port(self) -> int | None:
        """The port in ``postmaster.pid`` (its fourth line) of the running cluster."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    def _ensure_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
