"""The compiled (fastjsonschema) fast path never accepts what jsonschema rejects."""

from __future__ import annotations

import copy

import pytest

from taskrunner.api import validation

VALID_TASK = {
    "id": "a",
    "name": "A",
    "kind": "k",
    "timeout": 60,
    "priority": 1,
    "metadata": {"tenant": "t1"},
    "on_start": {
        "kind": "Webhook",
        "trigger": "Start",
        "params": {"url": "http://example.com/x", "verb": "Post", "headers": {"X-A": "1"}},
    },
    "on_success": [{"kind": "webhook", "params": {"url": "http://example.com/y", "verb": "GET"}}],
    "dependencies": [{"id": "b", "requires_success": False}],
    "rules": [
        {
            "Concurency": {
                "matcher": {"kind": "k", "status": "Running", "fields": ["tenant"]},
                "max_concurency": 2,
            }
        }
    ],
}

MUTATIONS = [
    ("timeout", 0),
    ("timeout", 86401),
    ("timeout", 1.5),
    ("timeout", True),
    ("timeout", "60"),
    ("priority", 1001),
    ("name", ""),
    ("name", "x" * 201),
    ("kind", 5),
    ("metadata", []),
    ("on_start", None),
    ("on_start", []),
    ("on_start", {"kind": "Webhook"}),
    ("on_start", {"kind": "Mail", "params": {"url": "http://e.com", "verb": "Post"}}),
    ("on_start", {"kind": "Webhook", "params": {"url": "http://e.com", "verb": "Fetch"}}),
    (
        "on_start",
        {
            "kind": "Webhook",
            "params": {"url": "http://e.com", "verb": "Post", "headers": {"bad name": "v"}},
        },
    ),
    (
        "on_start",
        {
            "kind": "Webhook",
            "params": {"url": "http://e.com", "verb": "Post", "headers": {"X": "a\rb"}},
        },
    ),
    ("on_success", {}),
    ("dependencies", [{"requires_success": True}]),
    ("dependencies", [{"id": 5}]),
    ("extra", 1),
]


def _accepts(name: str, instance) -> tuple[bool, bool]:
    schema = validation.SCHEMAS[name]
    fast = validation._passes(schema, instance)
    slow = validation._slow(schema).is_valid(instance)
    return fast, slow


def test_valid_batch_passes_both():
    assert _accepts("batch", [VALID_TASK]) == (True, True)


@pytest.mark.parametrize(("field", "value"), MUTATIONS)
def test_fast_path_is_never_more_permissive(field, value):
    task = copy.deepcopy(VALID_TASK)
    task[field] = value
    fast, slow = _accepts("batch", [task])
    assert not slow, "the mutation should be invalid"
    assert not fast, "the fast path accepted what jsonschema rejects"
