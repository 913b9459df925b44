"""A batch builder: DAGs written as Python objects, checked before anything is sent.

::

    batch = Batch(requester="nightly")
    ingest = batch.task("ingest", kind="ingest", on_start=webhook(f"{target}/start"),
                        rules=[concurrency("ingest", max=3, fields=["tenant"])])
    report = batch.task("report", kind="report", on_start=webhook(f"{target}/start"),
                        after=[ingest])
    created = client.create_tasks(batch)          # CycleError before sending on a cycle
    created["report"].id

Dependencies are references to tasks of the same builder (``after=[task]`` or
``task.after(other, requires_success=False)``), or UUIDs of tasks that already exist.
``to_json()`` is the ``POST /task`` body; it refuses a cycle (naming it) and a reference
to another builder's task. Everything else (URLs, ranges, sizes) the server checks, and
answers 400 naming the field, writing nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class CycleError(ValueError):
    """The builder's dependencies form a cycle (``cycle`` lists its local ids in order)."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("dependency cycle: " + " -> ".join(cycle))


def webhook(
    url: str,
    verb: str = "Post",
    *,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A webhook action: ``{"kind": "Webhook", "params": {url, verb, body?, headers?}}``."""
    params: dict[str, Any] = {"url": url, "verb": verb}
    if body is not None:
        params["body"] = body
    if headers:
        params["headers"] = dict(headers)
    return {"kind": "Webhook", "params": params}


def concurrency(
    kind: str, max: int, *, status: str = "Running", fields: Iterable[str] = ()
) -> dict[str, Any]:
    """A concurrency rule: fewer than ``max`` tasks of ``kind`` in ``status`` sharing the
    task's metadata values for ``fields`` (the API's ``Concurency`` spelling)."""
    matcher = {"kind": kind, "status": status, "fields": list(fields)}
    return {"Concurency": {"matcher": matcher, "max_concurency": max}}


def capacity(kind: str, max: int, *, fields: Iterable[str] = ()) -> dict[str, Any]:
    """A capacity rule: the remaining work (``expected_count - success - failures``) of
    running tasks of ``kind`` sharing the task's values for ``fields`` stays below ``max``
    at each start. The task needs an ``expected_count``."""
    matcher = {"kind": kind, "status": "Running", "fields": list(fields)}
    return {"Capacity": {"matcher": matcher, "max_capacity": max}}


def rate_limit(
    kind: str, max_starts: int, per_seconds: int, *, fields: Iterable[str] = ()
) -> dict[str, Any]:
    """A rate limit: at most ``max_starts`` starts of ``kind`` (the task's own) sharing the
    task's values for ``fields`` in any window of ``per_seconds`` seconds."""
    matcher = {"kind": kind, "fields": list(fields)}
    return {"RateLimit": {"matcher": matcher, "max_starts": max_starts, "per_seconds": per_seconds}}


@dataclass(eq=False)
class TaskSpec:
    """A task of a ``Batch``; ``after`` adds dependencies."""

    batch: Batch
    id: str
    name: str
    kind: str
    on_start: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    dependencies: list[tuple[TaskSpec | str, bool]] = field(default_factory=list)

    def after(self, *parents: TaskSpec | str, requires_success: bool = True) -> TaskSpec:
        """Depend on ``parents`` (tasks of this batch, or UUIDs of existing tasks)."""
        for parent in parents:
            if isinstance(parent, TaskSpec) and parent.batch is not self.batch:
                raise ValueError(f"{self.id}: {parent.id!r} belongs to another Batch")
            self.dependencies.append((parent, requires_success))
        return self

    def to_json(self) -> dict[str, Any]:
        deps = [
            {"id": p.id if isinstance(p, TaskSpec) else p, "requires_success": required}
            for p, required in self.dependencies
        ]
        task = {"id": self.id, "name": self.name, "kind": self.kind, "on_start": self.on_start}
        task.update(self.extra)
        if deps:
            task["dependencies"] = deps
        return task


class Batch:
    """The tasks of one ``POST /task``, in the order they were added."""

    def __init__(self, requester: str | None = None) -> None:
        self.requester = requester
        self.tasks: dict[str, TaskSpec] = {}

    def task(
        self,
        id: str,
        *,
        kind: str,
        on_start: dict[str, Any],
        name: str | None = None,
        after: Iterable[TaskSpec | str] = (),
        **fields: Any,
    ) -> TaskSpec:
        """Add a task with local id ``id`` (its ``name`` too, unless given). ``fields``
        are the other task fields as the API names them: ``metadata``, ``priority``,
        ``timeout``, ``rules``, ``on_success``, ``on_failure``, ``on_cancel``,
        ``dedupe_strategy``, ``retry``, ``not_before``, ``delay_seconds``, ``dead_end_barrier``."""
        if id in self.tasks:
            raise ValueError(f"local id {id!r} is used twice")
        spec = TaskSpec(self, id, name or id, kind, on_start, dict(fields))
        self.tasks[id] = spec
        return spec.after(*after)

    def check(self) -> None:
        """Raise ``CycleError`` if the dependencies among this batch's tasks loop."""
        cycle = _find_cycle(self.tasks.values())
        if cycle:
            raise CycleError(cycle)

    def to_json(self) -> list[dict[str, Any]]:
        """The ``POST /task`` body, after ``check()``."""
        self.check()
        return [spec.to_json() for spec in self.tasks.values()]


def _find_cycle(specs: Iterable[TaskSpec]) -> list[str] | None:
    """A cycle among ``specs`` as local ids (first one repeated at the end), or None.
    Iterative depth-first search: a 10,000-long chain must not hit the recursion limit."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in specs:
        if root.id in state:
            continue
        path: list[TaskSpec] = []
        stack: list[tuple[TaskSpec, Iterable]] = [(root, _parents(root))]
        state[root.id] = 1
        path.append(root)
        while stack:
            node, parents = stack[-1]
            nxt = next(parents, None)  # type: ignore[call-overload]
            if nxt is None:
                state[node.id] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt.id) == 1:
                start = next(i for i, s in enumerate(path) if s is nxt)
                return [s.id for s in path[start:]] + [nxt.id]
            elif nxt.id not in state:
                state[nxt.id] = 1
                path.append(nxt)
                stack.append((nxt, _parents(nxt)))
    return None


def _parents(spec: TaskSpec) -> Iterable[TaskSpec]:
    return iter([p for p, _ in spec.dependencies if isinstance(p, TaskSpec)])
