"""The ``taskrunner`` command: ``up``, ``api``, ``worker``, ``migrate`` and ``psql``; the
``task``, ``batch`` and ``delivery`` groups (API clients) live in ``cli_client.py``.

Settings come from the environment (``Config.from_env``); command-line flags override them.
``api`` and ``worker`` run one part of the service; ``up`` runs all of it on one machine
(migrations, the API under gunicorn, worker processes) and supervises it until Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import shutil
import socket
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from taskrunner import logs
from taskrunner.cli_client import COMMANDS as CLIENT_COMMANDS
from taskrunner.config import Config
from taskrunner.ports import port_is_free
from taskrunner.supervisor import Supervisor

GUNICORN_CONFIG = "python:taskrunner.api.gunicorn_conf"
WSGI_APP = "taskrunner.api.app:get_app()"
HEALTH_TIMEOUT = 60.0

log = logging.getLogger("taskrunner.cli")


class CliError(Exception):
    """A problem to report in one line and exit 1 with."""


# -- configuration ------------------------------------------------------------------------


def _override(config: Config, **fields) -> Config:
    """``config`` with the given (non-None) fields replaced, keeping derived defaults right."""
    changes = {k: v for k, v in fields.items() if v is not None}
    if not changes:
        return config
    if "port" in changes and not os.environ.get("HOST_URL"):
        changes["host_url"] = ""  # recomputed from the new port by Config.__post_init__
    return dataclasses.replace(config, **changes)


def _config(args: argparse.Namespace, **fields) -> Config:
    return _override(
        Config.from_env(),
        database_url=getattr(args, "database_url", None),
        log_level=getattr(args, "log_level", None),
        **fields,
    )


def _require_database(config: Config) -> str:
    if not config.database_url:
        raise CliError(
            "DATABASE_URL is not set: export it or pass --database-url "
            "(`taskrunner up` runs an embedded PostgreSQL when it is unset)"
        )
    return config.database_url


def _child_env(config: Config, **extra: str) -> dict[str, str]:
    """The environment of a child process: ours plus the settings chosen here."""
    env = dict(os.environ)
    env.update(
        {
            "PORT": str(config.port),
            "HOST_URL": config.host_url,
            "LOG_LEVEL": config.log_level,
            "API_PROCESSES": str(config.api_processes),
            "WORKER_PROCESSES": str(config.worker_processes),
            "WORKER_CONCURRENCY": str(config.worker_concurrency),
        }
    )
    if config.database_url:
        env["DATABASE_URL"] = config.database_url
    env.update(extra)
    return env


def _require_module(name: str, what: str) -> None:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise CliError(f"{what} is not available: module {name} is missing")


def _gunicorn_argv() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, WSGI_APP]


def _self_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskrunner.cli", *args]


# -- subcommands --------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    _migrate(_require_database(config), rollback=args.rollback, dump=args.dump)
    if not args.rollback:
        _apply_settings(config)
    return 0


def _apply_settings(config: Config) -> None:
    """Write the settings that SQL reads (taskrunner.settings) from the environment; an
    unset variable leaves the database's value alone."""
    if config.dead_end_cancel is None:
        return
    from taskrunner import db

    with db.connect(config.database_url) as conn:
        conn.execute(db.QUERIES["set_dead_end_cancel"], {"on": config.dead_end_cancel})
    state = "on" if config.dead_end_cancel else "off"
    print(f"taskrunner: dead-end cancellation {state} (DEAD_END_CANCEL)", flush=True)


def _migrate(url: str, *, rollback: bool = False, dump: bool = False) -> None:
    """Migrate (or roll back) and say what changed, naming the version the database is at."""
    from taskrunner import migrate

    before = migrate.applied_versions(url)
    try:
        if rollback:
            migrate.rollback(url, dump_schema=dump)
        else:
            migrate.migrate(url, dump_schema=dump)
    except migrate.MigrationError as exc:
        raise CliError(str(exc)) from exc
    logs.say(f"taskrunner: {migrate.summary(before, migrate.applied_versions(url))}")


def cmd_api(args: argparse.Namespace) -> int:
    config = _config(args, port=args.port, api_processes=args.processes)
    _require_database(config)
    _require_module("taskrunner.api.gunicorn_conf", "the API")
    # gunicorn's config module reads the settings from the environment.
    os.execve(sys.executable, _gunicorn_argv(), _child_env(config))
    return 1  # not reached


def cmd_worker(args: argparse.Namespace) -> int:
    config = _config(args, worker_processes=args.processes, worker_concurrency=args.concurrency)
    _require_database(config)
    if config.worker_processes < 1:
        raise CliError("--processes must be at least 1")
    logs.configure(config)
    if config.worker_processes == 1:
        _require_module("taskrunner.worker.main", "the worker")
        from taskrunner.worker.main import run_worker

        logs.log_start(log, "worker", config, pid=os.getpid())
        result = run_worker(config)
        return result if isinstance(result, int) else 0

    supervisor = Supervisor(grace=config.shutdown_grace + 5)
    env = _child_env(config)
    logs.log_start(log, f"supervisor of {config.worker_processes} worker processes", config)

    return supervisor.run(
        lambda: _spawn_workers(supervisor, config.worker_processes, env), errors=(CliError,)
    )


def _spawn_workers(supervisor: Supervisor, count: int, env: dict[str, str]) -> None:
    """Start ``count`` worker processes, each logging the id it will record on its claims
    (``hostname:pid``, as ``worker.default_worker_id`` makes it: the ``worker`` field)."""
    for i in range(count):
        proc = supervisor.spawn(f"worker {i + 1}", _self_argv("worker", "--processes", "1"), env)
        worker_id = f"{socket.gethostname()}:{proc.pid}"
        log.info("worker %d is %s", i + 1, worker_id, extra={"worker": worker_id})


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def cmd_up(args: argparse.Namespace) -> int:
    from taskrunner import embedded, metrics

    config = _config(
        args,
        port=args.port,
        api_processes=args.api_processes,
        worker_processes=args.worker_processes,
        worker_concurrency=args.concurrency,
    )
    logs.configure(config)
    _require_module("taskrunner.api.gunicorn_conf", "the API")
    _require_module("taskrunner.worker.main", "the worker")
    if not port_is_free(config.port):
        raise CliError(f"port {config.port} is already in use: set PORT or pass --port")

    state = embedded.state_dir()
    cluster: embedded.EmbeddedPostgres | None = None
    supervisor = Supervisor(grace=config.shutdown_grace + 5)
    metrics_dir: Path | None = None

    def start() -> None:
        nonlocal cluster, config, metrics_dir
        logs.log_start(log, "up", config, state_dir=state)
        if not config.database_url:
            cluster = embedded.EmbeddedPostgres(state)
            try:
                url = cluster.start()
            except embedded.EmbeddedError as exc:
                raise CliError(str(exc)) from exc
            how = "started" if cluster.started_here else "already running"
            logs.say(f"taskrunner: embedded PostgreSQL {how} in {cluster.data_dir}")
            if cluster.cluster_dir != cluster.base_dir:
                logs.say(
                    f"taskrunner: (user {embedded.SERVER_USER_WHEN_ROOT} cannot enter "
                    f"{cluster.base_dir}, so its cluster for this checkout lives there)"
                )
            config = dataclasses.replace(config, database_url=url)
        _migrate(config.database_url)
        _apply_settings(config)

        extra = {}
        if not os.environ.get("WEBHOOK_ALLOW_PRIVATE"):
            extra["WEBHOOK_ALLOW_PRIVATE"] = "true"
            logs.say(
                "taskrunner: WEBHOOK_ALLOW_PRIVATE=true (the `up` default, so webhooks may "
                "call localhost; set WEBHOOK_ALLOW_PRIVATE=false to forbid private addresses)"
            )
        # Prometheus' multiprocess mode: this instance's API and worker processes share a
        # fresh directory of its own (another `up` in this checkout has another one).
        metrics_dir = metrics.instance_dir(state / "metrics")
        extra["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env = _child_env(config, **extra)

        supervisor.spawn("the API (gunicorn)", _gunicorn_argv(), env)
        _spawn_workers(supervisor, config.worker_processes, env)

        deadline = time.monotonic() + HEALTH_TIMEOUT

        def ready() -> bool:
            if time.monotonic() > deadline:
                raise CliError(f"the API did not answer /health within {HEALTH_TIMEOUT:.0f}s")
            return _healthy(config.port)

        supervisor.watch(until=ready)
        logs.say(f"taskrunner is up: http://127.0.0.1:{config.port}")
        logs.say(f"DATABASE_URL={logs.redact_url(config.database_url)}")
        logs.say(f"web UI: http://127.0.0.1:{config.port}/ui")

    try:
        return supervisor.run(start, errors=(CliError,))
    finally:
        if metrics_dir is not None:  # every process writing to it has stopped
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if cluster is not None and cluster.started_here:
            logs.say("taskrunner: stopping the embedded PostgreSQL", stream=sys.stderr)
            cluster.stop()


def _psql_binary() -> str:
    from taskrunner import embedded

    found = shutil.which("psql")
    if found:
        return found
    try:
        beside = embedded.find_pg_bindir() / "psql"
    except embedded.EmbeddedError:
        beside = None
    if beside is None or not beside.is_file():
        raise CliError(
            "psql not found: install the PostgreSQL client (apt-get install postgresql-client)"
        )
    return str(beside)


def _database_for_psql(config: Config) -> str:
    """DATABASE_URL, else the embedded cluster's URL (it must be running)."""
    from taskrunner import embedded

    if config.database_url:
        return config.database_url
    cluster = embedded.EmbeddedPostgres()
    if not cluster.is_running() or cluster.port is None:
        raise CliError(
            f"DATABASE_URL is not set and the embedded PostgreSQL in {cluster.data_dir} is "
            "not running: start `taskrunner up` first, or set DATABASE_URL"
        )
    return cluster.url()


def cmd_psql(args: argparse.Namespace) -> int:
    url = _database_for_psql(_config(args))
    psql = _psql_binary()
    extra = args.psql_args[1:] if args.psql_args[:1] == ["--"] else args.psql_args
    # psql names itself in application_name: the task history records "psql (role ...)"
    os.execvp(psql, [psql, url, *extra])
    return 1  # not reached


# -- argument parsing ---------------------------------------------------------------------

DESCRIPTION = """\
Run DAGs of webhook tasks on PostgreSQL.

Settings come from environment variables (DATABASE_URL, PORT, HOST_URL, LOG_LEVEL,
API_PROCESSES, WORKER_PROCESSES, WORKER_CONCURRENCY, WEBHOOK_TIMEOUT, WEBHOOK_ALLOW_PRIVATE,
...); command-line flags override them.
"""

EPILOG = """\
examples:
  taskrunner up                          everything on this machine (embedded PostgreSQL
                                         unless DATABASE_URL is set)
  DATABASE_URL=postgresql://... taskrunner migrate
  taskrunner api --port 8085 --processes 4
  taskrunner worker --processes 4 --concurrency 64
  taskrunner psql -c 'SELECT * FROM taskrunner.running_tasks'
"""


_DEFAULTS = Config()  # the defaults every help text shows

UP_EPILOG = f"""\
defaults (environment variable: value when unset; README.md lists every setting):
  DATABASE_URL            an embedded cluster in $TASKRUNNER_STATE_DIR or ./.taskrunner
  HOST / PORT             {_DEFAULTS.host} / {_DEFAULTS.port}
  HOST_URL                http://127.0.0.1:$PORT (the base of each webhook's handle)
  LOG_LEVEL               {_DEFAULTS.log_level}
  API_THREADS             {_DEFAULTS.api_threads} per API process
  WEBHOOK_TIMEOUT         {_DEFAULTS.webhook_timeout:g} s
  WEBHOOK_MAX_ATTEMPTS    {_DEFAULTS.webhook_max_attempts}
  TASK_RETRY_MAX_ATTEMPTS {_DEFAULTS.task_retry_max_attempts} (runs of a task that sets no retry)
  WEBHOOK_ALLOW_PRIVATE   true under `up` (false for `worker`)
  API_TOKEN               unset: no authentication
  OTEL_EXPORTER_OTLP_ENDPOINT
                          unset: no OpenTelemetry spans (they need the otel extra)
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url", metavar="URL", help="PostgreSQL URL (default: $DATABASE_URL)"
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help=f"log level (default: $LOG_LEVEL or {_DEFAULTS.log_level})",
    )
    return common


def _count(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs) -> None:
    """A ``--flag N`` option taking a positive integer."""
    parser.add_argument(flag, type=_positive_int, metavar="N", help=help, **kwargs)


def _add_up_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=_port, help=f"API port (default: $PORT or {_DEFAULTS.port})")
    d = _DEFAULTS
    _count(
        p,
        "--api-processes",
        f"gunicorn worker processes (default: $API_PROCESSES or {d.api_processes})",
    )
    _count(
        p,
        "--worker-processes",
        f"worker processes (default: $WORKER_PROCESSES or {d.worker_processes})",
    )
    _count(
        p,
        "--concurrency",
        f"webhooks in flight per worker (default: $WORKER_CONCURRENCY or {d.worker_concurrency})",
    )


def _add_api_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=_port, help="port to listen on (default: $PORT or 8085)")
    _count(p, "--processes", "gunicorn worker processes (default: $API_PROCESSES or 2)")


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    _count(p, "--processes", "worker processes to run and supervise (default: 1)", default=1)
    _count(
        p, "--concurrency", "webhooks in flight per process (default: $WORKER_CONCURRENCY or 32)"
    )


def _add_migrate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rollback", action="store_true", help="roll back the most recent migration instead"
    )
    p.add_argument(
        "--dump",
        action="store_true",
        help="also write the resulting schema to sql/schema.sql (in a checkout; needs pg_dump)",
    )


def _add_psql_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="arguments passed to psql")


PSQL_EPILOG = """\
examples:
  taskrunner psql
  taskrunner psql -c 'SELECT * FROM taskrunner.blocked_tasks'
  taskrunner psql -- -v ON_ERROR_STOP=1 -f fix.sql"""

# (name, function, its options, one-line help, description, epilog) of each subcommand,
# in --help order
SUBCOMMANDS = [
    (
        "up",
        cmd_up,
        _add_up_options,
        "run migrations, the API and workers together (for development / one machine)",
        "Run everything on this machine: apply migrations, start the API (gunicorn) and "
        "WORKER_PROCESSES worker processes, wait until GET /health answers and print the "
        "URL. Without DATABASE_URL a private PostgreSQL cluster is started in "
        "./.taskrunner/ of the current directory, or in TASKRUNNER_STATE_DIR (kept between "
        "runs). Webhooks to private addresses are allowed "
        "unless WEBHOOK_ALLOW_PRIVATE is set. Ctrl-C or SIGTERM stops everything.",
        UP_EPILOG,
    ),
    (
        "api",
        cmd_api,
        _add_api_options,
        "run the HTTP API under gunicorn",
        "Run the HTTP API: gunicorn with the configuration in taskrunner.api.gunicorn_conf "
        "serving taskrunner.api.app:get_app(). Needs DATABASE_URL.",
        None,
    ),
    (
        "worker",
        cmd_worker,
        _add_worker_options,
        "run worker processes that claim tasks and call webhooks",
        "Run worker processes: each listens for notifications, claims ready tasks and "
        "calls their webhooks. Any number of workers may run against one database, on "
        "any number of hosts. Needs DATABASE_URL.",
        None,
    ),
    (
        "migrate",
        cmd_migrate,
        _add_migrate_options,
        "apply database migrations (dbmate)",
        "Apply every pending migration shipped with the package (sql/migrations in the "
        "checkout) with dbmate, creating the database if it does not exist. Needs "
        "DATABASE_URL.",
        None,
    ),
    (
        "psql",
        cmd_psql,
        _add_psql_options,
        "open psql on the configured database (the embedded one under `up`)",
        "Run psql on DATABASE_URL, or, when it is unset, on the embedded cluster that "
        "`taskrunner up` runs (it must be running). Arguments after the options go to "
        "psql as they are. README.md's 'For DBAs' section is a quick start.",
        PSQL_EPILOG,
    ),
    *CLIENT_COMMANDS,  # task, batch, delivery: the API through taskrunner.client
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskrunner",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    for name, func, add_options, summary, description, epilog in SUBCOMMANDS:
        p = sub.add_parser(
            name,
            parents=[common],
            help=summary,
            # wrapped here so the epilog's example lines keep their own line breaks
            description=textwrap.fill(description, width=80),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_options(p)
        p.set_defaults(func=func)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``psql`` passes whatever it does not know on to psql, in order."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not cmd_psql:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.func is cmd_psql:
        # unknown options come before the first positional, which starts the remainder
        args.psql_args = unknown + args.psql_args
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        code = args.func(args)
    except CliError as exc:
        logs.say(f"taskrunner: {exc}", level=logging.ERROR, stream=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
