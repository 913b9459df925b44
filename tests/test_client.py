"""taskrunner.client against a real API and worker (``procs.service``): every route through
the sync and the asyncio client, errors with the server's details, paging, the builder's
cycle refusal, and which calls are retried (against a real HTTP server that answers 503
or drops the connection)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from procs import Reply, Sink, free_port, service, wait_for

from taskrunner.client import (
    AsyncClient,
    BadRequest,
    Batch,
    Client,
    Conflict,
    CycleError,
    NotFound,
    RetryPolicy,
    Unavailable,
    Unreachable,
    concurrency,
    webhook,
)

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)


class Sync:
    """Runs a client method by name: the scenario below is written once for both clients."""

    def __init__(self, base: str) -> None:
        self.client = Client(base)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.client, name)(*args, **kwargs)

    def collect(self, name: str, **kwargs: Any) -> list[Any]:
        return list(getattr(self.client, name)(**kwargs))

    def close(self) -> None:
        self.client.close()


class Async:
    """The same through ``AsyncClient`` on one event loop."""

    def __init__(self, base: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(base)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.loop.run_until_complete(getattr(self.client, name)(*args, **kwargs))

    def collect(self, name: str, **kwargs: Any) -> list[Any]:
        async def gather() -> list[Any]:
            return [item async for item in getattr(self.client, name)(**kwargs)]

        return self.loop.run_until_complete(gather())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def _respond(req: dict) -> Reply:
    # starts are acknowledged and not reported: the test reports through the client
    if req["path"].startswith("/bad"):
        return Reply(status=500)
    return Reply(report=False)


def _batch(sink: Sink) -> Batch:
    batch = Batch(requester="client-test")
    a = batch.task(
        "a",
        kind="etl",
        on_start=webhook(f"{sink.url}/start/a", body={"n": 1}),
        on_success=[webhook(f"{sink.url}/bad")],
        metadata={"tenant": "t1"},
        rules=[concurrency("etl", max=5, fields=["tenant"])],
        timeout=600,
    )
    batch.task("b", kind="etl", on_start=webhook(f"{sink.url}/start/b"), after=[a], timeout=600)
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("flavour", [Sync, Async], ids=["sync", "async"])
def test_every_route(flavour: Callable[[str], Any], db_url: str, tmp_path) -> None:
    sink = Sink(respond=_respond)
    settings = {"WEBHOOK_MAX_ATTEMPTS": "1", "COUNTER_FLUSH_INTERVAL": "0.05"}
    try:
        with service(db_url, tmp_path, worker_processes=1, **settings) as svc:
            call = flavour(svc.base)
            try:
                _scenario(call, sink)
            finally:
                call.close()
    finally:
        sink.close()


def _scenario(call: Any, sink: Sink) -> None:
    """One story through every route."""
    assert call("health") == {"status": "ok"}
    assert call("ready")["status"] == "ready"
    assert "paths" in call("openapi")
    assert "# HELP" in call("metrics")

    created = call("create_tasks", _batch(sink))
    a, b, batch_id = created["a"], created["b"], created.batch_id
    assert (a.status, b.status, a.requester) == ("Pending", "Waiting", "client-test")
    assert a.batch_id == batch_id and a.metadata == {"tenant": "t1"}

    wait_for(lambda: call("get_task", a.id).status == "Running", 30, message="a to start")
    assert call("update_task", a.id, new_success=2).success == 2
    patched = call("update_task", a.id, priority=5, metadata={"step": 1})
    assert (patched.priority, patched.metadata) == (5, {"tenant": "t1", "step": 1})  # merged
    assert call("get_task", a.id).actions[0].params.url.endswith("/start/a")  # the flat list
    assert call("add_task_counters", a.id, new_success=1).accepted == 1
    assert call("add_counters", [{"task_id": a.id, "new_failures": 1}]).accepted == 1
    wait_for(lambda: call("get_task", a.id).failures == 1, 10, message="the counters flush")

    assert call("pause_task", b.id).status == "Paused"
    assert call("resume_task", b.id).status == "Waiting"
    with pytest.raises(Conflict) as conflict:
        call("resume_task", b.id)
    assert conflict.value.status == 409
    assert conflict.value.details == ["status: task is Waiting"]

    detail = call("get_task", b.id)
    assert detail.dependencies[0].id == a.id and detail.dependencies[0].requires_success
    assert detail.why_not_running.reason == "unfinished_parents"
    assert detail.why_not_running.parents[0].id == a.id

    assert call("update_task", a.id, status="Success").status == "Success"
    done = call("get_task", a.id)
    assert (done.success, done.on_start.params.body) == (3, {"n": 1})
    history = call("task_history", a.id)
    assert [t.to for t in history][-1] == "Success" and history[0].from_ is None

    wait_for(lambda: call("get_task", b.id).status == "Running", 30, message="b to start")
    assert call("cancel_task", b.id).status == "Canceled"

    # a's on_success webhook got a 500 and gave up (WEBHOOK_MAX_ATTEMPTS=1): retry it
    def failed_delivery() -> Any:
        deliveries = call("get_task", a.id).on_success[0].deliveries
        return deliveries and deliveries[0].status == "Failed" and deliveries[0]

    delivery = wait_for(failed_delivery, 30, message="the failed delivery")
    assert delivery.attempts[0].status_code == 500
    assert call("retry_delivery", delivery.id).status == "Queued"

    listed = call("list_tasks", batch_id=batch_id)
    assert {t.id for t in listed} == {a.id, b.id}
    assert [t.id for t in call("list_tasks", kind="etl", metadata={"tenant": "t1"})] == [a.id]
    paged = call.collect("iter_tasks", per_page=1, batch_id=batch_id)
    assert sorted(t.id for t in paged) == sorted([a.id, b.id])

    assert batch_id in [s.batch_id for s in call.collect("iter_batches", per_page=1)]
    assert call("list_batches", kind="etl")[0].batch_id == batch_id
    stats = call("get_batch", batch_id)
    assert (stats.total_tasks, stats.status_counts.success, stats.status_counts.canceled) == (
        2,
        1,
        1,
    )
    dag = call("get_dag", batch_id)
    assert [(link.parent_id, link.child_id) for link in dag.links] == [(a.id, b.id)]
    updated = call("update_batch_rules", batch_id, "etl", [concurrency("etl", max=1)])
    assert updated.updated_count == 0  # both ended
    assert call("stop_batch", batch_id).already_terminal == 2
    rerun = call("rerun_batch", batch_id)  # b was canceled: it runs again
    assert [(t.id, t.from_status, t.status) for t in rerun.rerun] == [(b.id, "Canceled", "Pending")]
    with pytest.raises(Conflict):
        call("rerun_task", b.id)
    wait_for(lambda: call("get_task", b.id).status == "Running", 30, message="b to start again")
    assert call("cancel_task", b.id).status == "Canceled"
    assert call("rerun_task", b.id).rerun[0].status == "Pending"

    _errors(call)


def _errors(call: Any) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as not_found:
        call("get_task", missing)
    assert not_found.value.status == 404 and not_found.value.error
    with pytest.raises(NotFound):
        call("get_batch", missing)
    with pytest.raises(BadRequest) as bad:
        call("create_tasks", [{"id": "x", "name": "x", "kind": "k"}])
    assert any(d.startswith("[0].on_start") for d in bad.value.details), bad.value.details
    with pytest.raises(BadRequest) as bad_filter:
        call("list_tasks", status="Timeout")
    assert any("status" in d for d in bad_filter.value.details)


# -- the builder -----------------------------------------------------------------------------


def test_the_builder_refuses_a_cycle_before_sending() -> None:
    batch = Batch()
    hook = webhook("http://127.0.0.1:9/start")
    a = batch.task("a", kind="k", on_start=hook)
    b = batch.task("b", kind="k", on_start=hook, after=[a])
    c = batch.task("c", kind="k", on_start=hook, after=[b])
    a.after(c)
    # nothing listens on this port: a request would raise Unreachable, not CycleError
    nowhere = f"http://127.0.0.1:{free_port()}"
    with Client(nowhere, retry=FAST) as client, pytest.raises(CycleError) as cycle:
        client.create_tasks(batch)
    assert cycle.value.cycle in (["a", "c", "b", "a"], ["a", "b", "c", "a"])
    assert "dependency cycle: a -> " in str(cycle.value)


def test_the_builder_writes_the_api_body() -> None:
    batch = Batch()
    hook = webhook("http://t/start", "Get", headers={"X-Env": "dev"})
    a = batch.task("a", kind="k", on_start=hook, priority=5)
    batch.task(
        "b", name="Bee", kind="k", on_start=hook, after=[a, "0b7c6fb2-0000-4000-8000-000000000000"]
    )
    deep = [batch.task(f"n{i}", kind="k", on_start=hook) for i in range(5000)]
    for parent, child in zip(deep, deep[1:], strict=False):
        child.after(parent)  # a long chain: checked without recursion

    body = batch.to_json()
    assert body[0] == {
        "id": "a",
        "name": "a",
        "kind": "k",
        "on_start": {
            "kind": "Webhook",
            "params": {"url": "http://t/start", "verb": "Get", "headers": {"X-Env": "dev"}},
        },
        "priority": 5,
    }
    assert body[1]["name"] == "Bee"
    assert body[1]["dependencies"] == [
        {"id": "a", "requires_success": True},
        {"id": "0b7c6fb2-0000-4000-8000-000000000000", "requires_success": True},
    ]
    with pytest.raises(ValueError, match="used twice"):
        batch.task("a", kind="k", on_start=hook)
    with pytest.raises(ValueError, match="another Batch"):
        Batch().task("x", kind="k", on_start=hook, after=[a])


# -- retries: a real HTTP server that answers 503 or drops the connection ----------------------


def _flaky(times: int, reply: Reply) -> Sink:
    """A server answering ``reply`` to the first ``times`` requests, then 200 ``{}``."""
    seen = {"n": 0}

    def respond(req: dict) -> Reply:
        seen["n"] += 1
        return reply if seen["n"] <= times else Reply(body={"accepted": 1})

    return Sink(respond=respond)


@pytest.mark.parametrize("reply", [Reply(status=503), Reply(close=True)], ids=["503", "drop"])
def test_a_get_is_retried_until_it_gets_an_answer(reply: Reply) -> None:
    server = _flaky(2, reply)
    try:
        with Client(server.url, retry=FAST) as client:
            assert client.health() == {"accepted": 1}
        assert len(server.requests) == 3
    finally:
        server.close()


@pytest.mark.parametrize(
    ("reply", "raised"),
    [(Reply(status=503), Unavailable), (Reply(close=True), Unreachable)],
    ids=["503", "drop"],
)
def test_a_post_that_may_have_committed_is_never_retried(reply: Reply, raised: type) -> None:
    server = _flaky(5, reply)
    try:
        with Client(server.url, retry=FAST) as client, pytest.raises(raised):
            client.create_tasks([{"id": "a"}])
        with Client(server.url, retry=FAST) as client, pytest.raises(raised):
            client.update_task(str(uuid.uuid4()), new_success=1)
        assert [r["method"] for r in server.requests] == ["POST", "PATCH"]
    finally:
        server.close()


def test_a_counter_put_is_retried_after_503_only() -> None:
    # a 503 from PUT /task means the buffer kept nothing; a dropped connection may not
    refused, dropped = _flaky(2, Reply(status=503)), _flaky(2, Reply(close=True))
    try:
        with Client(refused.url, retry=FAST) as client:
            assert client.add_task_counters(str(uuid.uuid4()), new_success=1).accepted == 1
        with Client(dropped.url, retry=FAST) as client, pytest.raises(Unreachable):
            client.add_task_counters(str(uuid.uuid4()), new_success=1)
        assert (len(refused.requests), len(dropped.requests)) == (3, 1)
    finally:
        refused.close()
        dropped.close()


def test_a_refused_connection_is_retried_for_any_call_then_unreachable() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    with Client(nowhere, retry=FAST) as client, pytest.raises(Unreachable):
        client.create_tasks([{"id": "a"}])


def test_the_token_is_sent_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _flaky(0, Reply())
    monkeypatch.setenv("TASKRUNNER_URL", server.url)
    monkeypatch.setenv("API_TOKEN", "s3cret")
    try:
        with Client() as client:
            client.health()
        with Client(token="other") as client:
            client.health()
        tokens = [r["headers"]["authorization"] for r in server.requests]
        assert tokens == ["Bearer s3cret", "Bearer other"]
    finally:
        server.close()
