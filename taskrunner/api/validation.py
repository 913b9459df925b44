"""Request validation: the user's JSON -> the normalised input of the SQL functions.

Shapes are checked with JSON Schema (Draft 2020-12; the first 100 problems worded, the
rest counted, at a cost bounded by the compiled fast check), cross-field rules (local ids,
dependencies, cycles, rule fields) in code. Enums, ranges and defaults come from
``taskrunner.vocabulary``. Every problem becomes one
``"<path>: <problem>"`` detail, e.g. ``"[2].dependencies[0].id: unknown local id 'x'"``;
``Invalid`` carries them all. Enum values are accepted in any letter case. ``null`` for an
optional field means "absent" (clients that serialise empty options as null work as is).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fastjsonschema
import httpx
from jsonschema import Draft202012Validator, ValidationError

from taskrunner import vocabulary as vocab
from taskrunner.netguard import Policy

# The limits the API enforces (name -> value). Anything above is a 400 (body: 413).
# README.md's "Limits" table lists them; tests/test_security.py tries each one.
LIMITS: dict[str, int] = {
    "body_bytes": 10 * 1024 * 1024,  # request body size (413 above)
    "batch_tasks": 10_000,  # tasks in one POST /task, updates in one PUT /task
    "name_chars": 200,  # task name
    "kind_chars": 200,  # task kind, matcher kind
    "local_id_chars": 200,  # a task's "id" in its batch, a dependency's id
    "url_chars": 2048,  # webhook URL
    "headers_entries": 50,  # webhook headers
    "header_name_chars": 256,  # a webhook header's name
    "header_value_chars": 8192,  # a webhook header's value
    "actions_per_list": 100,  # on_success / on_failure / on_cancel entries
    "dependencies": 10_000,  # dependencies of one task
    "rules": 20,  # rules of one task
    "dedupe_matchers": 20,  # dedupe_strategy entries of one task
    "matcher_fields": 20,  # fields of one matcher
    "field_chars": 200,  # a matcher field name
    "metadata_bytes": 64 * 1024,  # metadata (and the GET metadata filter) as compact JSON
    "filter_chars": 200,  # GET /task kind and name filters
    "requester_chars": 200,  # X-Requester header
    "failure_reason_chars": 10_000,  # PATCH failure_reason
    "max_concurency": 1_000_000,  # a Concurency rule's limit
    "max_capacity": 1_000_000_000_000,  # a Capacity rule's limit
    "expected_count": 1_000_000_000_000,  # a task's expected_count
    "max_starts": 1_000_000,  # a RateLimit rule's starts per window
    "per_seconds": 86_400,  # a RateLimit rule's window (s)
    "counter_increment": 1_000_000_000,  # new_success / new_failures per request
    "per_page": 500,  # GET /task page size
    "page": 1_000_000,  # GET /task page number
    "reported_errors": 100,  # details listed in one 400 response
}

DEFAULT_PER_PAGE = 50
# rule tags (any letter case) -> the canonical name; the schema of each one's body
_RULE_NAMES = {
    "concurency": "Concurency",
    "concurrency": "Concurency",
    "capacity": "Capacity",
    "ratelimit": "RateLimit",
}
_RULE_SCHEMAS = {"Concurency": "rule", "Capacity": "capacity_rule", "RateLimit": "rate_limit_rule"}
_MAX_KEYS = ("max_concurency", "max_concurrency")
_RULE_FORMS = (
    '{"Concurency": {"matcher": ..., "max_concurency": N}}, '
    '{"Capacity": {"matcher": ..., "max_capacity": N}}, '
    '{"RateLimit": {"matcher": ..., "max_starts": N, "per_seconds": S}} '
    '(or flat, with "type": "Concurency", "Capacity" or "RateLimit")'
)
# the task fields that hold a list of actions -> their event
_ACTION_LISTS = {field: event for event, field in vocab.ACTION_FIELDS.items() if event != "start"}


class Invalid(Exception):
    """Bad input; ``details`` lists every problem as ``"<path>: <problem>"``."""

    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("; ".join(details))
        limit = LIMITS["reported_errors"]
        self.details = list(details[:limit])
        if len(details) > limit:
            self.details.append(f"(and {len(details) - limit} more)")


# -- schemas ---------------------------------------------------------------------------


def _one_of(*names: str, expected: str | None = None) -> dict:
    """A case-insensitive enum; ``x-expected`` is what the error message asks for."""
    return {
        "type": "string",
        "pattern": "^(?i:" + "|".join(names) + ")$",
        "x-expected": expected or "one of " + ", ".join(names),
    }


def _text(max_chars: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def _array(items: dict, max_items: int) -> dict:
    return {"type": "array", "items": items, "maxItems": max_items}


def _int(minimum: int, maximum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _number(minimum: float, maximum: float) -> dict:
    return {"type": "number", "minimum": minimum, "maximum": maximum}


def _object(properties: dict, required: Sequence[str] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_COUNT = _int(0, LIMITS["counter_increment"])
_UUID = {
    "type": "string",
    "pattern": "^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$",
    "x-expected": "a UUID",
}
_MATCHER = _object(
    {
        "kind": _text(LIMITS["kind_chars"]),
        "status": _one_of(*vocab.STATUS_LABELS),
        "fields": {
            "type": "array",
            "items": _text(LIMITS["field_chars"]),
            "maxItems": LIMITS["matcher_fields"],
            "uniqueItems": True,
        },
    },
    required=["kind", "status"],
)
_RULE_BODY = _object(
    {"matcher": _MATCHER, **{k: _int(1, LIMITS["max_concurency"]) for k in _MAX_KEYS}},
    required=["matcher"],
)
_CAPACITY_BODY = _object(
    {"matcher": _MATCHER, "max_capacity": _int(1, LIMITS["max_capacity"])},
    required=["matcher", "max_capacity"],
)
# a rate limit counts starts, so its matcher has no status
_RATE_LIMIT_BODY = _object(
    {
        "matcher": _object(
            {k: v for k, v in _MATCHER["properties"].items() if k != "status"},
            required=["kind"],
        ),
        "max_starts": _int(1, LIMITS["max_starts"]),
        "per_seconds": _int(1, LIMITS["per_seconds"]),
    },
    required=["matcher", "max_starts", "per_seconds"],
)


def _action(event: str) -> dict:
    params = _object(
        {
            "url": {"type": "string", "maxLength": LIMITS["url_chars"]},
            "verb": _one_of(*vocab.VERB_LABELS),
            "body": {},
            "headers": {
                "type": "object",
                "maxProperties": LIMITS["headers_entries"],
                "propertyNames": {
                    "pattern": "^[!#\\$%&'*+.^_`|~0-9A-Za-z-]+$(?!\\n)",
                    "maxLength": LIMITS["header_name_chars"],
                    "x-expected": "an HTTP header name",
                },
                "additionalProperties": {
                    "type": "string",
                    "maxLength": LIMITS["header_value_chars"],
                    # what the worker can send (httpx encodes ASCII, h11 refuses control
                    # characters and whitespace at either end); "(?!\n)": Python's $ also
                    # matches before a final line break
                    "pattern": "^(?:[!-~]+(?:[ \\t]+[!-~]+)*)?$(?!\\n)",
                    "x-expected": (
                        "a header value of printable ASCII characters (spaces and tabs "
                        "only between them)"
                    ),
                },
            },
        },
        required=["url", "verb"],
    )
    trigger = vocab.TRIGGER_LABELS[event]
    return _object(
        {
            "kind": _one_of("Webhook"),
            "trigger": _one_of(trigger, expected=f"{trigger} (implied by its position)"),
            "params": params,
        },
        required=["params"],
    )


def _actions_list(event: str) -> dict:
    return _array(_action(event), LIMITS["actions_per_list"])


_TASK = _object(
    {
        "id": _text(LIMITS["local_id_chars"]),
        "name": _text(LIMITS["name_chars"]),
        "kind": _text(LIMITS["kind_chars"]),
        "timeout": _int(*vocab.TIMEOUT_SECONDS),
        "priority": _int(*vocab.PRIORITY_RANGE),
        "expected_count": _int(0, LIMITS["expected_count"]),
        "metadata": {"type": "object"},
        "on_start": _action("start"),
        **{field: _actions_list(event) for field, event in _ACTION_LISTS.items()},
        "dependencies": {
            "type": "array",
            "maxItems": LIMITS["dependencies"],
            "items": _object(
                {"id": _text(LIMITS["local_id_chars"]), "requires_success": {"type": "boolean"}},
                required=["id"],
            ),
        },
        "rules": _array({"type": "object"}, LIMITS["rules"]),
        "dedupe_strategy": _array(_MATCHER, LIMITS["dedupe_matchers"]),
        "retry": _object(
            {
                "max_attempts": _int(*vocab.MAX_ATTEMPTS_RANGE),
                "backoff_seconds": _number(*vocab.BACKOFF_SECONDS_RANGE),
                "backoff_max_seconds": _number(*vocab.BACKOFF_SECONDS_RANGE),
            }
        ),
        "not_before": {"type": "string", "maxLength": 64},
        "delay_seconds": _number(*vocab.DELAY_SECONDS_RANGE),
        "dead_end_barrier": {"type": "boolean"},
    },
    required=["id", "name", "kind", "on_start"],
)
_BATCH = {"type": "array", "minItems": 1, "maxItems": LIMITS["batch_tasks"], "items": _TASK}
_PATCH = _object(
    {
        "status": _one_of(*vocab.REPORTED_STATUS_LABELS),
        "new_success": _COUNT,
        "new_failures": _COUNT,
        "metadata": {"type": "object"},
        "failure_reason": _text(LIMITS["failure_reason_chars"]),
        "retryable": {"type": "boolean"},
        "expected_count": _int(0, LIMITS["expected_count"]),
        "priority": _int(*vocab.PRIORITY_RANGE),
    }
)
_COUNTERS = _object({"new_success": _COUNT, "new_failures": _COUNT})
_PUT_ITEM = _object(
    {"task_id": _UUID, "new_success": _COUNT, "new_failures": _COUNT}, required=["task_id"]
)
_PUT_BATCH = {"type": "array", "maxItems": LIMITS["batch_tasks"], "items": _PUT_ITEM}
_BATCH_RULES = _object(
    {"kind": _text(LIMITS["kind_chars"]), "rules": _array({"type": "object"}, LIMITS["rules"])},
    required=["kind", "rules"],
)

# The request schemas by name (the OpenAPI document reuses them, taskrunner/api/openapi.py)
SCHEMAS: dict[str, dict] = {
    "batch": _BATCH,
    "rule": _RULE_BODY,
    "capacity_rule": _CAPACITY_BODY,
    "rate_limit_rule": _RATE_LIMIT_BODY,
    "patch": _PATCH,
    "counters": _COUNTERS,
    "put_item": _PUT_ITEM,
    "put_batch": _PUT_BATCH,
    # the cancel actions a start webhook's response registers: the same as on_cancel
    "cancel_actions": _actions_list("cancel"),
    "batch_rules": _BATCH_RULES,
}
# Schemas are checked in two passes. The fast one (fastjsonschema, compiled to Python code)
# says yes or no: POST /task spent ~80% of its time in jsonschema (docs/performance.md S5).
# Only a "no" goes on to jsonschema, which words every error, and only where the fast pass
# points (_Finder). The schemas use only keywords both libraries read alike
# (tests/test_validation_fast_path.py checks the fast path is never more permissive).
_FAST: dict[int, tuple[dict, Any]] = {}  # id(schema) -> (schema, compiled check)
_SLOW: dict[int, tuple[dict, Draft202012Validator]] = {}
_SHALLOW: dict[int, tuple[dict, dict]] = {}  # id(schema) -> (schema, its shallow form)


def _passes(schema: dict, instance: Any) -> bool:
    """The fast yes/no (compiled on first use; schemas are module constants)."""
    if id(schema) not in _FAST:
        _FAST[id(schema)] = (schema, fastjsonschema.compile(schema))
    try:
        _FAST[id(schema)][1](instance)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


# compiled at import, not on a request (the nested schemas compile when first needed)
for _schema in SCHEMAS.values():
    _passes(_schema, None)


def _slow(schema: dict) -> Draft202012Validator:
    if id(schema) not in _SLOW:
        _SLOW[id(schema)] = (schema, Draft202012Validator(schema))
    return _SLOW[id(schema)][1]


def _shallow(schema: dict) -> dict:
    """The schema without what it says about its children: the container's own rules
    (type, size, required and unknown keys, key names)."""
    if id(schema) not in _SHALLOW:
        out = {k: v for k, v in schema.items() if k != "items"}
        if "properties" in out:
            out["properties"] = dict.fromkeys(out["properties"], {})
        if isinstance(out.get("additionalProperties"), dict):
            out["additionalProperties"] = True
        _SHALLOW[id(schema)] = (schema, out)
    return _SHALLOW[id(schema)][1]


def _children(schema: dict, instance: Any) -> list[tuple[dict, Any, Any]] | None:
    """``(schema, value, key)`` of each child the schema describes; None for a leaf."""
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [(schema["items"], v, i) for i, v in enumerate(instance)]
    if isinstance(instance, dict) and "properties" in schema:
        properties = schema["properties"]
        return [(properties[k], v, k) for k, v in instance.items() if k in properties]
    if isinstance(instance, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [(schema["additionalProperties"], v, k) for k, v in instance.items()]
    return None


class _Finder:
    """Where an instance breaks a schema, at a cost bounded by the fast pass.

    It descends only into the parts the fast pass refuses, words (with jsonschema) only a
    container's own rules and the failing leaves, never looks inside a container that is
    already too big, and once ``budget`` problems are worded it only counts further
    failing places (``"<path>: invalid"``, beyond what Invalid lists), so a large invalid
    body costs about what a valid one does (issue 13.11).
    """

    _SIZE_RULES = frozenset({"maxItems", "maxProperties"})

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.found: dict[str, None] = {}

    def check(self, schema: dict, instance: Any, path: list[Any]) -> None:
        if _passes(schema, instance):
            return
        children = _children(schema, instance)
        if len(self.found) >= self.budget:
            self._count(schema, instance, path, children)
            return
        own = schema if children is None else _shallow(schema)
        errors = list(_slow(own).iter_errors(instance))
        for error in errors:
            self.found.update(dict.fromkeys(_messages(error, path)))
        if children is None or any(e.validator in self._SIZE_RULES for e in errors):
            return
        for child_schema, value, key in children:
            self.check(child_schema, value, [*path, key])

    def _count(self, schema: dict, instance: Any, path: list[Any], children: list | None) -> None:
        if children is None or not _passes(_shallow(schema), instance):
            self.found[f"{path_text(path)}: invalid"] = None
            return
        for child_schema, value, key in children:
            self.check(child_schema, value, [*path, key])


# -- error messages --------------------------------------------------------------------

_TYPE_NAMES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "boolean": "true or false",
    "number": "a number",
}


def path_text(path: Iterable[Any]) -> str:
    """``[2, "dependencies", 0, "id"]`` -> ``[2].dependencies[0].id`` (root: ``body``)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _problem(error: ValidationError) -> str:
    """What is wrong, in words a client can act on."""
    kind, value, schema = error.validator, error.validator_value, error.schema
    if kind == "type":
        names = [value] if isinstance(value, str) else value
        return "must be " + " or ".join(_TYPE_NAMES.get(n, n) for n in names)
    if kind == "pattern":
        return f"must be {schema['x-expected']}"
    messages = {
        "minimum": f"must be at least {value}",
        "maximum": f"must be at most {value}",
        "minLength": "must not be empty",
        "maxLength": f"must be at most {value} characters",
        "minItems": "must not be empty",
        "maxItems": f"must have at most {value} items",
        "maxProperties": f"must have at most {value} entries",
        "uniqueItems": "must not repeat a value",
    }
    return messages.get(kind, error.message)


def _messages(error: ValidationError, base: Sequence[Any]) -> list[str]:
    path = [*base, *error.absolute_path]
    if error.validator == "required":
        return [
            f"{path_text([*path, p])}: is required"
            for p in error.validator_value
            if p not in error.instance
        ]
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        return [f"{path_text([*path, k])}: unknown field" for k in error.instance if k not in known]
    return [f"{path_text(path)}: {_problem(error)}"]


def schema_errors(name: str, instance: Any, base: Sequence[Any] = ()) -> list[str]:
    """The problems the named schema finds, as details (duplicates removed): the first
    ``reported_errors`` worded, the rest only counted (see ``_Finder``)."""
    finder = _Finder(LIMITS["reported_errors"])
    finder.check(SCHEMAS[name], instance, list(base))
    return list(finder.found)


# -- small checks shared by the request types --------------------------------------------


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


def _drop_task_nulls(task: Any) -> Any:
    """A task without its null fields, nor nulls inside ``retry``."""
    task = _drop_nulls(task)
    if isinstance(task, dict) and isinstance(task.get("retry"), dict):
        task = {**task, "retry": _drop_nulls(task["retry"])}
    return task


def _metadata_errors(metadata: Mapping | None, path: Sequence[Any]) -> list[str]:
    if metadata is None:
        return []
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > LIMITS["metadata_bytes"]:
        return [
            f"{path_text(path)}: must be at most {LIMITS['metadata_bytes']} bytes "
            f"as JSON (is {size})"
        ]
    return []


def parse_uuid(value: str) -> str | None:
    """The canonical text of a UUID, or None when ``value`` is not one."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


# -- POST /task --------------------------------------------------------------------------


def _rule(raw: dict, base: list[Any]) -> tuple[dict | None, list[Any], list[str]]:
    """One rule in any accepted form -> (normalised rule, path of its body, errors). The
    checks that need the task (its kind, metadata, expected_count) are ``_rule_task_errors``."""
    if "type" in raw:
        tag = raw["type"]
        name = _RULE_NAMES.get(tag.lower()) if isinstance(tag, str) else None
        if name is None:
            return (
                None,
                base,
                [f"{path_text([*base, 'type'])}: must be Concurency, Capacity or RateLimit"],
            )
        body, body_path = {k: v for k, v in raw.items() if k != "type"}, base
    elif len(raw) == 1 and next(iter(raw)).lower() in _RULE_NAMES:
        key = next(iter(raw))
        name = _RULE_NAMES[key.lower()]
        body, body_path = raw[key], [*base, key]
    else:
        return None, base, [f"{path_text(base)}: must be {_RULE_FORMS}"]
    errors = schema_errors(_RULE_SCHEMAS[name], body, body_path)
    if errors:
        return None, body_path, errors
    matcher = body["matcher"]
    common = {"kind": matcher["kind"], "fields": matcher.get("fields", [])}
    if name == "RateLimit":
        rule = {"type": "rate_limit", **common, "max": body["max_starts"]}
        return {**rule, "per_seconds": body["per_seconds"]}, body_path, []
    status = matcher["status"].lower()
    if name == "Capacity":
        if status != "running":
            at = path_text([*body_path, "matcher", "status"])
            return None, body_path, [f"{at}: must be Running (capacity counts running tasks)"]
        return (
            {"type": "capacity", **common, "status": status, "max": body["max_capacity"]},
            body_path,
            [],
        )
    limits = [body[k] for k in _MAX_KEYS if k in body]
    if len(limits) != 1:
        problem = "is required" if not limits else "give max_concurency only once"
        return None, body_path, [f"{path_text([*body_path, 'max_concurency'])}: {problem}"]
    return {**common, "status": status, "max": int(limits[0])}, body_path, []


def _rule_task_errors(
    rule: dict, kind: str, expected_count: int | None, rule_path: list[Any], task_path: list[Any]
) -> list[str]:
    """What a rule asks of the task that carries it: a Capacity rule, an expected_count; a
    RateLimit, the task's own kind (it counts the starts of the tasks that carry it)."""
    if rule.get("type") == "capacity" and expected_count is None:
        return [
            f"{path_text([*task_path, 'expected_count'])}: is required by the Capacity rule "
            f"{path_text(rule_path)}"
        ]
    if rule.get("type") == "rate_limit" and rule["kind"] != kind:
        return [
            f"{path_text([*rule_path, 'matcher', 'kind'])}: must be the task's kind '{kind}' "
            "(a RateLimit counts the starts of the tasks that carry it)"
        ]
    return []


def _rule_field_errors(rule: dict, metadata: Mapping, matcher_path: list[Any]) -> list[str]:
    errors = []
    for k, field in enumerate(rule["fields"]):
        at = path_text([*matcher_path, "matcher", "fields", k])
        if field not in metadata:
            errors.append(f"{at}: '{field}' is missing from the task's metadata")
        elif not _is_scalar(metadata[field]):
            errors.append(f"{at}: metadata '{field}' must be a string, number or boolean")
    return errors


def _url_errors(url: str, path: list[Any], policy: Policy | None) -> list[str]:
    """The URL as httpx (which the worker sends with) reads it; then the SSRF problems
    that show without DNS (the worker checks again, after resolving, before connecting)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        return [f"{path_text(path)}: must be an absolute http or https URL"]
    problem = policy.static_problem(url) if policy else None
    return [f"{path_text(path)}: blocked: {problem}"] if problem else []


def _actions(task: dict, i: int, policy: Policy | None) -> tuple[list[dict], list[str]]:
    """All actions of a task in the create_batch form, with URL problems."""
    placed = [("start", task["on_start"], [i, "on_start"])]
    for key, event in _ACTION_LISTS.items():
        placed += [(event, a, [i, key, j]) for j, a in enumerate(task.get(key, []))]
    return _normalised_actions(placed, policy)


def _normalised_actions(
    placed: Iterable[tuple[str, dict, list[Any]]], policy: Policy | None
) -> tuple[list[dict], list[str]]:
    """Shape-valid ``(event, action, path)`` -> the create_batch form, with URL problems."""
    actions, errors = [], []
    for event, action, path in placed:
        params = _drop_nulls(action["params"])
        errors += _url_errors(params["url"], [*path, "params", "url"], policy)
        actions.append(
            {
                "event": event,
                "url": params["url"],
                "verb": params["verb"].upper(),
                "body": params.get("body"),
                "headers": params.get("headers", {}),
            }
        )
    return actions, errors


def cancel_actions_input(entries: Any, policy: Policy | None = None) -> list[dict]:
    """The cancel actions a start webhook's response registers -> the ``cancel_actions``
    form of ``finish_deliveries`` (``{url, verb, body, headers}``).

    The same rules as a task's ``on_cancel`` at creation (count, URL, verb, headers), by
    the same code; raises Invalid (paths are positions in the response).
    """
    errors = schema_errors("cancel_actions", entries)
    if errors:
        raise Invalid(errors)
    placed = [("cancel", action, [j]) for j, action in enumerate(entries)]
    actions, errors = _normalised_actions(placed, policy)
    if errors:
        raise Invalid(errors)
    return [{k: v for k, v in a.items() if k != "event"} for a in actions]


def _dependencies(task: dict, i: int, local_ids: Mapping[str, int]) -> tuple[list, list[str]]:
    """Dependencies in the create_batch form: a local id of the batch or a task UUID."""
    deps, errors, seen = [], [], set()
    for j, dep in enumerate(task.get("dependencies", [])):
        ref, at = dep["id"], path_text([i, "dependencies", j, "id"])
        requires_success = dep.get("requires_success", True)
        task_id = None if ref in local_ids else parse_uuid(ref)
        key = ref if ref in local_ids else task_id
        if ref == task["id"]:
            errors.append(f"{at}: a task cannot depend on itself")
        elif key is None:
            errors.append(f"{at}: unknown local id '{ref}'")
        elif key in seen:
            errors.append(f"{at}: duplicate dependency on '{ref}'")
        elif task_id is None:
            deps.append({"local_id": ref, "requires_success": requires_success})
        else:
            deps.append({"task_id": task_id, "requires_success": requires_success})
        seen.add(key)
    return deps, errors


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle ``[a, b, a]`` (a depends on b, b on a) or None; iterative, so a
    10,000-long chain is fine. Kahn's algorithm strips every task that is not on or behind
    a cycle; every remaining task depends on another remaining one, so walking those
    links must revisit a task."""
    dependents: dict[str, list[str]] = {}
    waiting = {node: 0 for node in edges}
    for child, parents in edges.items():
        for parent in parents:
            dependents.setdefault(parent, []).append(child)
            waiting[child] += 1
    ready = [node for node, n in waiting.items() if n == 0]
    while ready:
        for child in dependents.get(ready.pop(), []):
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    remaining = {node for node, n in waiting.items() if n > 0}
    if not remaining:
        return None
    walk, position = [], {}
    node = min(remaining)
    while node not in position:
        position[node] = len(walk)
        walk.append(node)
        node = next(p for p in edges[node] if p in remaining)
    return [*walk[position[node] :], node]


def _retry(task: dict, i: int, default_max_attempts: int) -> tuple[dict, list[str]]:
    """The task's retry settings with defaults filled in; the backoff cap must not be
    below the first backoff."""
    given = task.get("retry", {})
    # a default never contradicts the other field given: a lone cap lowers the first
    # backoff to it, a lone first backoff raises the cap to it
    first = given.get(
        "backoff_seconds",
        min(vocab.DEFAULT_BACKOFF_SECONDS, given.get("backoff_max_seconds", math.inf)),
    )
    retry = {
        "max_attempts": int(given.get("max_attempts", default_max_attempts)),
        "backoff_seconds": first,
        "backoff_max_seconds": given.get(
            "backoff_max_seconds", max(vocab.DEFAULT_BACKOFF_MAX_SECONDS, first)
        ),
    }
    if retry["backoff_max_seconds"] < retry["backoff_seconds"]:
        return retry, [
            f"[{i}].retry.backoff_max_seconds: must be at least backoff_seconds "
            f"({retry['backoff_seconds']})"
        ]
    return retry, []


def _schedule(task: dict, i: int) -> tuple[dict, list[str]]:
    """``not_before`` (RFC 3339, with an offset) or ``delay_seconds``, not both."""
    if "not_before" in task and "delay_seconds" in task:
        return {}, [f"[{i}].delay_seconds: not allowed with not_before (give one of them)"]
    if "delay_seconds" in task:
        return {"delay_seconds": task["delay_seconds"]}, []
    if "not_before" not in task:
        return {}, []
    try:
        value = dt.datetime.fromisoformat(task["not_before"].upper())
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        return {}, [
            f"[{i}].not_before: must be an RFC 3339 date-time with an offset, "
            "e.g. 2026-11-28T14:00:00Z"
        ]
    return {"not_before": value.isoformat()}, []


def _task(
    task: dict,
    i: int,
    local_ids: Mapping[str, int],
    policy: Policy | None,
    default_max_attempts: int = vocab.DEFAULT_MAX_ATTEMPTS,
) -> tuple[dict, list[str]]:
    """Normalise one shape-valid task; cross-field problems come back as details."""
    metadata = task.get("metadata", {})
    errors = _metadata_errors(metadata, [i, "metadata"])
    rules = []
    for j, raw in enumerate(task.get("rules", [])):
        rule, rule_path, _ = _rule(raw, [i, "rules", j])
        errors += _rule_field_errors(rule, metadata, rule_path)
        errors += _rule_task_errors(rule, task["kind"], task.get("expected_count"), rule_path, [i])
        rules.append(rule)
    actions, action_errors = _actions(task, i, policy)
    deps, dep_errors = _dependencies(task, i, local_ids)
    retry, retry_errors = _retry(task, i, default_max_attempts)
    schedule, schedule_errors = _schedule(task, i)
    dedupe = [
        {"kind": m["kind"], "status": m["status"].lower(), "fields": m.get("fields", [])}
        for m in task.get("dedupe_strategy", [])
    ]
    normalised = {
        "local_id": task["id"],
        "name": task["name"],
        "kind": task["kind"],
        "timeout": int(task.get("timeout", vocab.DEFAULT_TIMEOUT_SECONDS)),
        "priority": int(task.get("priority", vocab.DEFAULT_PRIORITY)),
        "metadata": metadata,
        "rules": rules,
        "dedupe": dedupe,
        "actions": actions,
        "dependencies": deps,
        "retry": retry,
        **schedule,
        "dead_end_barrier": task.get("dead_end_barrier", False),
    }
    if "expected_count" in task:
        normalised["expected_count"] = int(task["expected_count"])
    return normalised, errors + action_errors + dep_errors + retry_errors + schedule_errors


def _shape_errors(tasks: Any) -> list[str]:
    errors = schema_errors("batch", tasks)
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        rules = task.get("rules") if isinstance(task, dict) else None
        for j, raw in enumerate(rules if isinstance(rules, list) else []):
            if isinstance(raw, dict):
                errors += _rule(raw, [i, "rules", j])[2]
    return errors


def _local_ids(tasks: list[dict]) -> tuple[dict[str, int], list[str]]:
    first: dict[str, int] = {}
    errors = []
    for i, task in enumerate(tasks):
        local_id = task["id"]
        if local_id in first:
            errors.append(
                f"[{i}].id: duplicate local id '{local_id}' (first used by [{first[local_id]}])"
            )
        else:
            first[local_id] = i
    return first, errors


def batch_input(
    body: Any,
    policy: Policy | None = None,
    default_max_attempts: int = vocab.DEFAULT_MAX_ATTEMPTS,
) -> list[dict]:
    """POST /task body -> the ``create_batch`` input (see docs/sql.md); raises Invalid.
    With ``policy``, webhook URLs that it refuses outright are errors too. A task without
    ``retry.max_attempts`` gets ``default_max_attempts`` (TASK_RETRY_MAX_ATTEMPTS)."""
    tasks = [_drop_task_nulls(t) for t in body] if isinstance(body, list) else body
    errors = _shape_errors(tasks)
    if errors:
        raise Invalid(errors)
    local_ids, errors = _local_ids(tasks)
    normalised = []
    for i, task in enumerate(tasks):
        entry, task_errors = _task(task, i, local_ids, policy, default_max_attempts)
        normalised.append(entry)
        errors += task_errors
    if not errors:
        cycle = find_cycle(
            {
                t["local_id"]: [d["local_id"] for d in t["dependencies"] if "local_id" in d]
                for t in normalised
            }
        )
        if cycle:
            errors.append(f"[{local_ids[cycle[0]]}].dependencies: cycle " + " -> ".join(cycle))
    if errors:
        raise Invalid(errors)
    return normalised


# -- PATCH /task/{id}, PUT /task, GET /task ------------------------------------------------


def _optional_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def update_input(body: Any) -> dict:
    """PATCH /task/{id} body -> the parameters of the ``update_task`` query."""
    body = _drop_nulls(body)
    errors = schema_errors("patch", body)
    if errors:
        raise Invalid(errors)
    status = body.get("status", "").lower() or None
    # failure_reason iff Failure: update_task owns that rule (a TR400 the API shows as 400)
    reason = body.get("failure_reason")
    errors = _metadata_errors(body.get("metadata"), ["metadata"])
    if errors:
        raise Invalid(errors)
    metadata = body.get("metadata")
    return {
        "status": status,
        "new_success": _optional_int(body.get("new_success")),
        "new_failures": _optional_int(body.get("new_failures")),
        "metadata": None if metadata is None else json.dumps(metadata),
        "failure_reason": reason,
        # true/false only with Failure: update_task owns that rule too
        "retryable": body.get("retryable"),
        "expected_count": _optional_int(body.get("expected_count")),
        "priority": _optional_int(body.get("priority")),
    }


def counter_updates(body: Any, task_id: str | None = None) -> list[tuple[str, int, int]]:
    """PUT /task body (one object or an array), or PUT /task/{id} body with ``task_id``
    from the path -> ``[(task_id, new_success, new_failures), ...]``."""
    if task_id is not None:
        items = [_drop_nulls(body)]
        errors = schema_errors("counters", items[0])
    elif isinstance(body, list):
        items = [_drop_nulls(b) for b in body]
        errors = schema_errors("put_batch", items)
    elif isinstance(body, dict):
        items = [_drop_nulls(body)]
        errors = schema_errors("put_item", items[0])
    else:
        errors = ["body: must be an object or an array of objects"]
    if errors:
        raise Invalid(errors)
    return [
        (
            task_id or parse_uuid(item["task_id"]),
            int(item.get("new_success", 0)),
            int(item.get("new_failures", 0)),
        )
        for item in items
    ]


def _query_int(
    params: Mapping[str, str], name: str, default: int, low: int, high: int
) -> tuple[int, list[str]]:
    raw = params.get(name)
    if raw is None or raw == "":
        return default, []
    try:
        value = int(raw)
    except ValueError:
        return default, [f"{name}: must be an integer"]
    if not low <= value <= high:
        return default, [f"{name}: must be between {low} and {high}"]
    return value, []


def _metadata_filter(raw: str | None) -> tuple[str | None, list[str]]:
    if not raw:
        return None, []
    if len(raw.encode()) > LIMITS["metadata_bytes"]:
        return None, [f"metadata: must be at most {LIMITS['metadata_bytes']} bytes"]
    try:
        value = json.loads(raw)
    except ValueError:
        return None, ["metadata: must be a JSON object"]
    if not isinstance(value, dict):
        return None, ["metadata: must be a JSON object"]
    return json.dumps(value), []


def _common_filters(params: Mapping[str, str], statuses: Sequence[str]) -> tuple[dict, list[str]]:
    """What GET /task and GET /batches share: ``page`` (0-based), ``per_page`` (alias
    ``page_size``) -> ``limit``/``offset``; ``status``; the ``kind`` and ``name`` texts."""
    page, errors = _query_int(params, "page", 0, 0, LIMITS["page"])
    size_name = "per_page" if "per_page" in params else "page_size"
    per_page, size_errors = _query_int(params, size_name, DEFAULT_PER_PAGE, 1, LIMITS["per_page"])
    errors += size_errors
    status = params.get("status") or None
    if status is not None and status.capitalize() not in statuses:
        errors.append(f"status: must be one of {', '.join(statuses)}")
    for name in ("kind", "name"):
        value = params.get(name) or ""
        if len(value) > LIMITS["filter_chars"]:
            errors.append(f"{name}: must be at most {LIMITS['filter_chars']} characters")
        elif "\x00" in value:
            errors.append(f"{name}: must not contain NUL characters")
    filters = {
        "status": status.lower() if status else None,
        "kind": params.get("kind") or None,
        "name": params.get("name") or None,
        "limit": per_page,
        "offset": page * per_page,
    }
    return filters, errors


def list_filters(params: Mapping[str, str]) -> dict:
    """GET /task query string -> the parameters of the ``list_tasks`` query."""
    filters, errors = _common_filters(params, vocab.STATUS_LABELS)
    metadata, metadata_errors = _metadata_filter(params.get("metadata"))
    errors += metadata_errors
    batch_id = params.get("batch_id") or None
    if batch_id is not None and parse_uuid(batch_id) is None:
        errors.append("batch_id: must be a UUID")
    if errors:
        raise Invalid(errors)
    return {**filters, "batch_id": batch_id, "metadata": metadata}


# -- the batch routes (taskrunner/api/batches.py) ----------------------------------------

# GET /batches?status=: a task status, or Claimed (running, start not yet acknowledged)


def _time_filter(params: Mapping[str, str], name: str) -> tuple[dt.datetime | None, list[str]]:
    raw = params.get(name) or None
    if raw is None:
        return None, []
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None, [f"{name}: must be an ISO 8601 date-time, e.g. 2026-11-27T14:00:00Z"]
    # a time without an offset is UTC (never the server's time zone)
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)), []


def batch_list_filters(params: Mapping[str, str]) -> dict:
    """GET /batches query string -> the parameters of the ``list_batches`` query."""
    filters, errors = _common_filters(params, vocab.BATCH_STATUS_LABELS)
    after, after_errors = _time_filter(params, "created_after")
    before, before_errors = _time_filter(params, "created_before")
    errors += after_errors + before_errors
    if errors:
        raise Invalid(errors)
    return {**filters, "created_after": after, "created_before": before}


def batch_rules_input(body: Any) -> dict:
    """PATCH /batch/{id}/rules body -> ``{kind, rules}`` with the rules normalised as at
    creation (either rule form; the metadata fields are checked by ``set_batch_rules``,
    which sees each task's metadata)."""
    body = _drop_nulls(body)
    errors = schema_errors("batch_rules", body)
    if errors:
        raise Invalid(errors)
    rules = []
    for j, raw in enumerate(body["rules"]):
        rule, rule_path, rule_errors = _rule(raw, ["rules", j])
        # a Capacity rule's expected_count is checked by set_batch_rules (it sees the tasks)
        errors += rule_errors or _rule_task_errors(rule, body["kind"], 0, rule_path, [])
        rules.append(rule)
    if errors:
        raise Invalid(errors)
    return {"kind": body["kind"], "rules": rules}


def problems_filters(params: Mapping[str, str]) -> dict:
    """GET /problems query string -> ``batch_id`` (optional) and ``limit`` (rows per list)."""
    limit, errors = _query_int(params, "limit", DEFAULT_PER_PAGE, 1, LIMITS["per_page"])
    batch_id = params.get("batch_id") or None
    if batch_id is not None and parse_uuid(batch_id) is None:
        errors.append("batch_id: must be a UUID")
    if errors:
        raise Invalid(errors)
    return {"batch_id": batch_id, "limit": limit}
