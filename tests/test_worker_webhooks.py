"""The pure parts of webhook handling: request building, start responses, retry delays."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from taskrunner.api.validation import Invalid
from taskrunner.config import Config
from taskrunner.worker import webhooks
from taskrunner.worker.retrypolicy import retry_delay_ms
from taskrunner.worker.webhooks import (
    WorkItem,
    build_request,
    parse_cancel_actions,
    with_handle,
)

TASK_ID = uuid.UUID("00000000-0000-0000-0000-0000000000aa")
DELIVERY_ID = uuid.UUID("00000000-0000-0000-0000-0000000000dd")


def item(**fields) -> WorkItem:
    values = {
        "delivery_id": DELIVERY_ID,
        "task_id": TASK_ID,
        "event": "start",
        "attempt": 1,
        "url": "http://remote.test/hook",
        "verb": "POST",
        "body": None,
        "headers": {},
    } | fields
    return WorkItem(**values)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://r.test/hook", "http://r.test/hook?handle=H%2Ftask%2F1"),
        ("http://r.test/hook?a=1&a=2&b=", "http://r.test/hook?a=1&a=2&b=&handle=H%2Ftask%2F1"),
        (
            "https://r.test:8443/p?x=%20y#frag",
            "https://r.test:8443/p?x=+y&handle=H%2Ftask%2F1#frag",
        ),
    ],
)
def test_handle_is_added_and_existing_params_kept(url, expected):
    assert with_handle(url, "H/task/1") == expected


@pytest.mark.parametrize(
    ("event", "trigger"),
    [("start", "Start"), ("success", "End"), ("failure", "End"), ("cancel", "Cancel")],
)
def test_request_names_its_trigger_and_our_headers_win(event, trigger):
    headers = {"X-Task-Id": "spoofed", "Authorization": "Bearer t", "X-Count": 3}
    request = build_request(
        httpx.AsyncClient(), item(event=event, verb="patch", headers=headers), "http://h"
    )
    assert request.method == "PATCH"
    assert request.headers["X-Task-Trigger"] == trigger
    assert request.headers["X-Task-Id"] == str(TASK_ID)
    assert request.headers["Idempotency-Key"] == str(DELIVERY_ID)
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["X-Count"] == "3"
    assert request.url.params["handle"] == f"http://h/task/{TASK_ID}"


def test_request_body_is_json_only_when_given():
    with_body = build_request(httpx.AsyncClient(), item(body={"a": [1]}), "http://h")
    without = build_request(httpx.AsyncClient(), item(body=None), "http://h")
    assert json.loads(with_body.content) == {"a": [1]}
    assert without.content == b""
    assert "content-type" not in without.headers


def action(url="http://r.test/cancel", verb="delete", **extra) -> dict:
    return {"kind": "webhook", "params": {"url": url, "verb": verb, **extra}}


def test_a_single_action_is_normalised():
    body = json.dumps(action(body={"why": "user"}, headers={"A": "b"}) | {"trigger": "CANCEL"})
    assert parse_cancel_actions(body.encode(), TASK_ID) == [
        {
            "url": "http://r.test/cancel",
            "verb": "DELETE",
            "body": {"why": "user"},
            "headers": {"A": "b"},
        }
    ]


def test_entries_that_are_not_webhook_actions_are_ignored():
    entries = [
        action(url="http://r.test/1"),
        {"kind": "Email", "params": {"url": "http://r.test/2", "verb": "POST"}},
        "not an object",
        {"status": "ok"},
        action(url="http://r.test/4", verb="Post"),
    ]
    parsed = parse_cancel_actions(json.dumps(entries).encode(), TASK_ID)
    assert [(a["url"], a["verb"]) for a in parsed] == [
        ("http://r.test/1", "DELETE"),
        ("http://r.test/4", "POST"),
    ]


def test_one_invalid_webhook_action_refuses_them_all():
    """Checked like on_cancel at creation (issue 13.8): every problem named, none kept.
    (These entries used to be skipped one by one and the rest registered.)"""
    entries = [
        action(url="http://r.test/1"),
        action(verb="TRACE"),
        action(headers=["not", "an", "object"]),
        action() | {"trigger": "End"},
        {"kind": "Webhook"},
    ]
    with pytest.raises(Invalid) as raised:
        parse_cancel_actions(json.dumps(entries).encode(), TASK_ID)
    assert raised.value.details == [
        "[1].params.verb: must be one of Get, Post, Put, Patch, Delete",
        "[2].params.headers: must be an object",
        "[3].trigger: must be Cancel (implied by its position)",
        "[4].params: is required",
    ]


@pytest.mark.parametrize("body", [b"started", b'{"status": "ok"}', b"[]", b"42", b"null"])
def test_bodies_without_actions_give_none(body):
    assert parse_cancel_actions(body, TASK_ID) is None


def test_retry_delay_grows_with_full_jitter_and_stops_at_max_attempts():
    config = Config(webhook_max_attempts=5, webhook_backoff_base=0.5, webhook_backoff_max=1.5)
    for attempt, cap_ms in [(1, 500), (2, 1000), (3, 1500), (4, 1500)]:
        delays = [retry_delay_ms(attempt, config) for _ in range(300)]
        assert all(1 <= d <= cap_ms for d in delays)
        assert max(delays) > cap_ms * 0.8  # jitter spreads over the whole range
        assert min(delays) < cap_ms * 0.2
    assert retry_delay_ms(5, config) is None
    assert retry_delay_ms(6, config) is None


def test_a_header_value_httpx_cannot_encode_fails_the_attempt_for_good():
    """A stored header the worker cannot send (the API refuses them now; older rows may
    hold one): the attempt fails with the reason and is not retried -- nothing escapes
    the webhook call."""

    async def attempt() -> webhooks.WebhookResult:
        async with httpx.AsyncClient() as client:
            return await webhooks.call(client, item(headers={"X-A": "caf\u00e9"}), Config())

    result = asyncio.run(attempt())

    assert result.ok is False and result.retryable is False
    assert result.error.startswith("invalid request: UnicodeEncodeError: "), result.error


def test_cancel_actions_holding_nul_are_refused():
    body = json.dumps(
        {
            "kind": "Webhook",
            "params": {"url": "http://r.test/", "verb": "Post", "body": {"x": "\u0000"}},
        }
    )

    with pytest.raises(ValueError, match="NUL"):
        webhooks.start_response_actions(body.encode(), TASK_ID)
    assert webhooks.describe_exception(ValueError("a\x00b\nsecond line")) == "ValueError: a\\u0000b"
