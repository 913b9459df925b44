"""Configuration read from environment variables (CLI flags may override fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from taskrunner import signing

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in _TRUE


def _switch(env: dict, name: str) -> bool | None:
    """``env[name]`` as true/false (1/0, yes/no, on/off); None when unset or empty."""
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SystemExit(f"{name} must be true or false, got {raw!r}")


def _number(env: dict, name: str, default, kind: type, what: str):
    """``env[name]`` converted by ``kind`` (int or float); ``default`` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be {what}, got {raw!r}") from exc


def _int(env: dict, name: str, default: int) -> int:
    return _number(env, name, default, int, "an integer")


def _float(env: dict, name: str, default: float) -> float:
    return _number(env, name, default, float, "a number")


def _retention_days(env: dict) -> float | None:
    """``RETENTION_DAYS``: unset or empty is off; else days, above 0 and at most 36500."""
    raw = env.get("RETENTION_DAYS")
    days = _float(env, "RETENTION_DAYS", None)
    if days is not None and not 0 < days <= 36500:  # also refuses nan and inf
        raise SystemExit(f"RETENTION_DAYS must be a number of days in (0, 36500], got {raw!r}")
    return days


def _choice(name: str, raw: str | None, allowed: tuple[str, ...]) -> str:
    """``raw`` (the value of ``name``), lower-cased, if it is one of ``allowed``."""
    value = (raw or "").strip().lower()
    if value not in allowed:
        raise SystemExit(
            f"{name} must be one of {', '.join(a for a in allowed if a)}, got {value!r}"
        )
    return value


@dataclass
class Config:
    """Every setting of the service. See the configuration table in README.md."""

    database_url: str | None = None
    # the workers' LISTEN connection (unset: database_url): direct to PostgreSQL when
    # database_url is a pooler in transaction mode
    listen_database_url: str | None = None
    # "pgbouncer": DATABASE_URL is PgBouncer in transaction mode (no prepared statements)
    database_pooler: str = ""
    port: int = 8085
    host: str = "127.0.0.1"
    host_url: str = ""
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = True
    api_processes: int = 2
    api_threads: int = 4
    # seconds an idle keep-alive connection stays open: longer than the idle timeout of
    # any load balancer or pooled client in front (60 s is common), so they close first
    api_keepalive: int = 75
    worker_processes: int = 2
    worker_concurrency: int = 32
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 5
    webhook_backoff_base: float = 0.5
    webhook_backoff_max: float = 60.0
    webhook_allow_private: bool = False
    webhook_allowlist: list[str] = field(default_factory=list)
    # WEBHOOK_SIGNING_SECRET: sign every webhook with each (see taskrunner.signing)
    webhook_signing_secrets: list[str] = field(default_factory=list)
    poll_interval: float = 1.0
    tick_interval: float = 1.0
    # RETENTION_DAYS: the workers' housekeeping deletes batches whose tasks all ended more
    # than this many days ago (taskrunner.purge_finished); None (unset) keeps everything
    retention_days: float | None = None
    shutdown_grace: float = 10.0
    counter_flush_interval: float = 0.1
    counter_buffer_max: int = 50_000  # tasks in a PUT /task buffer, a few hundred bytes each
    pool_max_size: int = 8
    statement_timeout: float = 30.0
    api_token: str | None = None
    # runs of a task that sets no "retry" (1 = no retry); see README "Task retries"
    task_retry_max_attempts: int = 1
    # DEAD_END_CANCEL: written to taskrunner.settings by `migrate`/`up`; None: leave it
    dead_end_cancel: bool | None = None

    def __post_init__(self) -> None:
        if not self.host_url:
            self.host_url = f"http://127.0.0.1:{self.port}"
        self.host_url = self.host_url.rstrip("/")
        if not 1 <= self.task_retry_max_attempts <= 100:
            raise SystemExit(
                f"TASK_RETRY_MAX_ATTEMPTS must be 1..100, got {self.task_retry_max_attempts}"
            )

    @classmethod
    def from_env(cls, env: dict | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        port = _int(env, "PORT", 8085)
        allowlist = [h.strip() for h in env.get("WEBHOOK_ALLOWLIST", "").split(",") if h.strip()]
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            listen_database_url=env.get("LISTEN_DATABASE_URL") or None,
            database_pooler=_choice(
                "DATABASE_POOLER", env.get("DATABASE_POOLER"), ("", "none", "pgbouncer")
            ),
            port=port,
            host=env.get("HOST", "127.0.0.1"),
            host_url=env.get("HOST_URL", ""),
            log_level=(env.get("LOG_LEVEL") or env.get("RUST_LOG") or "info").lower(),
            log_format=(env.get("LOG_FORMAT") or "text").lower(),
            access_log=_bool(env.get("ACCESS_LOG"), default=True),
            api_processes=_int(env, "API_PROCESSES", 2),
            api_threads=_int(env, "API_THREADS", 4),
            api_keepalive=_int(env, "API_KEEPALIVE", 75),
            worker_processes=_int(env, "WORKER_PROCESSES", 2),
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", 32),
            webhook_timeout=_float(env, "WEBHOOK_TIMEOUT", 10.0),
            webhook_max_attempts=_int(env, "WEBHOOK_MAX_ATTEMPTS", 5),
            webhook_backoff_base=_float(env, "WEBHOOK_BACKOFF_BASE", 0.5),
            webhook_backoff_max=_float(env, "WEBHOOK_BACKOFF_MAX", 60.0),
            webhook_allow_private=_bool(env.get("WEBHOOK_ALLOW_PRIVATE")),
            webhook_allowlist=allowlist,
            webhook_signing_secrets=signing.parse_secrets(env.get("WEBHOOK_SIGNING_SECRET")),
            poll_interval=_float(env, "POLL_INTERVAL", 1.0),
            tick_interval=_float(env, "TICK_INTERVAL", 1.0),
            retention_days=_retention_days(env),
            shutdown_grace=_float(env, "SHUTDOWN_GRACE", 10.0),
            counter_flush_interval=_float(env, "COUNTER_FLUSH_INTERVAL", 0.1),
            counter_buffer_max=_int(env, "COUNTER_BUFFER_MAX", 50_000),
            pool_max_size=_int(env, "POOL_MAX_SIZE", 8),
            statement_timeout=_float(env, "STATEMENT_TIMEOUT", 30.0),
            api_token=env.get("API_TOKEN") or None,
            task_retry_max_attempts=_int(env, "TASK_RETRY_MAX_ATTEMPTS", 1),
            dead_end_cancel=_switch(env, "DEAD_END_CANCEL"),
        )
