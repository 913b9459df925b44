"""The batch routes (ArcRun's shapes), a task's history, and the problems list.

``GET /batches``, ``GET|DELETE /batch/{id}``, ``PATCH /batch/{id}/rules``, ``GET /dag/{id}``,
``GET /task/{id}/history`` and ``GET /problems`` (ours: the web UI's problems view). Like
every resource, each responder validates its input, runs named queries over the SQL views
and functions a DBA can use too (``batch_summary``, ``stop_batch``, ``set_batch_rules``,
``batch_links``, ``task_history``, ``delivery_problems``, ``running_tasks``; docs/sql.md),
and writes JSON. Unknown batches (and ids that are not UUIDs) are a 404.
"""

from __future__ import annotations

import json
import logging

import falcon

from taskrunner.api import serialize
from taskrunner.api.errors import not_found
from taskrunner.api.resources import _send, _uuid_param, read_json
from taskrunner.api.store import Store
from taskrunner.api.validation import batch_list_filters, batch_rules_input, problems_filters

log = logging.getLogger("taskrunner.api")


class _Resource:
    """What every route here shares: the store, and reading about one id."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _read_about(self, id: str, what: str, *queries: str) -> list[list[dict]]:
        """The rows of each named query for ``{"id": id}``; a 404 when ``id`` is not a UUID
        or the first query finds nothing (no such ``what``: ``batch`` or ``task``)."""
        p = {"id": _uuid_param(id, what)}
        results = self.store.read(*((query, p) for query in queries))
        if not results[0]:
            raise not_found(f"{what} not found", [f"id: no {what} {p['id']}"])
        return results


class BatchCollection(_Resource):
    """``GET /batches``: one summary per batch, newest first, filtered and paginated."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        filters = batch_list_filters({name: req.get_param(name) for name in req.params})
        (rows,) = self.store.read(("list_batches", filters))
        _send(resp, [serialize.batch_summary(r) for r in rows])


class BatchItem(_Resource):
    """``/batch/{id}``: its stats (GET); stop it (DELETE: every unfinished task canceled)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        (rows,) = self._read_about(id, "batch", "get_batch")
        _send(resp, serialize.batch_stats(rows[0]))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        batch_id = _uuid_param(id, "batch")
        (row,) = self.store.call("stop_batch", {"id": batch_id})
        log.info("batch %s stopped: %s", batch_id, row, extra={"batch_id": batch_id})
        _send(resp, row)


class BatchRules(_Resource):
    """``PATCH /batch/{id}/rules``: replace the rules of one kind on the unfinished tasks."""

    def on_patch(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        batch_id = _uuid_param(id, "batch")
        change = batch_rules_input(read_json(req))
        params = {"id": batch_id, "kind": change["kind"], "rules": json.dumps(change["rules"])}
        (row,) = self.store.call("set_batch_rules", params)
        log.info(
            "batch %s: rules of kind %r replaced on %d tasks",
            batch_id,
            change["kind"],
            row["updated_count"],
            extra={"batch_id": batch_id},
        )
        _send(
            resp,
            {"batch_id": batch_id, "kind": change["kind"], "updated_count": row["updated_count"]},
        )


class BatchDag(_Resource):
    """``GET /dag/{id}``: the batch's tasks and the links into them."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        tasks, links = self._read_about(id, "batch", "batch_tasks", "batch_links")
        _send(resp, {"tasks": [serialize.basic_task(t) for t in tasks], "links": links})


class TaskHistory(_Resource):
    """``GET /task/{id}/history``: every transition of the task, oldest first."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        _task, history = self._read_about(id, "task", "get_task", "task_history")
        _send(resp, [serialize.transition(h) for h in history])


class Problems(_Resource):
    """``GET /problems``: failing webhook deliveries and the tasks running longest, over
    all batches or one (``batch_id``)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        filters = problems_filters({name: req.get_param(name) for name in req.params})
        deliveries, stuck = self.store.read(
            ("problem_deliveries", filters), ("stuck_tasks", filters)
        )
        _send(
            resp,
            {
                "deliveries": [serialize.problem_delivery(d) for d in deliveries],
                "running": stuck,
            },
        )
