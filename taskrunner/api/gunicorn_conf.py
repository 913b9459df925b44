"""gunicorn settings for the API, read from the environment (see ``taskrunner.config``).

Loaded with ``gunicorn -c python:taskrunner.api.gunicorn_conf 'taskrunner.api.app:get_app()'``.
Threads (gthread) serve requests; each process has its own pool and counter buffer, which
``worker_exit`` flushes so a graceful stop loses no PUT /task increments. Logging is
``taskrunner.logs``' (gunicorn's own lines included); the request log is the app's
(``taskrunner.api.requestlog``), so gunicorn's access log stays off.
"""

from __future__ import annotations

import logging
import os

from taskrunner import logs
from taskrunner.config import Config

_config = Config.from_env()

bind = f"{_config.host}:{_config.port}"
workers = _config.api_processes
worker_class = "gthread"
threads = _config.api_threads
# gunicorn's own default (2 s) closes an idle connection while a load balancer or a pooled
# client still counts on it: their next request meets a reset. Ours outlives theirs.
keepalive = _config.api_keepalive
graceful_timeout = int(_config.shutdown_grace)
accesslog = None
errorlog = "-"
loglevel = logs.level_name(_config).lower()
logconfig_dict = logs.dict_config(_config)
# gunicorn >= 24 opens a control socket at one fixed path per user; several API servers on
# one host (tests, bench, `up`) would fight over it, and we do not use it.
control_socket_disable = True
# the longest request line (method + URL) gunicorn accepts: its maximum, so GET /task
# filters (metadata JSON) have room; longer lines get gunicorn's own 414 page (HTML)
limit_request_line = 8190


def on_starting(server) -> None:
    """In the master, before it binds: the API's start-up line."""
    logs.log_start(logging.getLogger("taskrunner.api"), "API", _config, bind=bind)


def child_exit(server, worker) -> None:
    """A worker process ended: drop its live gauges from the multiprocess metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker) -> None:
    """In the exiting worker: write the PUT /task increments it still holds, export the
    spans it still buffers."""
    from taskrunner import tracing
    from taskrunner.api import counters

    counters.close_all()
    tracing.shutdown()
