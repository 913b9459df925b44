"""gunicorn settings for the API, read from the environment (see ``taskrunner.config``).

Loaded with ``gunicorn -c python:taskrunner.api.gunicorn_conf 'taskrunner.api.app:get_app()'``.
Threads (gthread) serve requests; each process has its own pool and counter buffer, which
``worker_exit`` flushes so a graceful stop loses no PUT /task increments. Set
``ACCESS_LOG=true`` for an access log on stdout.
"""

from __future__ import annotations

import os

from taskrunner.config import Config

_config = Config.from_env()
# LOG_LEVEL / RUST_LOG values gunicorn does not know, mapped to ones it does
_LEVELS = {"trace": "debug", "warn": "warning"}

bind = f"{_config.host}:{_config.port}"
workers = _config.api_processes
worker_class = "gthread"
threads = _config.api_threads
# gunicorn's own default (2 s) closes an idle connection while a load balancer or a pooled
# client still counts on it: their next request meets a reset. Ours outlives theirs.
keepalive = _config.api_keepalive
graceful_timeout = int(_config.shutdown_grace)
accesslog = "-" if os.environ.get("ACCESS_LOG", "").lower() in {"1", "true", "yes"} else None
errorlog = "-"
_level = _config.log_level.split(",", 1)[0]  # RUST_LOG may be "info,module=debug"
loglevel = _LEVELS.get(_level, _level)
# gunicorn >= 24 opens a control socket at one fixed path per user; several API servers on
# one host (tests, bench, `up`) would fight over it, and we do not use it.
control_socket_disable = True
# the longest request line (method + URL) gunicorn accepts: its maximum, so GET /task
# filters (metadata JSON) have room; longer lines get gunicorn's own 414 page (HTML)
limit_request_line = 8190


def child_exit(server, worker) -> None:
    """A worker process ended: drop its live gauges from the multiprocess metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker) -> None:
    """In the exiting worker: write the PUT /task increments it still holds."""
    from taskrunner.api import counters

    counters.close_all()
