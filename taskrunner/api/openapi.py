"""The OpenAPI 3.1 document of the API, served at ``GET /openapi.json``.

Request bodies reuse the JSON Schemas that validate them (``validation.SCHEMAS``; OpenAPI
3.1 schemas are JSON Schema 2020-12), with the case-insensitive enum patterns turned into
plain enums of the canonical names. ``tests/test_openapi.py`` checks that the paths and
methods here are exactly the app's routes, and runs schemathesis against the app.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from taskrunner import vocabulary as vocab
from taskrunner.api.serialize import STATUS_COUNTS
from taskrunner.api.validation import DEFAULT_PER_PAGE, LIMITS, SCHEMAS

_ENUM_PATTERN = re.compile(r"^\^\(\?i:(.*)\)\$$")


def _for_document(schema: Any) -> Any:
    """A validation schema as documentation: ``^(?i:A|B)$`` -> ``enum: [A, B]`` (any
    letter case is accepted, the document names the canonical spelling); no ``x-expected``."""
    if isinstance(schema, list):
        return [_for_document(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _for_document(v) for k, v in schema.items() if k != "x-expected"}
    match = _ENUM_PATTERN.match(str(schema.get("pattern", "")))
    if match and schema.get("type") == "string":
        del out["pattern"]
        out["enum"] = match.group(1).split("|")
    return out


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_TIME = {"type": "string", "format": "date-time"}
_UUID_OUT = {"type": "string", "format": "uuid"}


def _object(properties: dict, optional: tuple[str, ...] = ()) -> dict:
    """A response object: exactly these properties (an undocumented one is a schema
    violation, which the schemathesis run in tests/test_openapi.py catches)."""
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
    }


# the properties of a task in every response that carries one
_TASK = {
    "id": _UUID_OUT,
    "local_id": _nullable(_STRING),
    "batch_id": _UUID_OUT,
    "requester": _nullable(_STRING),
    "name": _STRING,
    "kind": _STRING,
    "status": {"type": "string", "enum": list(vocab.STATUS_LABELS)},
    "status_reason": _nullable(_STRING),
    "priority": _INT,
    "timeout": _INT,
    "metadata": {"type": "object"},
    "rules": {"type": "array", "items": {"type": "object"}},
    "expected_count": _nullable(_INT),
    "success": _INT,
    "failures": _INT,
    "failure_reason": _nullable(_STRING),
    "created_at": _TIME,
    "started_at": _nullable(_TIME),
    "ended_at": _nullable(_TIME),
    "last_updated": _TIME,
    "attempt": {
        "type": "integer",
        "description": "The current run: 0 before the first claim, 1 at the first, n at the n-th",
    },
    "retry": _object(
        {
            "max_attempts": _INT,
            "backoff_seconds": {"type": "number"},
            "backoff_max_seconds": {"type": "number"},
        }
    ),
    "not_before": {
        **_nullable(_TIME),
        "description": "Not claimed before this time (delayed start, retry backoff); null once due",
    },
    "dead_end_barrier": {
        "type": "boolean",
        "description": "Dead-end cancellation (when on) does not walk above this task",
    },
}

# an action as the seed shows it (GET /task/{id}'s flat "actions" list)
_FLAT_ACTION = {
    "kind": {"type": "string", "enum": ["Webhook"]},
    "trigger": {"type": "string", "enum": list(vocab.TRIGGERS)},
    "params": _object(
        {
            "url": _STRING,
            "verb": {"type": "string", "enum": list(vocab.VERB_LABELS)},
            "body": {},
            "headers": {"type": "object", "additionalProperties": _STRING},
        },
        optional=("body", "headers"),
    ),
}

_SCHEMAS: dict[str, dict] = {
    "Error": _object(
        {"error": _STRING, "details": {"type": "array", "items": _STRING}},
    ),
    "Rule": {
        "type": "object",
        "description": (
            'A rule, externally tagged ({"Concurency": {...}}) or internally tagged '
            '({"type": "Concurency", ...}); responses use the external form. '
            'Concurency: {"matcher": {kind, status, fields}, "max_concurency": N} (the '
            "spellings Concurrency/max_concurrency are accepted): a start is admitted while "
            "fewer than N matching tasks are in matcher.status. "
            'Capacity: {"matcher": {kind, status: Running, fields}, "max_capacity": N}: '
            "a start is admitted while the remaining work of matching running tasks "
            "(max(expected_count - success - failures, 0), summed) is below N; the task "
            "must set expected_count. "
            'RateLimit: {"matcher": {kind, fields}, "max_starts": N, "per_seconds": S}: at '
            "most N starts of the task's kind with the same field values in any window of "
            "S seconds (matcher.kind is the task's own kind)."
        ),
    },
    "Task": _object(_TASK),
    "Attempt": _object(
        {
            "attempt": _INT,
            "worker": _nullable(_STRING),
            "started_at": _TIME,
            "finished_at": _TIME,
            "status_code": _nullable(_INT),
            "error": _nullable(_STRING),
        }
    ),
    "Delivery": _object(
        {
            "id": _UUID_OUT,
            "status": {"type": "string", "enum": list(vocab.DELIVERY_STATUS_LABELS)},
            "attempt_count": _INT,
            "next_attempt_at": _TIME,
            "last_status_code": _nullable(_INT),
            "last_error": _nullable(_STRING),
            "created_at": _TIME,
            "finished_at": _nullable(_TIME),
            "attempts": {"type": "array", "items": _ref("Attempt")},
        },
        optional=("attempts",),
    ),
    "Action": _object(
        {
            "id": _INT,
            **_FLAT_ACTION,
            "deliveries": {"type": "array", "items": _ref("Delivery")},
        }
    ),
    # Task's properties and these (one object: with allOf, each part's
    # additionalProperties: false would refuse the other part's properties)
    "TaskDetail": _object(
        {
            **_TASK,
            "dependencies": {
                "type": "array",
                "items": _object({"id": _UUID_OUT, "requires_success": {"type": "boolean"}}),
            },
            "on_start": _nullable(_ref("Action")),
            "on_success": {"type": "array", "items": _ref("Action")},
            "on_failure": {"type": "array", "items": _ref("Action")},
            "on_cancel": {"type": "array", "items": _ref("Action")},
            "actions": {
                "type": "array",
                "description": "Every action of the task in the seed's flat form",
                "items": _object(_FLAT_ACTION),
            },
            "why_not_running": _nullable(_ref("WhyNotRunning")),
        }
    ),
    "Accepted": _object({"accepted": _INT}),
    "TaskBatch": _for_document(SCHEMAS["batch"]),
    "TaskUpdate": _for_document(SCHEMAS["patch"]),
    "Counters": _for_document(SCHEMAS["counters"]),
    "CounterUpdate": _for_document(SCHEMAS["put_item"]),
    "CounterBatch": _for_document(SCHEMAS["put_batch"]),
}
_SCHEMAS["TaskBatch"]["items"]["properties"]["rules"]["items"] = _ref("Rule")
_TASK_FIELDS = _SCHEMAS["TaskBatch"]["items"]["properties"]
_TASK_FIELDS["timeout"]["default"] = vocab.DEFAULT_TIMEOUT_SECONDS
_TASK_FIELDS["priority"]["default"] = vocab.DEFAULT_PRIORITY
_TASK_FIELDS["not_before"].update(
    {"format": "date-time", "description": "RFC 3339; not with delay_seconds"}
)
_TASK_FIELDS["delay_seconds"]["description"] = "Seconds from now; not with not_before"
_RETRY_FIELDS = _TASK_FIELDS["retry"]["properties"]
_TASK_FIELDS["retry"]["description"] = (
    "Runs in all and the backoff between them: a failed run with runs left goes back to "
    "Pending, then waits min(backoff_max_seconds, backoff_seconds * 2^(run-1)), "
    "jittered down to half of it"
)
_RETRY_FIELDS["max_attempts"]["description"] = "Default: TASK_RETRY_MAX_ATTEMPTS (1: no retry)"
_RETRY_FIELDS["backoff_seconds"]["default"] = vocab.DEFAULT_BACKOFF_SECONDS
_RETRY_FIELDS["backoff_max_seconds"]["description"] = (
    f"Default: {vocab.DEFAULT_BACKOFF_MAX_SECONDS}, or backoff_seconds when larger"
)
_TASK_FIELDS["dead_end_barrier"]["default"] = False
_UPDATE_FIELDS = _SCHEMAS["TaskUpdate"]["properties"]
_UPDATE_FIELDS["metadata"]["description"] = (
    "Merged into the task's metadata: the keys given replace theirs, the others stay"
)

# -- the batch routes (taskrunner/api/batches.py): ArcRun's names ----------------------------
_COUNT = {"type": "integer", "minimum": 0}
_SCHEMAS.update(
    {
        "StatusCounts": {
            **_object({name: _COUNT for name in STATUS_COUNTS}),
            "description": (
                "Tasks per status; `claimed` = Running tasks whose start webhook is not "
                "acknowledged yet, `running` = the others"
            ),
        },
        "BatchSummary": _object(
            {
                "batch_id": _UUID_OUT,
                "total_tasks": _COUNT,
                "first_created_at": _TIME,
                "latest_updated_at": _TIME,
                "status_counts": _ref("StatusCounts"),
                "kinds": {"type": "array", "items": _STRING},
            }
        ),
        "BatchStats": _object(
            {
                "batch_id": _UUID_OUT,
                "total_tasks": _COUNT,
                "total_success": _INT,
                "total_failures": _INT,
                "total_expected": {
                    **_nullable(_INT),
                    "description": "Sum of the tasks' expected_count; null when none has one",
                },
                "status_counts": _ref("StatusCounts"),
                "kinds": {"type": "array", "items": _STRING},
                "first_created_at": _TIME,
                "latest_updated_at": _TIME,
            }
        ),
        "StopBatchResponse": _object(
            {
                "batch_id": _UUID_OUT,
                **{
                    f"canceled_{name}": _COUNT
                    for name in ("waiting", "pending", "claimed", "running", "paused")
                },
                "already_terminal": _COUNT,
            }
        ),
        "RerunTask": _object(
            {
                "id": _UUID_OUT,
                "batch_id": _UUID_OUT,
                "from_status": {"type": "string", "enum": list(vocab.STATUS_LABELS)},
                "status": {"type": "string", "enum": list(vocab.STATUS_LABELS)},
            }
        ),
        "RerunResponse": _object(
            {
                "rerun": {
                    "type": "array",
                    "items": _ref("RerunTask"),
                    "description": "The tasks rerun (Failure/Canceled -> Pending or Waiting)",
                },
                "downstream": {
                    "type": "array",
                    "items": _ref("RerunTask"),
                    "description": "Tasks that had failed because of them, back to Waiting",
                },
                "waiting_again": {
                    "type": "array",
                    "items": _ref("RerunTask"),
                    "description": "Pending children that wait for a rerun parent again",
                },
            }
        ),
        "BatchRulesUpdate": _for_document(SCHEMAS["batch_rules"]),
        "BatchRulesUpdated": _object(
            {"batch_id": _UUID_OUT, "kind": _STRING, "updated_count": _COUNT}
        ),
        "BasicTask": _object(
            {
                "id": _UUID_OUT,
                "name": _STRING,
                "kind": _STRING,
                "status": {"type": "string", "enum": list(vocab.STATUS_LABELS)},
                "created_at": _TIME,
                "started_at": _nullable(_TIME),
                "ended_at": _nullable(_TIME),
                "success": _INT,
                "failures": _INT,
                "expected_count": _nullable(_INT),
                "batch_id": _UUID_OUT,
                "dead_end_barrier": {"type": "boolean"},
                "priority": _INT,
            }
        ),
        "Link": _object(
            {
                "parent_id": _UUID_OUT,
                "child_id": _UUID_OUT,
                "requires_success": {"type": "boolean"},
            }
        ),
        "Dag": _object(
            {
                "tasks": {"type": "array", "items": _ref("BasicTask")},
                "links": {
                    "type": "array",
                    "items": _ref("Link"),
                    "description": "Links into the batch's tasks; a parent may be in another batch",
                },
            }
        ),
        "ProblemDelivery": _object(
            {
                "id": _UUID_OUT,
                "task_id": _UUID_OUT,
                "task_name": _STRING,
                "batch_id": _UUID_OUT,
                "trigger": {"type": "string", "enum": list(vocab.TRIGGERS)},
                "status": {"type": "string", "enum": list(vocab.DELIVERY_STATUS_LABELS)},
                "attempt_count": _INT,
                "next_attempt_at": _TIME,
                "last_status_code": _nullable(_INT),
                "last_error": _nullable(_STRING),
                "url": _STRING,
                "verb": {"type": "string", "enum": list(vocab.VERB_LABELS)},
            }
        ),
        "RunningTask": _object(
            {
                "id": _UUID_OUT,
                "name": _STRING,
                "kind": _STRING,
                "batch_id": _UUID_OUT,
                "claimed_by": _nullable(_STRING),
                "claimed_at": _nullable(_TIME),
                "started_at": _nullable(_TIME),
                "last_updated": _TIME,
                "timeout_at": _TIME,
            }
        ),
        "Problems": _object(
            {
                "deliveries": {"type": "array", "items": _ref("ProblemDelivery")},
                "running": {
                    "type": "array",
                    "items": _ref("RunningTask"),
                    "description": "Running tasks, the longest running first",
                },
            }
        ),
        "Transition": _object(
            {
                "at": _TIME,
                "from": _nullable({"type": "string", "enum": list(vocab.STATUS_LABELS)}),
                "to": {"type": "string", "enum": list(vocab.STATUS_LABELS)},
                "reason": _nullable(_STRING),
                "actor": _nullable(_STRING),
            }
        ),
        "WhyNotRunning": {
            "description": (
                "Why a Waiting/Pending/Paused task is not running (null otherwise): "
                "`unfinished_parents` (with `parents`), `rule` (with the `rules` at their "
                "limit, each with its `count` and `max`), `scheduled` (with `not_before`: "
                "a delayed start or a retry's backoff), `ready` (the next claim may start "
                "it) or `paused`"
            ),
            **_object(
                {
                    "reason": {
                        "type": "string",
                        "enum": ["unfinished_parents", "rule", "scheduled", "ready", "paused"],
                    },
                    "not_before": _TIME,
                    "parents": {
                        "type": "array",
                        "items": _object(
                            {
                                "id": _UUID_OUT,
                                "name": _STRING,
                                "status": {"type": "string", "enum": list(vocab.STATUS_LABELS)},
                                "requires_success": {"type": "boolean"},
                            }
                        ),
                    },
                    "rules": {
                        "type": "array",
                        "items": _object({"rule": _ref("Rule"), "count": _COUNT, "max": _INT}),
                    },
                },
                optional=("parents", "rules", "not_before"),
            ),
        },
    }
)
_SCHEMAS["BatchRulesUpdate"]["properties"]["rules"]["items"] = _ref("Rule")
_BATCH_EXAMPLE = [
    {
        "id": "ingest",
        "name": "Ingest",
        "kind": "ingest",
        "metadata": {"tenant": "t1"},
        "on_start": {
            "kind": "Webhook",
            "params": {"url": "http://example.com/start", "verb": "Post"},
        },
        "rules": [
            {
                "Concurency": {
                    "matcher": {"kind": "ingest", "status": "Running", "fields": ["tenant"]},
                    "max_concurency": 2,
                }
            }
        ],
    },
    {
        "id": "report",
        "name": "Report",
        "kind": "report",
        "dependencies": [{"id": "ingest", "requires_success": True}],
        "on_start": {"kind": "Webhook", "params": {"url": "http://example.com/go", "verb": "Get"}},
    },
]

_DESCRIPTIONS = {
    400: "Bad input; `details` lists every problem as `<field>: <problem>`",
    401: "`API_TOKEN` is set and the request has no valid `Authorization: Bearer` token",
    404: "No such task (or batch, or delivery); ids that are not UUIDs are 404 too",
    409: "Illegal transition for the task's current status",
    413: f"Body larger than {LIMITS['body_bytes']} bytes",
    415: "Body is not `application/json`",
    503: "Database unavailable",
}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict:
    codes = (*codes, 401, 503)
    return {
        str(code): {"description": _DESCRIPTIONS[code], "content": _json(_ref("Error"))}
        for code in sorted(codes)
    }


def _ok(code: int, description: str, schema: dict, **extra: Any) -> dict:
    return {str(code): {"description": description, "content": _json(schema), **extra}}


def _body(schema: dict, description: str = "") -> dict:
    return {"required": True, "description": description, "content": _json(schema)}


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "A task's UUID",
    "schema": {"type": "string", "format": "uuid"},
}
_TASK_OUT = _ok(200, "The task", _ref("Task"))
_LINKS = {
    op: {"operationId": op, "parameters": {"id": "$response.body#/0/id"}}
    for op in ("getTask", "updateTask", "cancelTask", "pauseTask", "resumeTask", "addTaskCounters")
}


def _query(name: str, schema: dict, description: str) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_PAGING = [
    _query("page", {"type": "integer", "minimum": 0, "maximum": LIMITS["page"]}, "0-based"),
    _query(
        "per_page",
        {"type": "integer", "minimum": 1, "maximum": LIMITS["per_page"]},
        f"page size (default {DEFAULT_PER_PAGE})",
    ),
    _query(
        "page_size",
        {"type": "integer", "minimum": 1, "maximum": LIMITS["per_page"]},
        "alias of per_page",
    ),
]
_BATCH_ID = {**_ID, "description": "A batch's UUID (the X-Batch-ID of POST /task)"}

_PATHS: dict[str, dict] = {
    "/task": {
        "post": {
            "operationId": "createTasks",
            "summary": "Create a batch of tasks atomically",
            "parameters": [
                {
                    "name": "X-Requester",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": LIMITS["requester_chars"]},
                    "description": "Who asked; recorded on every task of the batch",
                },
                {
                    "name": "traceparent",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": (
                        "W3C trace context, stored with the batch: every webhook of its "
                        "tasks carries a child of it (same trace id, a new span id). A "
                        "malformed one is ignored, as W3C asks (no error)"
                    ),
                },
                {
                    "name": "tracestate",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": (
                        "Sent on with traceparent; dropped if over 512 characters or not "
                        "printable ASCII"
                    ),
                },
            ],
            "requestBody": {
                **_body(_ref("TaskBatch"), "The tasks; `id` is a local id"),
                "content": {
                    "application/json": {"schema": _ref("TaskBatch"), "example": _BATCH_EXAMPLE}
                },
            },
            "responses": {
                **_ok(
                    201,
                    "The created tasks, each with its `local_id`",
                    {"type": "array", "items": _ref("Task")},
                    headers={"X-Batch-ID": {"schema": {"type": "string", "format": "uuid"}}},
                    links=_LINKS,
                ),
                "204": {"description": "The dedupe strategy skipped every task"},
                **_errors(400, 413, 415),
            },
        },
        "get": {
            "operationId": "listTasks",
            "summary": "List tasks, newest first",
            "parameters": [
                *_PAGING,
                _query(
                    "status",
                    {"type": "string", "enum": list(vocab.STATUS_LABELS)},
                    "any letter case",
                ),
                _query("kind", {"type": "string", "maxLength": LIMITS["filter_chars"]}, "exact"),
                _query(
                    "name", {"type": "string", "maxLength": LIMITS["filter_chars"]}, "substring"
                ),
                _query("batch_id", {"type": "string", "format": "uuid"}, "one batch"),
                _query("metadata", {"type": "string"}, "JSON object the metadata must contain"),
            ],
            "responses": {
                **_ok(200, "One page of tasks", {"type": "array", "items": _ref("Task")}),
                **_errors(400),
            },
        },
        "put": {
            "operationId": "addCounters",
            "summary": "Add to tasks' success/failure counters (buffered, flushed every ~100 ms)",
            "requestBody": _body(
                {"oneOf": [_ref("CounterUpdate"), _ref("CounterBatch")]},
                "One update or an array of them",
            ),
            "responses": {
                **_ok(202, "Accepted", _ref("Accepted")),
                **_errors(400, 404, 413, 415),
            },
        },
    },
    "/task/{id}": {
        "parameters": [_ID],
        "get": {
            "operationId": "getTask",
            "summary": "A task with its dependencies, actions, deliveries and attempts",
            "responses": {**_ok(200, "The task", _ref("TaskDetail")), **_errors(404)},
        },
        "patch": {
            "operationId": "updateTask",
            "summary": "Report progress or the outcome of a Running task (also a heartbeat)",
            "requestBody": _body(_ref("TaskUpdate")),
            "responses": {**_TASK_OUT, **_errors(400, 404, 409, 413, 415)},
        },
        "delete": {
            "operationId": "cancelTask",
            "summary": "Cancel a task (a Running task's cancel actions fire)",
            "responses": {**_TASK_OUT, **_errors(404, 409)},
        },
        "put": {
            "operationId": "addTaskCounters",
            "summary": "Alias of PUT /task for one task",
            "requestBody": _body(_ref("Counters")),
            "responses": {
                **_ok(202, "Accepted", _ref("Accepted")),
                **_errors(400, 404, 413, 415),
            },
        },
    },
    "/task/pause/{id}": {
        "parameters": [_ID],
        "patch": {
            "operationId": "pauseTask",
            "summary": "Waiting/Pending -> Paused",
            "responses": {**_TASK_OUT, **_errors(404, 409)},
        },
    },
    "/task/resume/{id}": {
        "parameters": [_ID],
        "patch": {
            "operationId": "resumeTask",
            "summary": "Paused -> Waiting or Pending",
            "responses": {**_TASK_OUT, **_errors(404, 409)},
        },
    },
    "/task/{id}/rerun": {
        "parameters": [_ID],
        "post": {
            "operationId": "rerunTask",
            "summary": (
                "Run a Failure/Canceled task again, with the tasks downstream that failed "
                "because of it; 409 if it did not fail or was not canceled, or if a parent "
                "it requires failed (rerun that one)"
            ),
            "responses": {
                **_ok(200, "What changed, by role", _ref("RerunResponse")),
                **_errors(404, 409),
            },
        },
    },
    "/task/{id}/history": {
        "parameters": [_ID],
        "get": {
            "operationId": "getTaskHistory",
            "summary": "Every transition of the task (time, from, to, reason), oldest first",
            "responses": {
                **_ok(200, "The transitions", {"type": "array", "items": _ref("Transition")}),
                **_errors(404),
            },
        },
    },
    "/batches": {
        "get": {
            "operationId": "listBatches",
            "summary": "One summary per batch, newest first",
            "parameters": [
                *_PAGING,
                _query(
                    "status",
                    {"type": "string", "enum": list(vocab.BATCH_STATUS_LABELS)},
                    "batches with a task in this status (Running includes Claimed); any case",
                ),
                _query(
                    "kind",
                    {"type": "string", "maxLength": LIMITS["filter_chars"]},
                    "batches with a task of this kind",
                ),
                _query(
                    "name",
                    {"type": "string", "maxLength": LIMITS["filter_chars"]},
                    "batches with a task whose name contains this",
                ),
                _query(
                    "created_after",
                    {"type": "string", "format": "date-time"},
                    "first task created at or after (ISO 8601; UTC without an offset)",
                ),
                _query(
                    "created_before",
                    {"type": "string", "format": "date-time"},
                    "first task created before (ISO 8601; UTC without an offset)",
                ),
            ],
            "responses": {
                **_ok(200, "One page of batches", {"type": "array", "items": _ref("BatchSummary")}),
                **_errors(400),
            },
        },
    },
    "/batch/{id}": {
        "parameters": [_BATCH_ID],
        "get": {
            "operationId": "getBatch",
            "summary": "The batch's counts per status and sums of its task counters",
            "responses": {**_ok(200, "The stats", _ref("BatchStats")), **_errors(404)},
        },
        "delete": {
            "operationId": "stopBatch",
            "summary": (
                "Stop the batch: every unfinished task -> Canceled (reason `batch stopped`; "
                "Running tasks fire their cancel webhooks), atomically"
            ),
            "responses": {
                **_ok(200, "Counts per former status", _ref("StopBatchResponse")),
                **_errors(404),
            },
        },
    },
    "/batch/{id}/rules": {
        "parameters": [_BATCH_ID],
        "patch": {
            "operationId": "updateBatchRules",
            "summary": "Replace the rules of one kind on the batch's unfinished tasks",
            "requestBody": _body(_ref("BatchRulesUpdate"), "`rules: []` removes them"),
            "responses": {
                **_ok(200, "How many tasks changed", _ref("BatchRulesUpdated")),
                **_errors(400, 404, 413, 415),
            },
        },
    },
    "/batch/{id}/rerun": {
        "parameters": [_BATCH_ID],
        "post": {
            "operationId": "rerunBatch",
            "summary": (
                "Rerun every Failure/Canceled task of the batch (and their cascade), "
                "atomically; 409 if none"
            ),
            "responses": {
                **_ok(200, "What changed, by role", _ref("RerunResponse")),
                **_errors(404, 409),
            },
        },
    },
    "/dag/{id}": {
        "parameters": [_BATCH_ID],
        "get": {
            "operationId": "getBatchDag",
            "summary": "The batch's tasks and the links into them",
            "responses": {**_ok(200, "The DAG", _ref("Dag")), **_errors(404)},
        },
    },
    "/problems": {
        "get": {
            "operationId": "listProblems",
            "summary": (
                "Webhook deliveries that gave up or are retrying, and the tasks running "
                "longest (the views delivery_problems and running_tasks)"
            ),
            "parameters": [
                _query("batch_id", {"type": "string", "format": "uuid"}, "only this batch"),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": LIMITS["per_page"]},
                    f"rows per list (default {DEFAULT_PER_PAGE})",
                ),
            ],
            "responses": {**_ok(200, "The problems", _ref("Problems")), **_errors(400)},
        },
    },
    "/ui": {
        "get": {
            "operationId": "webUi",
            "summary": "The web UI (one HTML page; it asks for the token when one is needed)",
            "security": [],
            "responses": {
                "200": {"description": "The page", "content": {"text/html": {"schema": _STRING}}}
            },
        }
    },
    "/view": {
        "get": {
            "operationId": "webUiRedirect",
            "summary": "Redirects to /ui (ArcRun's path of its UI)",
            "security": [],
            "responses": {"302": {"description": "Location: /ui"}},
        }
    },
    "/delivery/{id}/retry": {
        "parameters": [{**_ID, "description": "A delivery's UUID"}],
        "post": {
            "operationId": "retryDelivery",
            "summary": "Queue again a webhook delivery that gave up",
            "responses": {**_ok(200, "The delivery", _ref("Delivery")), **_errors(404, 409)},
        },
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": _STRING}},
                }
            },
        }
    },
    "/health": {
        "get": {
            "operationId": "health",
            "summary": "Liveness (never touches the database)",
            "security": [],
            "responses": _ok(200, "Alive", _object({"status": {"const": "ok"}})),
        }
    },
    "/ready": {
        "get": {
            "operationId": "ready",
            "summary": "Readiness: the database answers and has the newest migration",
            "security": [],
            "responses": {
                **_ok(
                    200,
                    "Ready",
                    _object({"status": {"const": "ready"}, "migration": _nullable(_STRING)}),
                ),
                "503": {"description": "Not ready", "content": _json(_ref("Error"))},
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": _ok(200, "The OpenAPI document", {"type": "object"}),
        }
    },
}


# gunicorn answers a request line longer than its limit_request_line itself, in HTML
_URI_TOO_LONG = {
    "description": "Request line (method + URL) over 8190 bytes; gunicorn's own page",
    "content": {"text/html": {"schema": _STRING}},
}
for _item in _PATHS.values():
    for _method, _operation in _item.items():
        if _method != "parameters":
            _operation["responses"]["414"] = _URI_TOO_LONG


def document(version: str = "0.1.0") -> dict:
    """The OpenAPI document (a fresh copy each call)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "taskrunner",
                "version": version,
                "description": (
                    "Runs DAGs of webhook tasks on PostgreSQL. Errors are always "
                    '`{"error": ..., "details": [...]}`. Limits are listed in README.md.'
                ),
            },
            "components": {
                "schemas": _SCHEMAS,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
            # the token is optional: needed only when the server sets API_TOKEN
            "security": [{}, {"bearer": []}],
            "paths": _PATHS,
        }
    )
