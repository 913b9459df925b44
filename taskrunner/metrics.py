"""Prometheus metrics shared by the API and the workers.

The SQL triggers count every transition a transaction makes (cascades included); callers
read that tally with the ``take_stats`` query at the end of the transaction and hand it to
``record_stats``. With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn, several workers on one
host), values go to files in that directory and ``render`` aggregates all processes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from taskrunner.vocabulary import TERMINAL_STATUSES

log = logging.getLogger(__name__)

TASKS_CREATED = Counter("tasks_created_total", "Tasks created")
# Status label values (outcome, from_status, to_status, parent_outcome) are the SQL status
# names, lowercase, as the seed's are: outcome="success"; the JSON API capitalises them.
TASKS_COMPLETED = Counter(
    "tasks_completed_total", "Tasks that reached a terminal status", ["outcome", "kind"]
)
TRANSITIONS = Counter(
    "task_status_transitions_total", "Task status transitions", ["from_status", "to_status"]
)
RETRIES = Counter(
    "task_retries_total",
    "Failed runs sent back to Pending for another run (task retries)",
    ["kind"],
)
BLOCKED = Counter(
    "tasks_blocked_by_concurrency_total", "Claims of tasks held back by a concurrency rule"
)
PROPAGATIONS = Counter(
    "dependency_propagations_total",
    "Parent endings propagated to dependent tasks",
    ["parent_outcome"],
)
COUNTER_DROPS = Counter(
    "counter_increments_dropped_total",
    "PUT /task increments accepted (202) but never written, per task, by reason: "
    "task_deleted (the task was deleted before the flush), shutdown_write_failed (the "
    "database stayed unreachable while the API process stopped)",
    ["reason"],
)
PURGED = Counter(
    "tasks_purged_total",
    "Tasks deleted by retention (RETENTION_DAYS: taskrunner.purge_finished) with their "
    "dependencies, webhooks, attempts and history",
)
WORKER_LOOP = Histogram("worker_loop_duration_seconds", "Duration of one worker loop iteration")
HTTP_REQUESTS = Counter(
    "http_requests_total",
    "API requests answered, by method, route template (unmatched: no route) and status code",
    ["method", "route", "code"],
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time the API took to answer a request, by method and route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WEBHOOK_ATTEMPTS = Counter(
    "webhook_attempts_total",
    "Webhook attempts the workers recorded, by event (start, success, failure, cancel) and "
    "the delivery's state after it: delivered, queued (to be retried), failed (gave up), "
    "canceled (the answer no longer mattered), stale (the lease had expired), unrecorded "
    "(the database stayed out of reach until the lease ran out)",
    ["event", "result"],
)
WEBHOOK_DURATION = Histogram(
    "webhook_duration_seconds",
    "Duration of one webhook call (until its response or error), by event",
    ["event"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
# every metric above: /metrics lists each of them from the start, used or not
DECLARED = (
    TASKS_CREATED,
    TASKS_COMPLETED,
    TRANSITIONS,
    RETRIES,
    BLOCKED,
    PROPAGATIONS,
    WORKER_LOOP,
    HTTP_REQUESTS,
    HTTP_DURATION,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_DURATION,
)


def record_stats(text: str | None) -> None:
    """Count the ``take_stats`` tally of one transaction (``;``-separated entries)."""
    for entry in (text or "").split(";"):
        if entry and not _record_entry(entry.split(">")):
            log.debug("ignoring malformed stats entry %r", entry)


def _record_entry(parts: list[str]) -> bool:
    """Count one entry; False when it does not parse (e.g. a kind containing ``;``)."""
    try:
        n = int(parts[-1])
    except ValueError:
        return False
    head = parts[0]
    if head == "created" and len(parts) == 2:
        TASKS_CREATED.inc(n)
    elif head == "retry" and len(parts) >= 3:
        RETRIES.labels(kind=">".join(parts[1:-1])).inc(n)
    elif head == "blocked" and len(parts) == 2:
        BLOCKED.inc(n)
    elif head == "propagation" and len(parts) == 3:
        PROPAGATIONS.labels(parent_outcome=parts[1]).inc(n)
    elif len(parts) >= 4:
        # from>to>kind>n; a kind may itself contain ">"
        from_status, to_status, kind = parts[0], parts[1], ">".join(parts[2:-1])
        TRANSITIONS.labels(from_status, to_status).inc(n)
        if to_status in TERMINAL_STATUSES:
            TASKS_COMPLETED.labels(outcome=to_status, kind=kind).inc(n)
    else:
        return False
    return True


def count_dropped_increments(reason: str, tasks: int) -> None:
    """Count ``tasks`` tasks' buffered PUT increments that were dropped, and why."""
    COUNTER_DROPS.labels(reason=reason).inc(tasks)


def count_purged(tasks: int) -> None:
    """Count tasks the workers' retention housekeeping deleted."""
    PURGED.inc(tasks)


def observe_worker_loop(seconds: float) -> None:
    """Record the duration of one worker loop iteration."""
    WORKER_LOOP.observe(seconds)


def observe_request(method: str, route: str, code: int, seconds: float) -> None:
    """Count one answered API request and its duration."""
    HTTP_REQUESTS.labels(method, route, str(code)).inc()
    HTTP_DURATION.labels(method, route).observe(seconds)


def observe_webhook(event: str, result: str | None, seconds: float) -> None:
    """Count one webhook attempt (``result``: the delivery's status after recording it,
    None when it could not be recorded) and the call's duration."""
    WEBHOOK_ATTEMPTS.labels(event, result or "unrecorded").inc()
    WEBHOOK_DURATION.labels(event).observe(seconds)


# the database gauges: (name, help, column of the ``metrics_snapshot`` row)
DATABASE_GAUGES = (
    (
        "tasks_ready_oldest_seconds",
        "How long the oldest pending task that no concurrency rule holds back has waited "
        "(0: none); it grows when workers are absent, stuck or saturated",
        "ready_oldest_seconds",
    ),
    (
        "deliveries_due_oldest_seconds",
        "How long the oldest queued webhook delivery has been due (0: none)",
        "deliveries_due_oldest_seconds",
    ),
    (
        "workers_listening",
        "Worker processes connected to the database (their LISTEN connections)",
        "workers_listening",
    ),
)
UNFINISHED = ("waiting", "pending", "running", "paused")


def database_families(snapshot: dict[str, Any] | None) -> list[Metric]:
    """The gauges read from the database at scrape time (the ``metrics_snapshot`` query,
    None when the database could not be read): ``database_up``, then, when up, the
    unfinished tasks and the open deliveries by status and the ``DATABASE_GAUGES``."""
    up = GaugeMetricFamily(
        "database_up", "1 if this API process could read the database at this scrape, else 0"
    )
    up.add_metric([], 0 if snapshot is None else 1)
    if snapshot is None:
        return [up]
    tasks = GaugeMetricFamily(
        "tasks_by_status",
        "Unfinished tasks by status (finished ones: tasks_completed_total)",
        labels=["status"],
    )
    for status in UNFINISHED:
        tasks.add_metric([status], snapshot[status])
    deliveries = GaugeMetricFamily(
        "deliveries_by_status",
        "Webhook deliveries waiting (queued, retries included) or leased to a worker (in_flight)",
        labels=["status"],
    )
    for status in ("queued", "in_flight"):
        deliveries.add_metric([status], snapshot[f"deliveries_{status}"])
    gauges = [
        GaugeMetricFamily(name, text, value=snapshot[column])
        for name, text, column in DATABASE_GAUGES
    ]
    return [up, tasks, deliveries, *gauges]


def render(extra: Sequence[Metric] = ()) -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type; ``extra``: families collected
    by the caller (the API's database gauges).

    In multiprocess mode the families come from every process's files (the API's
    ``/metrics`` then includes the workers running on the same host), and a metric no
    process has written yet (a labelled one before its first use) is listed all the same,
    as a single-process exporter lists it: its HELP and TYPE, no samples. (An unlabelled
    one is written, 0, by every process that imports this module.)
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        written = list(MultiProcessCollector(None).collect())
        names = {family.name for family in written}
        unwritten = [f for m in DECLARED for f in m.describe() if f.name not in names]
        families = written + unwritten
    else:
        families = list(REGISTRY.collect())
    return generate_latest(_Families([*families, *extra])), CONTENT_TYPE_LATEST


class _Families:
    """Metric families already collected, in the shape ``generate_latest`` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def instance_dir(parent: Path) -> Path:
    """A fresh multiprocess directory for this instance, ``parent/<pid>``; directories of
    instances that are gone (killed before they could remove theirs) are removed first.
    Each instance has its own, so a second ``up`` in the same checkout never wipes or
    mixes with the first one's metrics."""
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.iterdir():
        if old.is_dir() and old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    mine = parent / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
