"""What the sync and the asyncio client share: every route as a ``Call`` (``Routes``), the
retry decision (``RetryPolicy``), and reading an answer into a result or an exception.

``Routes`` describes each route once; its methods return ``self._send(call)``, which is
the result in ``Client`` and an awaitable of it in ``AsyncClient``.

When a call is retried (the only place this is decided: ``RetryPolicy.delay``):

* A connection that could not be made (``ConnectError``, ``ConnectTimeout``, no free
  connection in the pool) sent nothing, so any call is retried, a POST too.
* Every other transport error (reset, read timeout, the server closing a kept-alive
  connection) and a 503 leave it unknown whether the server acted. Only calls that are
  safe to send twice are retried then: every GET, ``DELETE /batch/{id}`` (stopping a
  stopped batch counts its tasks as ``already_terminal``) and ``PATCH /batch/{id}/rules``
  (it replaces). POST /task would create the batch twice, PUT counters and PATCH progress
  would add twice, and a repeated cancel/pause/resume/rerun/outcome answers 409 although the
  first one worked: those raise at once.
* The one exception is a 503 from ``PUT /task`` (counters): the buffer refuses all of a
  request or none (``taskrunner/api/counters.py``), so a 503 kept nothing and is retried.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from taskrunner.client import models
from taskrunner.client.errors import TaskrunnerError, Unreachable, api_error

DEFAULT_URL = "http://127.0.0.1:8085"
_NO_BODY = object()


def settings(url: str | None, token: str | None) -> tuple[str, str | None]:
    """The server URL and bearer token: the arguments, else ``TASKRUNNER_URL`` and
    ``API_TOKEN`` from the environment (the URL defaults to ``DEFAULT_URL``)."""
    url = url or os.environ.get("TASKRUNNER_URL") or DEFAULT_URL
    if "://" not in url:
        url = f"http://{url}"
    token = token if token is not None else os.environ.get("API_TOKEN") or None
    return url.rstrip("/"), token


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class Call:
    """One request: ``repeatable`` if sending it twice does no harm (see the module
    docstring), ``retry_503`` if a 503 means it was not acted on, ``parse`` reads a 2xx."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: Mapping[str, Any] | None = None
    body: Any = _NO_BODY
    headers: Mapping[str, str] | None = None
    repeatable: bool = False
    retry_503: bool = False

    def request_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.body is not _NO_BODY:
            args["json"] = self.body
        return args


_NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``attempts`` tries, ``base * 2**n`` seconds apart (at most ``cap``, with
    jitter, or the server's ``Retry-After``)."""

    attempts: int = 5
    base: float = 0.2
    cap: float = 5.0

    def delay(self, call: Call, attempt: int, outcome: httpx.Response | Exception) -> float | None:
        """Seconds to wait before trying ``call`` again after ``outcome`` (attempt 0 is the
        first try), or None: do not."""
        if attempt + 1 >= self.attempts or not self._retryable(call, outcome):
            return None
        wait = min(self.cap, self.base * 2**attempt) * random.uniform(0.5, 1.0)
        if isinstance(outcome, httpx.Response):
            wait = max(wait, _retry_after(outcome, self.cap))
        return wait

    @staticmethod
    def _retryable(call: Call, outcome: httpx.Response | Exception) -> bool:
        if isinstance(outcome, httpx.Response):
            return outcome.status_code == 503 and (call.repeatable or call.retry_503)
        if isinstance(outcome, _NOTHING_SENT):
            return True
        return isinstance(outcome, httpx.TransportError) and call.repeatable


NO_RETRIES = RetryPolicy(attempts=1)


def _retry_after(response: httpx.Response, cap: float) -> float:
    try:
        return min(cap, float(response.headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0


def outcome_of(call: Call, outcome: httpx.Response | Exception) -> Any:
    """The result of the last try: ``call.parse`` of a 2xx, else the exception to raise."""
    if isinstance(outcome, Exception):
        if isinstance(outcome, httpx.TransportError):
            raise Unreachable(f"{call.method} {call.path}: {outcome!r}") from outcome
        raise outcome
    if outcome.status_code >= 400:
        raise api_error(outcome.status_code, _body(outcome), call.method, str(outcome.url))
    return call.parse(outcome)


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


# -- reading answers -----------------------------------------------------------------------


def _one(kind: type[models.Model]) -> Callable[[httpx.Response], Any]:
    return lambda r: kind.from_json(r.json())


def _many(kind: type[models.Model]) -> Callable[[httpx.Response], Any]:
    return lambda r: [kind.from_json(item) for item in r.json()]


def _created(response: httpx.Response) -> models.Created:
    if response.status_code == 204:
        return models.Created(batch_id=None, tasks=[])
    tasks = [models.Task.from_json(t) for t in response.json()]
    return models.Created(batch_id=response.headers.get("X-Batch-ID"), tasks=tasks)


def _filters(**given: Any) -> dict[str, Any]:
    """Query parameters: the given ones, a ``metadata`` dict as JSON."""
    params = {k: v for k, v in given.items() if v is not None}
    if isinstance(params.get("metadata"), Mapping):
        params["metadata"] = json.dumps(params["metadata"])
    return params


def _counters(new_success: int, new_failures: int) -> dict[str, int]:
    return {"new_success": new_success, "new_failures": new_failures}


class Routes:
    """Every route of the API, once; ``_send`` runs a ``Call`` on ``self._http``, an
    instance of the subclass's ``HTTP`` (``httpx.Client`` or ``httpx.AsyncClient``;
    ``transport`` must be of its kind)."""

    HTTP: ClassVar[type[httpx.Client] | type[httpx.AsyncClient]]

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, token = settings(url, token)
        self.retry = retry or RetryPolicy()
        self._http = self.HTTP(
            base_url=self.url,
            headers=auth_headers(token),
            timeout=timeout,
            transport=transport,  # type: ignore[arg-type]
        )

    def _send(self, call: Call) -> Any:
        raise NotImplementedError

    # -- tasks ---------------------------------------------------------------------------

    def create_tasks(self, tasks: Any, *, requester: str | None = None) -> models.Created:
        """``POST /task``: a list of task objects, or a ``taskrunner.client.Batch`` (checked
        for cycles before anything is sent). Never retried once sent (it may have
        committed)."""
        if hasattr(tasks, "to_json"):
            requester = requester or getattr(tasks, "requester", None)
            tasks = tasks.to_json()  # raises CycleError on a cycle
        headers = {"X-Requester": requester} if requester else None
        return self._send(Call("POST", "/task", _created, body=tasks, headers=headers))

    def list_tasks(
        self,
        *,
        page: int = 0,
        per_page: int | None = None,
        status: str | None = None,
        kind: str | None = None,
        name: str | None = None,
        batch_id: str | None = None,
        metadata: Mapping[str, Any] | str | None = None,
    ) -> list[models.Task]:
        """``GET /task``: one page, newest first (``iter_tasks`` walks every page)."""
        params = _filters(
            page=page,
            per_page=per_page,
            status=status,
            kind=kind,
            name=name,
            batch_id=batch_id,
            metadata=metadata,
        )
        return self._send(Call("GET", "/task", _many(models.Task), params, repeatable=True))

    def get_task(self, task_id: str) -> models.TaskDetail:
        """``GET /task/{id}``: dependencies, actions, deliveries, ``why_not_running``."""
        return self._send(Call("GET", f"/task/{task_id}", _one(models.TaskDetail), repeatable=True))

    def update_task(
        self,
        task_id: str,
        *,
        status: str | None = None,
        new_success: int | None = None,
        new_failures: int | None = None,
        failure_reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        retryable: bool | None = None,
        expected_count: int | None = None,
        priority: int | None = None,
    ) -> models.Task:
        """``PATCH /task/{id}``: progress, outcome, metadata (merged into the task's),
        expected_count, priority; any call is a heartbeat. ``retryable=False`` with
        ``status="Failure"``: no retry, the task fails now."""
        body = _filters(
            status=status,
            new_success=new_success,
            new_failures=new_failures,
            failure_reason=failure_reason,
            retryable=retryable,
            expected_count=expected_count,
            priority=priority,
        )
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return self._send(Call("PATCH", f"/task/{task_id}", _one(models.Task), body=body))

    def cancel_task(self, task_id: str) -> models.Task:
        """``DELETE /task/{id}``: Canceled (a Running task's cancel actions fire)."""
        return self._send(Call("DELETE", f"/task/{task_id}", _one(models.Task)))

    def rerun_task(self, task_id: str) -> models.RerunResponse:
        """``POST /task/{id}/rerun``: a Failure/Canceled task runs again, with the tasks
        downstream that failed because of it."""
        path = f"/task/{task_id}/rerun"
        return self._send(Call("POST", path, _one(models.RerunResponse)))

    def pause_task(self, task_id: str) -> models.Task:
        """``PATCH /task/pause/{id}``: Waiting/Pending -> Paused."""
        return self._send(Call("PATCH", f"/task/pause/{task_id}", _one(models.Task)))

    def resume_task(self, task_id: str) -> models.Task:
        """``PATCH /task/resume/{id}``: Paused -> Waiting or Pending."""
        return self._send(Call("PATCH", f"/task/resume/{task_id}", _one(models.Task)))

    def add_counters(self, updates: list[Mapping[str, Any]]) -> models.Accepted:
        """``PUT /task``: ``[{"task_id", "new_success", "new_failures"}, ...]``, buffered
        by the server (flushed every ~100 ms)."""
        call = Call("PUT", "/task", _one(models.Accepted), body=list(updates), retry_503=True)
        return self._send(call)

    def add_task_counters(
        self, task_id: str, new_success: int = 0, new_failures: int = 0
    ) -> models.Accepted:
        """``PUT /task/{id}``: buffered counters of one task."""
        body = _counters(new_success, new_failures)
        call = Call("PUT", f"/task/{task_id}", _one(models.Accepted), body=body, retry_503=True)
        return self._send(call)

    def task_history(self, task_id: str) -> list[models.Transition]:
        """``GET /task/{id}/history``: every transition, oldest first."""
        path = f"/task/{task_id}/history"
        return self._send(Call("GET", path, _many(models.Transition), repeatable=True))

    def retry_delivery(self, delivery_id: str) -> models.Delivery:
        """``POST /delivery/{id}/retry``: queue again a webhook delivery that gave up."""
        path = f"/delivery/{delivery_id}/retry"
        return self._send(Call("POST", path, _one(models.Delivery)))

    # -- batches -------------------------------------------------------------------------

    def list_batches(
        self,
        *,
        page: int = 0,
        per_page: int | None = None,
        status: str | None = None,
        kind: str | None = None,
        name: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> list[models.BatchSummary]:
        """``GET /batches``: one page, newest first (``iter_batches`` walks every page)."""
        params = _filters(
            page=page,
            per_page=per_page,
            status=status,
            kind=kind,
            name=name,
            created_after=created_after,
            created_before=created_before,
        )
        call = Call("GET", "/batches", _many(models.BatchSummary), params, repeatable=True)
        return self._send(call)

    def get_batch(self, batch_id: str) -> models.BatchStats:
        """``GET /batch/{id}``: counts per status and the sums of the task counters."""
        call = Call("GET", f"/batch/{batch_id}", _one(models.BatchStats), repeatable=True)
        return self._send(call)

    def stop_batch(self, batch_id: str) -> models.StopBatchResponse:
        """``DELETE /batch/{id}``: every unfinished task -> Canceled, atomically."""
        call = Call("DELETE", f"/batch/{batch_id}", _one(models.StopBatchResponse), repeatable=True)
        return self._send(call)

    def rerun_batch(self, batch_id: str) -> models.RerunResponse:
        """``POST /batch/{id}/rerun``: every Failure/Canceled task of the batch runs again."""
        path = f"/batch/{batch_id}/rerun"
        return self._send(Call("POST", path, _one(models.RerunResponse)))

    def update_batch_rules(
        self, batch_id: str, kind: str, rules: list[Any]
    ) -> models.BatchRulesUpdated:
        """``PATCH /batch/{id}/rules``: replace the rules of ``kind`` on unfinished tasks."""
        body = {"kind": kind, "rules": [getattr(r, "to_json", lambda r=r: r)() for r in rules]}
        call = Call(
            "PATCH",
            f"/batch/{batch_id}/rules",
            _one(models.BatchRulesUpdated),
            body=body,
            repeatable=True,
        )
        return self._send(call)

    def get_dag(self, batch_id: str) -> models.Dag:
        """``GET /dag/{id}``: the batch's tasks and the links into them."""
        return self._send(Call("GET", f"/dag/{batch_id}", _one(models.Dag), repeatable=True))

    def list_problems(
        self, *, batch_id: str | None = None, limit: int | None = None
    ) -> models.Problems:
        """``GET /problems``: failing webhook deliveries and the tasks running longest."""
        params = _filters(batch_id=batch_id, limit=limit)
        call = Call("GET", "/problems", _one(models.Problems), params, repeatable=True)
        return self._send(call)

    # -- service -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._send(Call("GET", "/health", httpx.Response.json, repeatable=True))

    def ready(self) -> dict[str, Any]:
        return self._send(Call("GET", "/ready", httpx.Response.json, repeatable=True))

    def metrics(self) -> str:
        return self._send(Call("GET", "/metrics", lambda r: r.text, repeatable=True))

    def openapi(self) -> dict[str, Any]:
        return self._send(Call("GET", "/openapi.json", httpx.Response.json, repeatable=True))


__all__ = ["Call", "RetryPolicy", "Routes", "TaskrunnerError", "settings"]
