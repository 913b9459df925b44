"""Database rows -> the API's JSON: capitalised enums, the seed's rule form, ISO 8601 times."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from taskrunner.vocabulary import (
    ACTION_FIELDS,
    TRIGGER_LABELS,
    delivery_status_label,
    status_label,
    verb_label,
)


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any) -> str:
    """JSON text of a response body (datetimes as ISO 8601, UUIDs as strings)."""
    return json.dumps(value, default=_default)


def _fields(row: dict, names: str, **derived: Any) -> dict:
    """The fields ``names`` (space-separated) of ``row`` as they are, in that order, but
    those in ``derived``: their value stands in the same place (a converted column, a
    renamed one, a constant)."""
    return {name: derived[name] if name in derived else row[name] for name in names.split()}


def rule(rule: dict) -> dict:
    """A stored rule (docs/sql.md "Rules") in the seed's externally tagged form."""
    matcher = {"kind": rule["kind"], "fields": rule.get("fields", [])}
    if rule.get("type") == "rate_limit":
        return {
            "RateLimit": {
                "matcher": matcher,
                "max_starts": rule["max"],
                "per_seconds": rule["per_seconds"],
            }
        }
    matcher = {"kind": rule["kind"], "status": status_label(rule["status"]), **matcher}
    if rule.get("type") == "capacity":
        return {"Capacity": {"matcher": matcher, "max_capacity": rule["max"]}}
    return {"Concurency": {"matcher": matcher, "max_concurency": rule["max"]}}


def task(row: dict) -> dict:
    """One task row (without its actions)."""
    return _fields(
        row,
        "id local_id batch_id requester name kind status status_reason priority timeout"
        " metadata rules expected_count success failures failure_reason created_at started_at"
        " ended_at last_updated attempt retry not_before dead_end_barrier",
        status=status_label(row["status"]),
        rules=[rule(r) for r in row["rules"]],
        retry={
            "max_attempts": row["max_attempts"],
            "backoff_seconds": row["backoff_seconds"],
            "backoff_max_seconds": row["backoff_max_seconds"],
        },
    )


RERUN_ROLES = ("rerun", "downstream", "waiting_again")


def rerun(rows: list[dict]) -> dict:
    """The rows of ``rerun_task``/``rerun_batch`` grouped by role: the tasks rerun, those
    downstream rerun with them (their cascade), the unstarted children now waiting again."""
    out: dict[str, list[dict]] = {role: [] for role in RERUN_ROLES}
    for row in rows:
        out[row["role"]].append(
            {
                "id": row["task_id"],
                "batch_id": row["batch_id"],
                "from_status": status_label(row["from_status"]),
                "status": status_label(row["to_status"]),
            }
        )
    return out


def flat_action(row: dict) -> dict:
    """An action in the seed's shape: ``{kind, trigger, params}``."""
    params: dict[str, Any] = {"url": row["url"], "verb": verb_label(row["verb"])}
    if row["body"] is not None:
        params["body"] = row["body"]
    if row["headers"]:
        params["headers"] = row["headers"]
    return {"kind": "Webhook", "trigger": TRIGGER_LABELS[row["event"]], "params": params}


def action(row: dict, deliveries: list[dict]) -> dict:
    """An action of the grouped form: the seed's shape with its id and deliveries."""
    return {"id": row["id"], **flat_action(row), "deliveries": deliveries}


def delivery(row: dict, attempts: list[dict] | None = None) -> dict:
    """A delivery (one webhook call to make) with its attempts, when given."""
    body = _fields(
        row,
        "id status attempt_count next_attempt_at last_status_code last_error created_at"
        " finished_at",
        status=delivery_status_label(row["status"]),
        attempt_count=row["attempts"],
    )
    if attempts is not None:
        body["attempts"] = [attempt(a) for a in attempts]
    return body


def attempt(row: dict) -> dict:
    return _fields(row, "attempt worker started_at finished_at status_code error")


def task_detail(
    row: dict,
    dependencies: list[dict],
    actions: list[dict],
    deliveries: list[dict],
    attempts: list[dict],
) -> dict:
    """A task with its dependencies and its actions twice: grouped by trigger (``on_*``),
    each action with its deliveries and each delivery with its attempts, and as the seed's
    flat ``actions`` list (``{kind, trigger, params}``, every action of the task)."""
    attempts_of: dict[Any, list[dict]] = {}
    for a in attempts:
        attempts_of.setdefault(a["delivery_id"], []).append(a)
    deliveries_of: dict[Any, list[dict]] = {}
    for d in deliveries:
        deliveries_of.setdefault(d["action_id"], []).append(
            delivery(d, attempts_of.get(d["id"], []))
        )
    body = task(row)
    body["dependencies"] = [
        {"id": d["parent_id"], "requires_success": d["requires_success"]} for d in dependencies
    ]
    for group in ACTION_FIELDS.values():
        body[group] = []
    for a in actions:
        body[ACTION_FIELDS[a["event"]]].append(action(a, deliveries_of.get(a["id"], [])))
    # on_start is one action on input, so it is one action (or null) on output too
    body["on_start"] = next(iter(body["on_start"]), None)
    body["actions"] = [flat_action(a) for a in actions]
    return body


# -- batches (taskrunner/api/batches.py) ---------------------------------------------------

# ArcRun's BatchStatusCounts, in its order
STATUS_COUNTS = (
    "waiting",
    "pending",
    "claimed",
    "running",
    "success",
    "failure",
    "paused",
    "canceled",
)


def status_counts(row: dict) -> dict:
    """ArcRun's ``BatchStatusCounts`` from a ``batch_summary`` row (claimed = running
    tasks whose start is not acknowledged yet; running = the others)."""
    return {status: row[status] for status in STATUS_COUNTS}


def batch_summary(row: dict) -> dict:
    """One row of ``GET /batches`` (ArcRun's ``BatchSummaryDto``)."""
    return _fields(
        row,
        "batch_id total_tasks first_created_at latest_updated_at status_counts kinds",
        status_counts=status_counts(row),
    )


def batch_stats(row: dict) -> dict:
    """``GET /batch/{id}`` (ArcRun's ``BatchStatsDto``, plus kinds and times);
    ``total_expected``: the sum of the tasks' ``expected_count``, null when none has one."""
    return _fields(
        row,
        "batch_id total_tasks total_success total_failures total_expected status_counts"
        " kinds first_created_at latest_updated_at",
        status_counts=status_counts(row),
    )


def basic_task(row: dict) -> dict:
    """ArcRun's ``BasicTaskDto`` (a DAG node)."""
    return _fields(
        row,
        "id name kind status created_at started_at ended_at success failures expected_count"
        " batch_id dead_end_barrier priority",
        status=status_label(row["status"]),
    )


def transition(row: dict) -> dict:
    """One ``task_history`` row: when, from (null at creation), to, why, and who
    (``actor``: the session's application_name and role; null for old rows)."""
    previous = row["from_status"]
    return {
        "at": row["at"],
        "from": status_label(previous) if previous else None,
        "to": status_label(row["to_status"]),
        "reason": row["reason"],
        "actor": row["actor"],
    }


def why_not_running(value: dict | None) -> dict | None:
    """``taskrunner.why_not_running()`` with API spellings (statuses, the seed's rule form)."""
    if value is None:
        return None
    out = dict(value)
    if "parents" in out:
        out["parents"] = [{**p, "status": status_label(p["status"])} for p in out["parents"]]
    if "rules" in out:
        out["rules"] = [{**r, "rule": rule(r["rule"])} for r in out["rules"]]
    return out


def problem_delivery(row: dict) -> dict:
    """One ``delivery_problems`` row with its task's name and batch (``GET /problems``)."""
    return _fields(
        row,
        "id task_id task_name batch_id trigger status attempt_count next_attempt_at"
        " last_status_code last_error url verb",
        trigger=TRIGGER_LABELS[row["event"]],
        status=delivery_status_label(row["status"]),
        attempt_count=row["attempts"],
        verb=verb_label(row["verb"]),
    )
