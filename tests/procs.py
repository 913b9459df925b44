"""Real processes for end-to-end tests: the API under gunicorn, worker processes, and a
webhook sink (a real HTTP server) that completes tasks through their ``handle`` URL.

The sink can also misbehave on purpose (``Reply``: a status code, a delay, or closing the
connection without an answer), which the fault and retry tests use.

The bench (``bench/env.py``) imports this module too, as ``tests.procs``: the database URL
builder, ``free_port`` (``taskrunner.ports``' picker), ``wait_for``, ``wait_healthy`` and
``stop`` have one copy for both. So it imports nothing from ``tests/`` (conftest is
pytest's, not the bench's), only the standard library, httpx and taskrunner.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

# The package's own free-port picker (``up`` uses it for the embedded cluster), under the
# name tests and the bench use.
from taskrunner.ports import pick_free_port as free_port

TASKRUNNER = [sys.executable, "-m", "taskrunner.cli"]

# The PostgreSQL server: the one the libpq PG* variables name, else CI's 127.0.0.1:5432.
PG_HOST = os.environ.get("PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGPORT", "5432"))
PG_USER = os.environ.get("PGUSER") or getpass.getuser()
PG_PASSWORD = os.environ.get("PGPASSWORD")


def pg_url(dbname: str) -> str:
    """The URL of database ``dbname`` on that server."""
    auth = PG_USER if not PG_PASSWORD else f"{PG_USER}:{PG_PASSWORD}"
    return f"postgresql://{auth}@{PG_HOST}:{PG_PORT}/{dbname}"


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@dataclass(frozen=True)
class Reply:
    """How the sink answers one request: ``status`` after ``delay`` seconds, or, with
    ``close``, drop the connection without any answer. ``report=False``: a 2xx to a start
    does not go on to report the outcome (a target too slow to count as started).
    ``body``: a JSON body (e.g. the cancel action a start answers with); ``raw``: a body
    sent as it is (e.g. JSON that Python's own encoder would refuse to write)."""

    status: int = 200
    delay: float = 0.0
    close: bool = False
    report: bool = True
    body: object = None
    raw: bytes | None = None


class Sink:
    """A webhook target. Records every request; ``respond(req)`` picks the ``Reply``
    (default 200 at once). After a 2xx to a start webhook it calls ``on_start(req)``
    (default: PATCH the task's handle with {"status": "Success"}) from its own thread."""

    def __init__(
        self,
        on_start: Callable[[dict], None] | None = None,
        respond: Callable[[dict], Reply] | None = None,
    ) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.on_start = on_start or self.complete
        self.respond = respond or (lambda req: Reply())
        self.client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real targets do

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = {
                    "method": self.command,
                    "path": parts.path,
                    "query": parse_qs(parts.query),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(body) if body else None,
                    "raw_body": body,
                    "target": self.path,  # path and query, as requested
                    "at": time.time(),
                }
                with sink.lock:
                    sink.requests.append(req)
                reply = sink.respond(req)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.close:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                payload = b"" if reply.body is None else json.dumps(reply.body).encode()
                payload = payload if reply.raw is None else reply.raw
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the worker gave up waiting (timeout) or died
                    self.close_connection = True
                    return
                started = req["headers"].get("x-task-trigger") == "Start"
                if started and reply.report and 200 <= reply.status < 300:
                    threading.Thread(target=sink.on_start, args=(req,), daemon=True).start()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 256
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def complete(self, req: dict, status: str = "Success") -> None:
        """Report the outcome like a careful remote side: retry while the API is out of
        reach (connection cut, 503) for up to a minute; a 409 means it already counted."""
        handle = req["query"]["handle"][0]
        body = {"status": status}
        if status == "Failure":
            body["failure_reason"] = "sink says no"
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.patch(handle, json=body).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def starts(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["headers"].get("x-task-trigger") == "Start"]

    def received(self) -> Counter:
        """Requests received per ``Idempotency-Key`` (that is, per delivery)."""
        with self.lock:
            return Counter(r["headers"].get("idempotency-key") for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


def hook(url: str) -> dict:
    """A webhook action as a client POSTs it: ``{"kind": "Webhook", "params": {url, Post}}``."""
    return {"kind": "Webhook", "params": {"url": url, "verb": "Post"}}


def count(conn, sql: str, *params) -> int:
    """The ``n`` column of a one-row query."""
    return conn.execute(sql, params).fetchone()["n"]


def start_up(
    port: int, env: dict[str, str], *, worker_processes: int = 1, cwd: Path | None = None
) -> subprocess.Popen:
    """``taskrunner up`` with one API process, its output (stdout and stderr) on a pipe."""
    return subprocess.Popen(
        [*TASKRUNNER, "up", "--port", str(port), "--api-processes", "1"]
        + ["--worker-processes", str(worker_processes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
    )


def service_env(db_url: str, port: int, metrics_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": db_url,
            "PORT": str(port),
            "HOST_URL": f"http://127.0.0.1:{port}",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "LOG_LEVEL": "warning",
            "POLL_INTERVAL": "1",
            "TICK_INTERVAL": "0.5",
            "API_PROCESSES": "2",
        }
    )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Service:
    """A running API (``base`` is its URL) and its workers, as ``service()`` started them."""

    base: str
    env: dict[str, str]
    api: subprocess.Popen

    def post(self, tasks: list[dict], **kwargs: object) -> httpx.Response:
        """POST /task, which must accept the batch (201); the response."""
        resp = httpx.post(f"{self.base}/task", json=tasks, **kwargs)
        assert resp.status_code == 201, resp.text
        return resp


def local_ids(resp: httpx.Response) -> dict[str, str]:
    """``{local_id: task id}`` of a POST /task response."""
    return {t["local_id"]: t["id"] for t in resp.json()}


@contextmanager
def service(
    db_url: str,
    metrics_dir: Path,
    *,
    worker_processes: int = 2,
    port: int | None = None,
    **settings: str,
) -> Iterator[Service]:
    """The API and ``worker --processes N`` (none for 0) on ``db_url`` with ``service_env``
    plus ``settings``; yields once /health answers, stops both when the block ends."""
    port = port or free_port()
    env = service_env(db_url, port, metrics_dir, **settings)
    base = f"http://127.0.0.1:{port}"
    with running(["api"], env) as api, ExitStack() as workers:
        if worker_processes:
            workers.enter_context(running(["worker", "--processes", str(worker_processes)], env))
        wait_healthy(base)
        yield Service(base, env, api)


@contextmanager
def running(
    args: list[str], env: dict[str, str], command: list[str] = TASKRUNNER, **popen: object
) -> Iterator[subprocess.Popen]:
    """Run a taskrunner subcommand (of ``command``: this checkout's by default); SIGTERM it
    (then SIGKILL) when the block ends."""
    proc = subprocess.Popen(command + args, env=env, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        with_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with_group(proc, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def with_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (it and the children it spawned)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (e.g. gunicorn's workers), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def wait_healthy(base_url: str, timeout: float = 30.0) -> None:
    def ok() -> bool:
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, timeout, message=f"{base_url}/health")


class Logged:
    """A taskrunner subcommand whose output (stdout and stderr together) is collected
    line by line, for tests that read what a process logs."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            TASKRUNNER + args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, *parts: str, timeout: float = 60.0) -> str:
        """The first line containing every one of ``parts``."""

        def found() -> str | None:
            return next((ln for ln in list(self.lines) if all(p in ln for p in parts)), None)

        try:
            return wait_for(found, timeout, 0.1, f"a line with {parts!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; output:\n{self.text()}") from None

    def stop(self) -> str:
        """Stop it (SIGTERM to its group) and return everything it printed."""
        stop(self.proc)
        self._pump.join(timeout=10)
        return self.text()


@contextmanager
def logged(args: list[str], env: dict[str, str]) -> Iterator[Logged]:
    process = Logged(args, env)
    try:
        yield process
    finally:
        process.stop()
