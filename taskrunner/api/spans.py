"""OpenTelemetry spans of API requests (with the ``otel`` extra and
``OTEL_EXPORTER_OTLP_ENDPOINT``; see ``taskrunner.tracing``).

One SERVER span per request, a child of the request's ``traceparent`` when it has a valid
one, named ``<METHOD> <route>`` (``POST /task``, ``GET /task/{id}``). ``req.context.span``
holds it, so ``POST /task`` can store it as the new batch's parent. Headers and query
strings are not recorded.
"""

from __future__ import annotations

import falcon

from taskrunner import tracing


def request_trace(req: falcon.Request) -> tracing.TraceContext | None:
    """The trace context a request carries in ``traceparent``/``tracestate``, if valid."""
    return tracing.parse(req.get_header(tracing.TRACEPARENT), req.get_header(tracing.TRACESTATE))


class RequestSpans:
    """Falcon middleware; first in the stack, so refused requests get their span too."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.span = tracing.start_span(
            req.method,
            kind="server",
            parent=request_trace(req),
            attributes={"http.request.method": req.method, "url.path": req.path},
        )

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool
    ) -> None:
        span = req.context.get("span")
        if span is None:
            return
        route = req.uri_template
        if route:
            span.update_name(f"{req.method} {route}")
        status = resp.status_code
        error = f"HTTP {status}" if status >= 500 else None
        tracing.end_span(
            span, {"http.route": route, "http.response.status_code": status}, error=error
        )
