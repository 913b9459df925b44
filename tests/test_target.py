"""taskrunner.target: reading webhooks from WSGI, ASGI and request-like objects, the
``verify=`` hook, the task handle against a real API, and examples/target.py end to end
(a real worker calls it; it reports through the handle)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from wsgiref.util import setup_testing_defaults

import httpx
import pytest
from procs import free_port, service, wait_for

from taskrunner.client import Batch, Client, webhook
from taskrunner.target import InvalidWebhook, TaskHandle, parse_webhook

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"X-Task-Id": "t-1", "X-Task-Trigger": "Start", "Idempotency-Key": "d-1"}
HANDLE = "http://127.0.0.1:8085/task/t-1"


def _environ(body: bytes = b'{"steps": 1}') -> dict:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/start",
        "QUERY_STRING": f"a=1&handle={HANDLE}",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in HEADERS.items()},
    }
    setup_testing_defaults(environ)
    return environ


def test_a_wsgi_environ() -> None:
    environ = _environ()
    hook = parse_webhook(environ)

    assert (hook.task_id, hook.trigger, hook.idempotency_key) == ("t-1", "Start", "d-1")
    assert hook.handle == HANDLE and hook.json() == {"steps": 1}
    assert hook.url.startswith("http://127.0.0.1/start?a=1&handle=")
    assert environ["wsgi.input"].read() == b'{"steps": 1}'  # the app can still read it


def test_an_asgi_scope_and_request_likes() -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/start",
        "query_string": f"handle={HANDLE}".encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()],
    }
    from_scope = parse_webhook(scope, body=b"{}")
    flask_like = SimpleNamespace(
        headers=HEADERS, args={"handle": HANDLE}, method="POST", get_data=lambda: b"[]"
    )
    from_object = parse_webhook(flask_like)
    explicit = parse_webhook(headers=HEADERS, query=f"?handle={HANDLE}")

    for hook in (from_scope, from_object, explicit):
        assert (hook.task_id, hook.handle, hook.idempotency_key) == ("t-1", HANDLE, "d-1")
    assert (from_scope.json(), from_object.json(), explicit.json()) == ({}, [], None)


def test_not_a_webhook_and_verify_refusals() -> None:
    with pytest.raises(InvalidWebhook, match="X-Task-Id"):
        parse_webhook(headers={"X-Task-Trigger": "Start"})
    with pytest.raises(InvalidWebhook, match="X-Task-Trigger"):
        parse_webhook(headers={**HEADERS, "X-Task-Trigger": "Begin"})

    seen = []

    def check(headers, method, url, body) -> bool:
        seen.append((headers["x-task-id"], method, url, body))
        return headers.get("x-signature") == "good"

    with pytest.raises(InvalidWebhook, match="signature refused"):
        parse_webhook(_environ(b"x"), verify=check)
    assert seen[0][0:2] == ("t-1", "POST") and seen[0][3] == b"x"
    good = _environ()
    good["HTTP_X_SIGNATURE"] = "good"
    assert parse_webhook(good, verify=check).task_id == "t-1"


@pytest.mark.slow
def test_the_example_target_and_the_task_handle(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    target = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "target.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: _listening(target), 30, message="the example target")
        with service(db_url, tmp_path, worker_processes=1) as svc, Client(svc.base) as client:
            batch = Batch()
            fast = {"steps": 2, "delay": 0.1}
            batch.task("ok", kind="demo", on_start=webhook(f"{target}/start", body=fast))
            batch.task(
                "no",
                kind="demo",
                on_start=webhook(f"{target}/start", body={**fast, "outcome": "Failure"}),
            )
            batch.task("held", kind="demo", on_start=webhook(f"{target}/hold"), timeout=600)
            created = client.create_tasks(batch)

            def ended(local_id: str):
                task = client.get_task(created[local_id].id)
                return task.ended_at and task

            ok, no = wait_for(lambda: ended("ok"), 60), wait_for(lambda: ended("no"), 60)
            assert (ok.status, ok.success) == ("Success", 2)
            assert (no.status, no.failure_reason) == ("Failure", "the example target failed it")

            held = created["held"].id
            wait_for(lambda: client.get_task(held).status == "Running", 30)
            handle = TaskHandle(f"{svc.base}/task/{held}", Client(svc.base))
            assert handle.heartbeat().status == "Running"
            assert handle.progress(success=4, failures=1).success == 4
            assert handle.fail("given up").failure_reason == "given up"
            handle.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "target: POST /start task=" in out and "trigger=Start" in out
    assert f"succeed {created['ok'].id} -> Success" in out


def _listening(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
