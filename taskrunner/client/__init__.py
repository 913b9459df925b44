"""A Python client for the taskrunner API: ``Client`` (blocking) and ``AsyncClient``
(asyncio), both on httpx, with typed results, errors carrying the server's ``details``,
retries where they are safe, paging iterators, and a ``Batch`` builder.

    from taskrunner.client import Batch, Client, webhook

    with Client() as client:                      # TASKRUNNER_URL, API_TOKEN
        batch = Batch()
        a = batch.task("a", kind="etl", on_start=webhook("http://127.0.0.1:9000/start"))
        batch.task("b", kind="etl", on_start=webhook("http://127.0.0.1:9000/start"), after=[a])
        created = client.create_tasks(batch)
        print(client.get_batch(created.batch_id).status_counts)

``docs/client.md`` is the guide; ``core.py`` says which calls are retried and why.
"""

from taskrunner.client.aio import AsyncClient
from taskrunner.client.builder import (
    Batch,
    CycleError,
    TaskSpec,
    capacity,
    concurrency,
    rate_limit,
    webhook,
)
from taskrunner.client.core import DEFAULT_URL, NO_RETRIES, RetryPolicy
from taskrunner.client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    TaskrunnerError,
    Unauthorized,
    Unavailable,
    Unreachable,
)
from taskrunner.client.models import (
    Accepted,
    Action,
    BasicTask,
    BatchRulesUpdated,
    BatchStats,
    BatchSummary,
    Created,
    Dag,
    Delivery,
    Link,
    RerunResponse,
    RerunTask,
    StatusCounts,
    StopBatchResponse,
    Task,
    TaskDetail,
    Transition,
)
from taskrunner.client.sync import Client

__all__ = [
    "DEFAULT_URL",
    "NO_RETRIES",
    "Accepted",
    "Action",
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "BasicTask",
    "Batch",
    "BatchRulesUpdated",
    "BatchStats",
    "BatchSummary",
    "Client",
    "Conflict",
    "Created",
    "CycleError",
    "Dag",
    "Delivery",
    "Link",
    "NotFound",
    "RerunResponse",
    "RerunTask",
    "RetryPolicy",
    "StatusCounts",
    "StopBatchResponse",
    "Task",
    "TaskDetail",
    "TaskSpec",
    "TaskrunnerError",
    "Transition",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "capacity",
    "concurrency",
    "rate_limit",
    "webhook",
]
