"""The words and numbers the API, the worker and the SQL share: one place for each.

The database names things in lower case (``task_status``, ``action_event`` and
``delivery_status`` enums, the verb CHECK); the API shows labels (``Running``, ``End``,
``InFlight``, ``Post``). Validation, serialisation, webhooks, metrics and the OpenAPI
document take both from here. ``tests/test_vocabulary.py`` compares every value below that
SQL also knows with the database (enum ranges, CHECK constraints, column defaults), so the
two sides cannot drift apart.
"""

from __future__ import annotations

# -- task statuses (enum taskrunner.task_status) ---------------------------------------------

TASK_STATUSES = ("waiting", "pending", "running", "success", "failure", "canceled", "paused")
# taskrunner.is_terminal(): a task in one of these never moves again
TERMINAL_STATUSES = frozenset({"success", "failure", "canceled"})
# what a target may report through PATCH /task/{id} (update_task, complete_tasks)
REPORTED_STATUSES = ("success", "failure")


def status_label(status: str) -> str:
    """The API's name of a database status: ``running`` -> ``Running``."""
    return status.capitalize()


STATUS_LABELS = tuple(status_label(s) for s in TASK_STATUSES)
REPORTED_STATUS_LABELS = tuple(status_label(s) for s in REPORTED_STATUSES)
# GET /batches counts Running tasks whose start is not yet acknowledged as "Claimed"
# (ArcRun's name); its status filter takes that label too.
BATCH_STATUS_LABELS = (*STATUS_LABELS, "Claimed")

# -- actions (enum taskrunner.action_event, CHECK action_verb_known) -------------------------

VERBS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def verb_label(verb: str) -> str:
    """The API's spelling of a verb: ``DELETE`` -> ``Delete``."""
    return verb.capitalize()


VERB_LABELS = tuple(verb_label(v) for v in VERBS)

EVENTS = ("start", "success", "failure", "cancel")
# The API's trigger of each event: success and failure actions are both "End".
TRIGGER_LABELS = {"start": "Start", "success": "End", "failure": "End", "cancel": "Cancel"}
TRIGGERS = ("Start", "End", "Cancel")
# The task field that lists each event's actions (on_start holds one action, not a list).
ACTION_FIELDS = {
    "start": "on_start",
    "success": "on_success",
    "failure": "on_failure",
    "cancel": "on_cancel",
}

# -- deliveries (enum taskrunner.delivery_status) ---------------------------------------------

DELIVERY_STATUSES = ("queued", "in_flight", "delivered", "failed", "canceled", "expired")


def delivery_status_label(status: str) -> str:
    """The API's name of a delivery status: ``in_flight`` -> ``InFlight``."""
    return "".join(word.capitalize() for word in status.split("_"))


DELIVERY_STATUS_LABELS = tuple(delivery_status_label(s) for s in DELIVERY_STATUSES)

# -- numbers the task table checks (CHECK task_*_range, column defaults) ---------------------

TIMEOUT_SECONDS = (1, 86400)  # CHECK task_timeout_range
DEFAULT_TIMEOUT_SECONDS = 60  # taskrunner.task.timeout DEFAULT
PRIORITY_RANGE = (-1000, 1000)  # CHECK task_priority_range
DEFAULT_PRIORITY = 0  # taskrunner.task.priority DEFAULT

# -- retries and delayed start (CHECK task_retry_range, column defaults) ---------------------

MAX_ATTEMPTS_RANGE = (1, 100)  # runs in all; 1 = no retry (taskrunner.task.max_attempts)
DEFAULT_MAX_ATTEMPTS = 1  # taskrunner.task.max_attempts DEFAULT (TASK_RETRY_MAX_ATTEMPTS)
BACKOFF_SECONDS_RANGE = (0, 86400)  # backoff_seconds and backoff_max_seconds
DEFAULT_BACKOFF_SECONDS = 5  # taskrunner.task.backoff_seconds DEFAULT
DEFAULT_BACKOFF_MAX_SECONDS = 300  # taskrunner.task.backoff_max_seconds DEFAULT
DELAY_SECONDS_RANGE = (0, 366 * 86400)  # delay_seconds at creation
