"""The API's request log: one line per request, at info, on the ``taskrunner.api.requests``
logger (``ACCESS_LOG=false`` turns it off, ``LOG_LEVEL=warning`` silences it).

Probes (``/health``, ``/ready``, ``/metrics``), which load balancers and Prometheus call
every few seconds, are logged at debug. Headers are never logged (``Authorization``
carries ``API_TOKEN``).
"""

from __future__ import annotations

import logging
import time

import falcon

log = logging.getLogger("taskrunner.api.requests")

PROBES = frozenset({"/health", "/ready", "/metrics"})


class RequestLog:
    """Falcon middleware; first in the stack, so it also sees requests that the
    authentication middleware refused."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool
    ) -> None:
        level = logging.DEBUG if req.path in PROBES else logging.INFO
        if not log.isEnabledFor(level):
            return
        started = req.context.get("started")
        ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        target = f"{req.path}?{req.query_string}" if req.query_string else req.path
        status = resp.status_code
        log.log(
            level,
            "%s %s %d %.1fms",
            req.method,
            target,
            status,
            ms,
            extra={"method": req.method, "path": req.path, "status": status, "ms": round(ms, 1)},
        )
