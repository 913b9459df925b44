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
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    Metric,
    generate_latest,
)
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
# every metric above: /metrics lists each of them from the start, used or not
DECLARED = (TASKS_CREATED, TASKS_COMPLETED, TRANSITIONS, BLOCKED, PROPAGATIONS, WORKER_LOOP)


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


def observe_worker_loop(seconds: float) -> None:
    """Record the duration of one worker loop iteration."""
    WORKER_LOOP.observe(seconds)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type.

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
        return generate_latest(_Families(written + unwritten)), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


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
