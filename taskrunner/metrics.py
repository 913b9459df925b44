"""Prometheus metrics shared by the API and the workers.

The SQL triggers count every transition a transaction makes (cascades included); callers
read that tally with the ``take_stats`` query at the end of the transaction and hand it to
``record_stats``. With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn, several workers on one
host), values go to files in that directory and ``render`` aggregates all processes.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from taskrunner.vocabulary import TERMINAL_STATUSES, status_label

log = logging.getLogger(__name__)

TASKS_CREATED = Counter("tasks_created_total", "Tasks created")
TASKS_COMPLETED = Counter(
    "tasks_completed_total", "Tasks that reached a terminal status", ["outcome", "kind"]
)
TRANSITIONS = Counter(
    "task_status_transitions_total", "Task status transitions", ["from_status", "to_status"]
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
WORKER_LOOP = Histogram("worker_loop_duration_seconds", "Duration of one worker loop iteration")


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
    elif head == "blocked" and len(parts) == 2:
        BLOCKED.inc(n)
    elif head == "propagation" and len(parts) == 3:
        PROPAGATIONS.labels(parent_outcome=status_label(parts[1])).inc(n)
    elif len(parts) >= 4:
        # from>to>kind>n; a kind may itself contain ">"
        from_status, to_status, kind = parts[0], parts[1], ">".join(parts[2:-1])
        TRANSITIONS.labels(status_label(from_status), status_label(to_status)).inc(n)
        if to_status in TERMINAL_STATUSES:
            TASKS_COMPLETED.labels(outcome=status_label(to_status), kind=kind).inc(n)
    else:
        return False
    return True


def count_dropped_increments(reason: str, tasks: int) -> None:
    """Count ``tasks`` tasks' buffered PUT increments that were dropped, and why."""
    COUNTER_DROPS.labels(reason=reason).inc(tasks)


def observe_worker_loop(seconds: float) -> None:
    """Record the duration of one worker loop iteration."""
    WORKER_LOOP.observe(seconds)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type.

    In multiprocess mode a fresh registry aggregates every process's files (the API's
    ``/metrics`` then includes the workers running on the same host).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
