"""The typed results of ``taskrunner.client``: one dataclass per object of the OpenAPI
document (``taskrunner.api.openapi``), with the document's field names.

``tests/test_client_models.py`` compares each class's fields with its schema's properties
both ways (``SCHEMA_NAMES`` below says which schema each class mirrors), so a field added
to the API and not here, or the reverse, fails a test. Times stay ISO 8601 strings and ids
UUID strings, exactly as the server sent them; ``from_json`` ignores fields it does not
know, so an older client keeps working against a newer server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Model")


class Model:
    """``from_json`` for a dataclass: nested objects from ``NESTED`` (field -> class; a
    list field holds a list of them); a field whose JSON name is a Python keyword carries
    ``metadata={"json": name}``."""

    NESTED: ClassVar[dict[str, type[Model]]] = {}

    @classmethod
    def json_names(cls) -> dict[str, str]:
        """``{python field name: JSON field name}``."""
        return {f.name: f.metadata.get("json", f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def from_json(cls: type[M], data: dict[str, Any]) -> M:
        values = {}
        for name, key in cls.json_names().items():
            if key not in data:
                continue  # an optional field the server left out: the default
            values[name] = _nested(cls.NESTED.get(name), data[key])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The object as the server sent it (JSON field names)."""
        out = {}
        for name, key in self.json_names().items():
            out[key] = _plain(getattr(self, name))
        return out


def _nested(kind: type[Model] | None, value: Any) -> Any:
    if kind is None or value is None:
        return value
    if isinstance(value, list):
        return [kind.from_json(v) for v in value]
    return kind.from_json(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Model):
        return value.to_json()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# -- tasks --------------------------------------------------------------------------------


@dataclass
class Task(Model):
    id: str
    batch_id: str
    name: str
    kind: str
    status: str
    local_id: str | None = None
    requester: str | None = None
    status_reason: str | None = None
    priority: int = 0
    timeout: int = 60
    metadata: dict[str, Any] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    expected_count: int | None = None
    success: int = 0
    failures: int = 0
    failure_reason: str | None = None
    created_at: str = ""
    started_at: str | None = None
    ended_at: str | None = None
    last_updated: str = ""
    attempt: int = 0
    retry: dict[str, Any] = field(default_factory=dict)
    not_before: str | None = None
    dead_end_barrier: bool = False


@dataclass
class Dependency(Model):
    id: str
    requires_success: bool


@dataclass
class Attempt(Model):
    attempt: int
    started_at: str
    finished_at: str
    worker: str | None = None
    status_code: int | None = None
    error: str | None = None


@dataclass
class Delivery(Model):
    NESTED = {"attempts": Attempt}

    id: str
    status: str
    attempt_count: int
    next_attempt_at: str
    created_at: str
    last_status_code: int | None = None
    last_error: str | None = None
    finished_at: str | None = None
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class ActionParams(Model):
    url: str
    verb: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Action(Model):
    NESTED = {"params": ActionParams, "deliveries": Delivery}

    id: int
    kind: str
    trigger: str
    params: ActionParams
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass
class FlatAction(Model):
    """One entry of ``TaskDetail.actions``: the seed's flat ``{kind, trigger, params}``."""

    NESTED = {"params": ActionParams}

    kind: str
    trigger: str
    params: ActionParams


@dataclass
class Parent(Model):
    """An unfinished parent in ``why_not_running``."""

    id: str
    name: str
    status: str
    requires_success: bool


@dataclass
class RuleAtLimit(Model):
    """A rule at its limit in ``why_not_running``."""

    rule: dict[str, Any]
    count: int
    max: int


@dataclass
class WhyNotRunning(Model):
    NESTED = {"parents": Parent, "rules": RuleAtLimit}

    reason: str
    parents: list[Parent] = field(default_factory=list)
    rules: list[RuleAtLimit] = field(default_factory=list)
    not_before: str | None = None


@dataclass
class TaskDetail(Task):
    """``GET /task/{id}``: the task with its dependencies, actions and deliveries."""

    NESTED = {
        "dependencies": Dependency,
        "on_start": Action,
        "on_success": Action,
        "on_failure": Action,
        "on_cancel": Action,
        "actions": FlatAction,
        "why_not_running": WhyNotRunning,
    }

    dependencies: list[Dependency] = field(default_factory=list)
    on_start: Action | None = None
    on_success: list[Action] = field(default_factory=list)
    on_failure: list[Action] = field(default_factory=list)
    on_cancel: list[Action] = field(default_factory=list)
    actions: list[FlatAction] = field(default_factory=list)
    why_not_running: WhyNotRunning | None = None


@dataclass
class Transition(Model):
    """One line of ``GET /task/{id}/history``; ``from_`` is the JSON ``from``."""

    at: str
    to: str
    from_: str | None = field(default=None, metadata={"json": "from"})
    reason: str | None = None
    actor: str | None = None


@dataclass
class Accepted(Model):
    """``PUT /task``: how many counter updates the buffer took."""

    accepted: int


# -- batches ------------------------------------------------------------------------------


@dataclass
class StatusCounts(Model):
    """Tasks per status; ``claimed``: Running tasks whose start is not acknowledged yet."""

    waiting: int = 0
    pending: int = 0
    claimed: int = 0
    running: int = 0
    success: int = 0
    failure: int = 0
    paused: int = 0
    canceled: int = 0

    UNFINISHED: ClassVar[tuple[str, ...]] = ("waiting", "pending", "claimed", "running", "paused")

    @property
    def unfinished(self) -> int:
        return sum(getattr(self, name) for name in self.UNFINISHED)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass
class BatchSummary(Model):
    NESTED = {"status_counts": StatusCounts}

    batch_id: str
    total_tasks: int
    first_created_at: str
    latest_updated_at: str
    status_counts: StatusCounts
    kinds: list[str] = field(default_factory=list)


@dataclass
class BatchStats(Model):
    NESTED = {"status_counts": StatusCounts}

    batch_id: str
    total_tasks: int
    total_success: int
    total_failures: int
    status_counts: StatusCounts
    first_created_at: str
    latest_updated_at: str
    kinds: list[str] = field(default_factory=list)
    total_expected: int | None = None


@dataclass
class StopBatchResponse(Model):
    batch_id: str
    canceled_waiting: int = 0
    canceled_pending: int = 0
    canceled_claimed: int = 0
    canceled_running: int = 0
    canceled_paused: int = 0
    already_terminal: int = 0


@dataclass
class RerunTask(Model):
    id: str
    batch_id: str
    from_status: str
    status: str


@dataclass
class RerunResponse(Model):
    """What a rerun changed: the tasks rerun, the tasks downstream that had failed because
    of them (back to Waiting), and pending children that wait for them again."""

    NESTED = {"rerun": RerunTask, "downstream": RerunTask, "waiting_again": RerunTask}

    rerun: list[RerunTask] = field(default_factory=list)
    downstream: list[RerunTask] = field(default_factory=list)
    waiting_again: list[RerunTask] = field(default_factory=list)


@dataclass
class BatchRulesUpdated(Model):
    batch_id: str
    kind: str
    updated_count: int


@dataclass
class BasicTask(Model):
    id: str
    name: str
    kind: str
    status: str
    created_at: str
    batch_id: str
    started_at: str | None = None
    ended_at: str | None = None
    success: int = 0
    failures: int = 0
    priority: int = 0
    expected_count: int | None = None
    dead_end_barrier: bool = False


@dataclass
class Link(Model):
    parent_id: str
    child_id: str
    requires_success: bool


@dataclass
class Dag(Model):
    NESTED = {"tasks": BasicTask, "links": Link}

    tasks: list[BasicTask] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)


@dataclass
class ProblemDelivery(Model):
    """A webhook delivery that gave up or is retrying after an error (``GET /problems``)."""

    id: str
    task_id: str
    task_name: str
    batch_id: str
    trigger: str
    status: str
    attempt_count: int
    next_attempt_at: str
    url: str
    verb: str
    last_status_code: int | None = None
    last_error: str | None = None


@dataclass
class RunningTask(Model):
    id: str
    name: str
    kind: str
    batch_id: str
    last_updated: str
    timeout_at: str
    claimed_by: str | None = None
    claimed_at: str | None = None
    started_at: str | None = None


@dataclass
class Problems(Model):
    """``GET /problems``: failing deliveries, and running tasks (longest running first)."""

    NESTED = {"deliveries": ProblemDelivery, "running": RunningTask}

    deliveries: list[ProblemDelivery] = field(default_factory=list)
    running: list[RunningTask] = field(default_factory=list)


@dataclass
class Created:
    """``POST /task``: the batch id (``X-Batch-ID``) and the created tasks in input order;
    no tasks (and ``batch_id`` None) when the dedupe strategy skipped every one (204)."""

    batch_id: str | None
    tasks: list[Task]

    def to_json(self) -> dict[str, Any]:
        """``{"batch_id", "tasks"}``, as ``taskrunner task create --json`` prints it."""
        return {"batch_id": self.batch_id, "tasks": _plain(self.tasks)}

    def __getitem__(self, local_id: str) -> Task:
        """The created task of a local id: ``created["ingest"].id``."""
        for task in self.tasks:
            if task.local_id == local_id:
                return task
        raise KeyError(local_id)


# Which schema of the OpenAPI document each class mirrors; a nested inline object is named
# by its path in the document (tests/test_client_models.py checks every one).
SCHEMA_NAMES: dict[type[Model], str] = {
    Task: "Task",
    TaskDetail: "TaskDetail",
    Dependency: "TaskDetail.dependencies[]",
    Attempt: "Attempt",
    Delivery: "Delivery",
    Action: "Action",
    ActionParams: "Action.params",
    FlatAction: "TaskDetail.actions[]",
    WhyNotRunning: "WhyNotRunning",
    Parent: "WhyNotRunning.parents[]",
    RuleAtLimit: "WhyNotRunning.rules[]",
    Transition: "Transition",
    Accepted: "Accepted",
    StatusCounts: "StatusCounts",
    BatchSummary: "BatchSummary",
    BatchStats: "BatchStats",
    StopBatchResponse: "StopBatchResponse",
    RerunTask: "RerunTask",
    RerunResponse: "RerunResponse",
    BatchRulesUpdated: "BatchRulesUpdated",
    BasicTask: "BasicTask",
    Link: "Link",
    Dag: "Dag",
    ProblemDelivery: "ProblemDelivery",
    RunningTask: "RunningTask",
    Problems: "Problems",
}
