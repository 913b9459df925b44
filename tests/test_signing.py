"""Signed webhooks: real API and worker processes, a real target that checks signatures.

The worker signs with ``WEBHOOK_SIGNING_SECRET="new,old"`` (mid-rotation); the target
trusts only ``old`` (not yet rotated) and answers 401 to any request whose signature does
not verify, so a task succeeds only if its webhooks were signed right. The target then
refuses the captured request replayed after the tolerance, and forged variants of it.
"""

from __future__ import annotations

import httpx
import pytest
from procs import Reply, Sink, free_port, hook, running, service_env, wait_for, wait_healthy

from taskrunner import signing
from taskrunner.config import Config

TARGET_SECRETS = ["old"]


class VerifyingTarget(Sink):
    """A Sink answering 401 unless ``signing.verify`` accepts the request; ``skew`` moves
    its clock forward (to receive a replay "later")."""

    def __init__(self) -> None:
        self.skew = 0.0
        self.refused: list[dict] = []
        super().__init__(respond=self._check)

    def url_of(self, req: dict) -> str:
        return f"{self.url}{req['target']}"

    def accepts(self, req: dict) -> bool:
        now = req["at"] + self.skew
        return signing.verify(
            req["headers"],
            req["method"],
            self.url_of(req),
            req["raw_body"],
            TARGET_SECRETS,
            now=now,
        )

    def _check(self, req: dict) -> Reply:
        if self.accepts(req):
            return Reply()
        self.refused.append(req)
        return Reply(status=401, report=False)


def _resend(target: VerifyingTarget, req: dict, *, body: bytes | None = None, **headers) -> int:
    sent = {k: v for k, v in req["headers"].items() if k not in ("host", "content-length")}
    sent.update(headers)
    content = req["raw_body"] if body is None else body
    response = httpx.request(req["method"], target.url_of(req), content=content, headers=sent)
    return response.status_code


@pytest.mark.slow
def test_webhooks_are_signed_and_a_target_refuses_forgeries_and_replays(db_url, tmp_path):
    target = VerifyingTarget()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(db_url, port, tmp_path, WEBHOOK_SIGNING_SECRET="new, old")
    try:
        with running(["api"], env), running(["worker"], env):
            wait_healthy(base)
            task = {
                "id": "signed",
                "name": "signed",
                "kind": "etl",
                "on_start": hook(f"{target.url}/start?x=1"),
                "on_success": [hook(f"{target.url}/done")],
            }
            resp = httpx.post(f"{base}/task", json=[task], headers={"X-Requester": "t"})
            assert resp.status_code == 201, resp.text
            task_id = resp.json()[0]["id"]
            wait_for(
                lambda: httpx.get(f"{base}/task/{task_id}").json()["status"] == "Success",
                60,
                message="the signed task to succeed",
            )
            wait_for(lambda: len(target.requests) == 2, 30, message="the on_success webhook")
        assert target.refused == []
        header = target.starts()[0]["headers"]["webhook-signature"]
        assert header.startswith("t=") and header.count("v1=") == 2  # one per secret

        # the end webhook, captured, sent again to the target (still up; API and worker not)
        done = next(r for r in target.requests if r["path"] == "/done")
        assert _resend(target, done) == 200  # within the tolerance: the same request passes
        target.skew = signing.DEFAULT_TOLERANCE + 1
        assert _resend(target, done) == 401  # a replay after the tolerance
        target.skew = 0
        assert _resend(target, done, body=b'{"forged": true}') == 401  # another body
        forged = signing.sign(["guess"], "POST", target.url_of(done), done["raw_body"])
        assert _resend(target, done, **{"webhook-signature": forged}) == 401
        assert len(target.refused) == 3
    finally:
        target.close()


def test_only_a_listed_secret_verifies_and_the_secret_list_is_parsed() -> None:
    body = b'{"a": 1}'
    header = signing.sign(["new", "old"], "post", "https://t.example/h?handle=x", body, 1000)
    headers = {"Webhook-Signature": header}
    ok = dict(method="POST", url="https://t.example/h?handle=x", body=body, now=1000)
    assert signing.verify(headers, secrets=["new"], **ok)
    assert signing.verify(headers, secrets=["old", "other"], **ok)
    assert not signing.verify(headers, secrets=["other"], **ok)
    assert not signing.verify(headers, secrets=["new"], **(ok | {"now": 1301}))
    assert signing.verify(headers, secrets=["new"], tolerance=400, **(ok | {"now": 1301}))
    assert Config.from_env({"WEBHOOK_SIGNING_SECRET": " new, old ,"}).webhook_signing_secrets == [
        "new",
        "old",
    ]
    assert Config.from_env({}).webhook_signing_secrets == []


def test_the_target_helper_refuses_a_webhook_whose_signature_does_not_verify() -> None:
    from taskrunner.target import InvalidWebhook, parse_webhook

    url = "http://t.example/hook?handle=http%3A%2F%2Fapi%2Ftask%2Fx"
    body = b'{"a": 1}'
    parts = {
        "query": {"handle": "http://api/task/x"},
        "method": "POST",
        "url": url,
        "verify": signing.verifier(["s3cret"]),
    }
    signed = {
        "x-task-id": "x",
        "x-task-trigger": "Start",
        "idempotency-key": "k",
        "webhook-signature": signing.sign(["s3cret"], "POST", url, body),
    }
    assert parse_webhook(headers=signed, body=body, **parts).task_id == "x"
    with pytest.raises(InvalidWebhook):
        parse_webhook(headers=signed, body=b'{"a": 2}', **parts)
