"""The Falcon application: ``create_app(config, pool)`` wires it; gunicorn loads ``get_app()``."""

from __future__ import annotations

import falcon
import psycopg_pool

from taskrunner import db, tracing
from taskrunner.api import errors, openapi, ui
from taskrunner.api.auth import BearerAuth
from taskrunner.api.batches import (
    BatchCollection,
    BatchDag,
    BatchItem,
    BatchRules,
    Problems,
    TaskHistory,
)
from taskrunner.api.counters import CounterBuffer
from taskrunner.api.requestlog import RequestLog
from taskrunner.api.requestmetrics import RequestMetrics
from taskrunner.api.resources import (
    DeliveryRetry,
    Health,
    Metrics,
    OpenApi,
    Ready,
    Rerun,
    TaskCollection,
    TaskItem,
    TaskMove,
)
from taskrunner.api.spans import RequestSpans
from taskrunner.api.store import Store
from taskrunner.config import Config
from taskrunner.migrate import newest_version
from taskrunner.netguard import Policy


def create_app(
    config: Config, pool: psycopg_pool.ConnectionPool, counters: CounterBuffer | None = None
) -> falcon.App:
    """The API on ``pool``; ``counters`` is the PUT /task buffer (one per process)."""
    store = Store(pool)
    counters = counters or CounterBuffer(
        pool, config.counter_flush_interval, config.counter_buffer_max
    )
    middleware: list = [RequestMetrics()]
    if tracing.enabled():
        middleware.append(RequestSpans())
    if config.access_log:
        middleware.append(RequestLog())
    if config.api_token:
        middleware.append(BearerAuth(config.api_token))
    app = falcon.App(media_type=falcon.MEDIA_JSON, middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    app.add_route(
        "/task",
        TaskCollection(store, counters, Policy.from_config(config), config.task_retry_max_attempts),
    )
    app.add_route("/task/{id}", TaskItem(store, counters))
    app.add_route("/task/pause/{id}", TaskMove(store, "pause_task"))
    app.add_route("/task/resume/{id}", TaskMove(store, "resume_task"))
    app.add_route("/task/{id}/rerun", Rerun(store, "task"))
    app.add_route("/delivery/{id}/retry", DeliveryRetry(store))
    app.add_route("/task/{id}/history", TaskHistory(store))
    app.add_route("/batches", BatchCollection(store))
    app.add_route("/batch/{id}", BatchItem(store))
    app.add_route("/batch/{id}/rules", BatchRules(store))
    app.add_route("/batch/{id}/rerun", Rerun(store, "batch"))
    app.add_route("/dag/{id}", BatchDag(store))
    app.add_route("/problems", Problems(store))
    app.add_route("/metrics", Metrics(store))
    app.add_route("/health", Health())
    app.add_route("/ready", Ready(store, newest_version()))
    app.add_route("/openapi.json", OpenApi(openapi.document()))
    ui.install(app)
    return app


def get_app() -> falcon.App:
    """The app gunicorn serves: settings from the environment, a pool that opens in the
    background (the API starts, and answers 503, while the database is down)."""
    config = Config.from_env()
    if not config.database_url:
        raise SystemExit("DATABASE_URL is not set")
    tracing.configure("taskrunner-api")
    pool = db.create_pool(
        config.database_url,
        max_size=config.pool_max_size,
        statement_timeout=config.statement_timeout,
        pooler=config.database_pooler,
    )
    pool.open(wait=False)
    return create_app(config, pool)
