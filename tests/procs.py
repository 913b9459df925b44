"""Real processes for end-to-end tests: the API under gunicorn, worker processes, and a
webhook sink (a real HTTP server) that completes tasks through their ``handle`` URL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

TASKRUNNER = [sys.executable, "-m", "taskrunner.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Sink:
    """A webhook target. Records every request; on a start webhook it calls ``on_start``
    (default: PATCH the task's handle with {"status": "Success"}) from its own thread."""

    def __init__(self, on_start: Callable[[dict], None] | None = None) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.on_start = on_start or self.complete
        self.client = httpx.Client(timeout=10)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = {"method": self.command, "path": urlsplit(self.path).path,
                       "query": parse_qs(urlsplit(self.path).query),
                       "headers": {k.lower(): v for k, v in self.headers.items()},
                       "body": json.loads(body) if body else None, "at": time.time()}
                with sink.lock:
                    sink.requests.append(req)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if req["headers"].get("x-task-trigger") == "Start":
                    threading.Thread(target=sink.on_start, args=(req,), daemon=True).start()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def complete(self, req: dict, status: str = "Success") -> None:
        handle = req["query"]["handle"][0]
        body = {"status": status}
        if status == "Failure":
            body["failure_reason"] = "sink says no"
        self.client.patch(handle, json=body)

    def starts(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["headers"].get("x-task-trigger") == "Start"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


def service_env(db_url: str, port: int, metrics_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": db_url, "PORT": str(port), "HOST_URL": f"http://127.0.0.1:{port}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "WEBHOOK_ALLOW_PRIVATE": "true",
        "LOG_LEVEL": "warning", "POLL_INTERVAL": "1", "TICK_INTERVAL": "0.5",
        "API_PROCESSES": "2",
    })
    env.update(extra)
    return env


@contextmanager
def running(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run a taskrunner subcommand; SIGTERM it (then SIGKILL) when the block ends."""
    proc = subprocess.Popen(TASKRUNNER + args, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def wait_healthy(base_url: str, timeout: float = 30.0) -> None:
    def ok() -> bool:
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, timeout, message=f"{base_url}/health")
