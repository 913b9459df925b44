"""W3C trace context, and OpenTelemetry spans when the ``otel`` extra is in use.

Trace context (always on, standard library only). ``parse`` reads a ``traceparent`` header
(and its ``tracestate``) as https://www.w3.org/TR/trace-context/ says: a malformed one is
ignored (None), as the recommendation asks of a receiver, and so is its tracestate. The
API stores what it read with the batch (``taskrunner.batch.traceparent``), the claims hand
it to the worker with each work item, and the worker sends ``TraceContext.child()`` on
every webhook: the same trace id and flags, a new span id whose parent is the stored one.

OpenTelemetry (``pip install 'taskrunner[otel]'``, then ``OTEL_EXPORTER_OTLP_ENDPOINT``):
``configure`` exports spans over OTLP/HTTP for API requests, claims and webhooks. Without
the endpoint nothing of OpenTelemetry is imported; with it but without the extra, a
warning says so and nothing else changes. Spans then take the place of bare span ids: the
API stores its request span as the batch's parent, and a webhook carries its own span's
id. Tests ``enable`` a provider of their own (the SDK's in-memory exporter).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# version-trace_id-parent_id-flags; a future version may add fields after a "-"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
# what a receiver must pass on at least (and what batch.tracestate holds at most)
TRACESTATE_MAX = 512
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class TraceContext:
    """A position in a trace: its trace id, a span id in it, the trace flags (hex)."""

    trace_id: str
    span_id: str
    flags: str = "01"
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` header (version 00, the one this code speaks)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """A new span of the same trace whose parent is this one."""
        return TraceContext(self.trace_id, new_span_id(), self.flags, self.tracestate)

    def headers(self) -> dict[str, str]:
        """``traceparent`` and, when there is one, ``tracestate``."""
        if self.tracestate:
            return {TRACEPARENT: self.traceparent, TRACESTATE: self.tracestate}
        return {TRACEPARENT: self.traceparent}


def new_span_id() -> str:
    while (span_id := secrets.token_hex(8)) == _ZERO_SPAN:
        pass
    return span_id


def parse(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The trace context of these headers; None when ``traceparent`` is missing or
    malformed (wrong length or case, version ``ff``, an all-zero id, trailing data on
    version 00). A higher version is read by its first four fields. ``tracestate`` is
    kept when it is printable ASCII of at most 512 characters, else dropped."""
    if not traceparent:
        return None
    value = traceparent.strip(" \t")
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, flags, _tracestate(tracestate))


def _tracestate(value: str | None) -> str | None:
    value = (value or "").strip(" \t")
    if not value or len(value) > TRACESTATE_MAX or not _PRINTABLE.fullmatch(value):
        return None
    return value


# --- OpenTelemetry ---------------------------------------------------------------------

_tracer: Any = None  # an opentelemetry Tracer while spans are on
_provider: Any = None


def configure(service_name: str) -> None:
    """Turn spans on for this process when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
    (``OTEL_SERVICE_NAME`` overrides ``service_name``; the other ``OTEL_*`` variables of
    the OTLP exporter apply too)."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry is not installed: "
            "pip install 'taskrunner[otel]'; no spans are exported"
        )
        return
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    enable(provider)
    endpoint = os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
    log.info("OpenTelemetry spans on: service %s, OTLP to %s", name, endpoint)


def enable(provider: Any) -> None:
    """Record spans with this ``TracerProvider`` (``configure`` or a test)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("taskrunner")


def disable() -> None:
    global _tracer, _provider
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Export the spans still buffered (a process's last act)."""
    if _provider is not None:
        _provider.shutdown()


_KINDS = {"server": "SERVER", "client": "CLIENT", "internal": "INTERNAL"}


def start_span(
    name: str,
    kind: str = "internal",
    parent: TraceContext | None = None,
    attributes: Mapping[str, Any] | None = None,
    start_time: int | None = None,
) -> Any:
    """A started span (None while spans are off): a child of ``parent`` (a remote
    context: a request's or a batch's traceparent), else the root of a new trace.
    ``start_time`` in ns since the epoch (``time.time_ns()``), default now."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = None
    if parent is not None:
        span_context = trace.SpanContext(
            trace_id=int(parent.trace_id, 16),
            span_id=int(parent.span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(parent.flags, 16) & 0xFF),
            trace_state=trace.TraceState.from_header([parent.tracestate or ""]),
        )
        context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    return _tracer.start_span(
        name,
        context=context,
        kind=getattr(trace.SpanKind, _KINDS[kind]),
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        start_time=start_time,
    )


def end_span(
    span: Any,
    attributes: Mapping[str, Any] | None = None,
    error: str | None = None,
    end_time: int | None = None,
) -> None:
    """End ``span`` (None: nothing), with more attributes; ``error`` marks it failed."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    for key, value in (attributes or {}).items():
        if value is not None:
            span.set_attribute(key, value)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_time)


def context_of(span: Any, tracestate: str | None = None) -> TraceContext:
    """The trace context a span's children point to (``tracestate`` passed along)."""
    ctx = span.get_span_context()
    return TraceContext(
        f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{int(ctx.trace_flags):02x}", tracestate
    )
