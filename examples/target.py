"""An example webhook target for taskrunner: a small Falcon app the README walkthrough uses.

Run it with the project's own dependencies (``bin/taskrunner`` or ``bin/test`` create
``.venv``)::

    .venv/bin/python examples/target.py --port 9000

What it does, so a person can watch a task run:

* ``POST /start`` (a start webhook): answers 200 at once, then, from a thread, reports
  through the task's ``handle``: ``steps`` times ``{"new_success": 1}`` every ``delay``
  seconds, then the ``outcome``. The webhook's JSON body may set them:
  ``{"steps": 3, "delay": 2, "outcome": "Success"}``, or ``"outcome": "Failure"`` with a
  ``"reason"``. A retried start (same ``Idempotency-Key``) is not run twice.
* ``POST /hold``: answers 200 and reports nothing: the task stays Running for you to report
  by hand (``PATCH`` its handle) until its ``timeout``.
* Any other path (``/done``, ``/failed``, a cancel action): answers 200.
* ``GET /``: this description.

Every webhook it gets, and every report it makes, is printed on stdout. With
``API_TOKEN`` set, reports carry ``Authorization: Bearer $API_TOKEN``. It is built on
``taskrunner.target`` (``parse_webhook`` reads the webhook, its ``task()`` handle reports):
a request without ``X-Task-Id``/``X-Task-Trigger`` is answered 400.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import falcon

from taskrunner.client import TaskrunnerError
from taskrunner.target import InvalidWebhook, Webhook, parse_webhook

DEFAULTS = {
    "steps": 3,
    "delay": 2.0,
    "outcome": "Success",
    "reason": "the example target failed it",
}


def say(text: str) -> None:
    print(f"target: {text}", flush=True)


class Reporter:
    """Reports progress and the outcome of one task through its handle
    (``taskrunner.target.TaskHandle``, with ``token`` as its bearer token)."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def run(self, hook: Webhook, plan: dict) -> None:
        task = hook.task(self.token, timeout=10)
        try:
            for _ in range(plan["steps"]):
                time.sleep(plan["delay"])
                report(f"progress {hook.task_id} +1", lambda: task.progress(success=1))
            time.sleep(plan["delay"])
            if plan["outcome"].lower() == "failure":
                report(f"fail {hook.task_id}", lambda: task.fail(plan["reason"]))
            else:
                report(f"succeed {hook.task_id}", task.succeed)
        finally:
            task.close()


def report(what: str, call) -> None:
    """Make one report and print how it went (the API's error, with its details)."""
    try:
        answer = call()
        say(f"{what} -> {answer.status}")
    except TaskrunnerError as exc:
        say(f"{what} failed: {exc}")


def _plan(body: object) -> dict:
    """The run plan: the defaults, overridden by the webhook body's known keys."""
    given = body if isinstance(body, dict) else {}
    plan = {key: given.get(key, default) for key, default in DEFAULTS.items()}
    plan["steps"], plan["delay"] = int(plan["steps"]), float(plan["delay"])
    return plan


class Webhooks:
    """Every path: print the webhook; ``/start`` runs the task, the rest just answer 200."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def on_get(self, req: falcon.Request, resp: falcon.Response, path: str = "") -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = __doc__

    def on_post(self, req: falcon.Request, resp: falcon.Response, path: str = "") -> None:
        try:
            hook = parse_webhook(req)
        except InvalidWebhook as exc:
            say(f"{req.method} /{path}: not a taskrunner webhook: {exc}")
            raise falcon.HTTPBadRequest(description=str(exc)) from exc
        body = hook.json()
        who = f"task={hook.task_id} trigger={hook.trigger}"
        say(f"{req.method} /{path} {who} body={json.dumps(body)}")
        if path == "start" and hook.handle and self._first_time(hook.idempotency_key):
            thread = threading.Thread(target=self.reporter.run, args=(hook, _plan(body)))
            thread.daemon = True
            thread.start()
        resp.status = falcon.HTTP_200

    on_put = on_patch = on_delete = on_post

    def _first_time(self, key: str | None) -> bool:
        with self.lock:
            if key in self.seen:
                return False
            if key:
                self.seen.add(key)
            return True


def create_app(token: str | None = None) -> falcon.App:
    app = falcon.App()
    resource = Webhooks(Reporter(token))
    app.add_route("/", resource)
    app.add_route("/{path}", resource)
    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:  # we print our own line per webhook
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="An example taskrunner webhook target (see the module docstring)."
    )
    parser.add_argument("--port", type=int, default=9000, help="port (default: 9000)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    app = create_app(os.environ.get("API_TOKEN") or None)
    with make_server(args.host, args.port, app, _Server, _QuietHandler) as server:
        say(f"listening on http://{args.host}:{args.port}")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
