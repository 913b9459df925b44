"""The bench's environment: a fresh database, real API and worker processes, a fast webhook
sink and a small HTTP/1.1 keep-alive client (the load generator).

The sink and the client are hand-rolled on asyncio streams on purpose: the bench measures
taskrunner, so the other end must cost as little CPU as possible (httpx or http.server
would take a good share of this machine's two cores).

The helpers the tests use too (the database URL builder, ``free_port``, ``wait_for``,
``wait_healthy``, ``stop``) come from ``tests/procs.py``: the bench runs from the checkout
(``bin/bench`` or ``python -m bench`` in its root), where ``tests`` is importable as a
namespace package just as ``bench`` is, so there is one copy of each instead of two.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg.rows import dict_row

from taskrunner import migrate
from taskrunner.supervisor import die_with_parent
from tests.procs import free_port, pg_url, stop, wait_healthy

# --- the database ---------------------------------------------------------------------


@contextmanager
def fresh_database(keep: bool = False) -> Iterator[str]:
    """Create and migrate ``trbench_<pid>``; drop it at the end (unless ``keep``)."""
    name = f"trbench_{os.getpid()}"
    admin = pg_url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_url(name)
    try:
        migrate.migrate(url)
        yield url
    finally:
        if not keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def reset(url: str) -> None:
    """Empty every taskrunner table between scenarios, and refresh planner statistics."""
    with connect(url) as conn:
        conn.execute(
            "TRUNCATE taskrunner.task, taskrunner.dependency, taskrunner.action, "
            "taskrunner.delivery, taskrunner.delivery_attempt, taskrunner.task_history"
        )
        conn.execute("VACUUM ANALYZE taskrunner.task")


# --- the service's processes ----------------------------------------------------------


class Service:
    """The API (gunicorn) and any number of worker processes, as real subprocesses."""

    def __init__(self, db_url: str, *, api_processes: int = 2, concurrency: int = 64) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = tempfile.mkdtemp(prefix="trbench-metrics-")
        self.env = dict(os.environ)
        self.env.update(
            {
                "DATABASE_URL": db_url,
                "PORT": str(self.port),
                "HOST_URL": self.base_url,
                "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
                "WEBHOOK_ALLOW_PRIVATE": "true",
                "LOG_LEVEL": "warning",
                "API_PROCESSES": str(api_processes),
                "WORKER_CONCURRENCY": str(concurrency),
            }
        )
        self.api: subprocess.Popen | None = None
        self.workers: subprocess.Popen | None = None

    def _spawn(self, *args: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "taskrunner.cli", *args]
        # die_with_parent: a bench killed outright (a test's timeout) leaves no orphans
        return subprocess.Popen(
            argv, env=self.env, start_new_session=True, preexec_fn=die_with_parent
        )

    def start_api(self) -> None:
        self.api = self._spawn("api")
        wait_healthy(self.base_url)

    def start_workers(self, processes: int = 1) -> None:
        self.stop_workers()
        self.workers = self._spawn("worker", "--processes", str(processes))
        time.sleep(1.0 + 0.3 * processes)  # connect, LISTEN, first (empty) round

    def stop_workers(self) -> None:
        if self.workers is not None:
            stop(self.workers, timeout=15)
            self.workers = None

    def pids(self) -> list[int]:
        """API and worker process ids (parents and children), for profiling."""
        out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
        roots = {p.pid for p in (self.api, self.workers) if p is not None}
        rows = (ln.split() for ln in out.splitlines()[1:])
        children = {int(pid) for pid, ppid in rows if int(ppid) in roots}
        return sorted(roots | children)

    def close(self) -> None:
        self.stop_workers()
        if self.api is not None:
            stop(self.api, timeout=15)
            self.api = None


# --- HTTP client ----------------------------------------------------------------------


class HttpConnection:
    """One HTTP/1.1 keep-alive connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (1, 2):  # a keep-alive connection the server closed: reconnect once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            self.writer.write(head.encode() + b"\r\n" + (body or b""))
            try:
                return await self._response()
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("not reached")

    async def _response(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def hammer(
    port: int,
    clients: int,
    make_request: Callable[[int, int], tuple[str, str, bytes | None]],
    requests_per_client: int | None = None,
    seconds: float | None = None,
) -> tuple[int, float, list[int]]:
    """``clients`` connections sending requests back to back (``make_request(client, n)``
    gives method, path, body) for a number of requests or seconds. Returns (requests,
    elapsed seconds, non-2xx statuses)."""
    errors: list[int] = []
    done = 0
    start = time.perf_counter()
    stop_at = start + seconds if seconds else None

    async def client(c: int) -> None:
        nonlocal done
        conn = HttpConnection("127.0.0.1", port)
        n = 0
        while (requests_per_client is None or n < requests_per_client) and (
            stop_at is None or time.perf_counter() < stop_at
        ):
            method, path, body = make_request(c, n)
            status, _ = await conn.request(method, path, body)
            if status >= 300:
                errors.append(status)
            n += 1
            done += 1
        conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    return done, time.perf_counter() - start, errors


# --- the webhook sink -----------------------------------------------------------------


class Sink:
    """A webhook target on its own event loop thread. Every request is answered 200 at once;
    a start webhook is completed (PATCH its handle with {"status": "Success"}) when
    ``complete`` is on. Times are ``time.perf_counter()`` of this process:
    ``started[task_id]`` when its start webhook arrived, ``completed[task_id]`` when the
    API answered its PATCH."""

    def __init__(self, complete: bool = True, patch_connections: int = 16) -> None:
        self.complete = complete
        self.started: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.failed_patches: list[tuple[str, object]] = []
        self.requests = 0
        self._patch_slots = asyncio.Semaphore(patch_connections)
        self._idle: list[HttpConnection] = []
        self._target = 0
        self._all_done = threading.Event()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def expect(self, completions: int) -> None:
        """Arm ``wait_done``: it returns once this many tasks have been completed."""
        self._all_done.clear()
        self._target = completions
        self.started.clear()
        self.completed.clear()
        self.failed_patches.clear()

    def wait_done(self, timeout: float) -> bool:
        return self._all_done.wait(timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.perf_counter()
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ", 2)[1]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                self.requests += 1
                if headers.get("x-task-trigger") == "Start":
                    task_id = headers.get("x-task-id", "")
                    self.started[task_id] = now
                    if self.complete:
                        handle = parse_qs(urlsplit(target).query)["handle"][0]
                        self.loop.create_task(self._complete(task_id, handle))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _complete(self, task_id: str, handle: str) -> None:
        parts = urlsplit(handle)
        async with self._patch_slots:
            conn = (
                self._idle.pop()
                if self._idle
                else HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80)
            )
            try:
                status, _ = await conn.request("PATCH", parts.path, b'{"status": "Success"}')
            except (OSError, asyncio.IncompleteReadError) as exc:
                conn.close()
                self.failed_patches.append((task_id, repr(exc)))
                return
            self._idle.append(conn)
        if status != 200:
            self.failed_patches.append((task_id, status))
            return
        self.completed[task_id] = time.perf_counter()
        if self._target and len(self.completed) >= self._target:
            self._all_done.set()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for conn in self._idle:
                conn.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self._thread.join(5)


# --- task payloads (the API's input format) --------------------------------------------


def api_task(local_id: str, sink_url: str, **extra) -> dict:
    return {
        "id": local_id,
        "name": f"bench {local_id}",
        "kind": extra.pop("kind", "bench"),
        "on_start": {"kind": "Webhook", "params": {"url": sink_url, "verb": "Post"}},
        **extra,
    }


def dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
