"""The API's request metrics: ``http_requests_total{method,route,code}`` and
``http_request_duration_seconds{method,route}`` (taskrunner.metrics), for the error-rate
and latency alerts in ``deploy/prometheus/``.

``route`` is the route's template (``/task/{id}``), never the path, so task ids do not
become label values; a path no route matches counts as ``unmatched``, the web UI's files
as ``/ui/static``.
"""

from __future__ import annotations

import time

import falcon

from taskrunner import metrics
from taskrunner.api.ui import STATIC_PREFIX


class RequestMetrics:
    """Falcon middleware; first in the stack, so it also counts refused requests."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool
    ) -> None:
        started = req.context.get("metrics_started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        metrics.observe_request(req.method, route_of(req), resp.status_code, seconds)


def route_of(req: falcon.Request) -> str:
    """The label for the route that served ``req``."""
    if req.uri_template:
        return req.uri_template
    if req.path.startswith(STATIC_PREFIX + "/"):
        return STATIC_PREFIX
    return "unmatched"
