"""OpenTelemetry setup shared by every process.

Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard variable,
so collectors and operators configure Tally like any other OTel-instrumented program);
PostgreSQL statements and Redis commands then get client spans under the RPC that made them,
and traces are sampled by the parent: a trace a caller started keeps its caller's decision, a
trace this process starts is recorded with probability `OTEL_TRACES_SAMPLER_ARG` (a ratio,
default 1.0). Otherwise the database and Redis clients are not instrumented at all (the
wrappers cost the hot paths a fifth of their CPU) and spans still get trace and span ids, so
trace ids reach the logs and propagate to the next service, but a trace this process starts
is not recorded (nothing would export it, and recording costs every RPC tens of
microseconds); a trace a caller marked sampled still is, and stays sampled downstream.
`OTEL_TRACES_SAMPLER`, when set, decides instead.
"""

from __future__ import annotations

import os
import random
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

_provider: TracerProvider | None = None


def setup_telemetry(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Installs the global tracer provider for `service` (once per process) and returns it.

    `exporter` overrides the OTLP exporter (tests pass an in-memory one).
    """
    global _provider
    if _provider is not None:
        return _provider
    if exporter is None and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    sampler: Sampler | None = None  # OTEL_TRACES_SAMPLER, when set
    if not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = (ParentBased(ALWAYS_OFF) if exporter is None
                   else ParentBased(TraceIdRatioBased(sample_ratio())))
    provider = TracerProvider(resource=Resource.create({"service.name": f"tally-{service}"}),
                              sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(WorkOnly(BatchSpanProcessor(exporter)))
        _instrument_clients(provider)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


BACKGROUND: Final = "tally.background"
"""Attribute naming the loop on a background tick's span (kit.background)."""
WORK_ITEMS: Final = "tally.work_items"
"""Attribute on a background tick's span: what it did; 0 = nothing, and nothing is exported."""
_MAX_HELD_SPANS: Final = 10_000


class WorkOnly(SpanProcessor):
    """Exports a background tick's trace (its span and the queries under it) only when the
    tick did work: an idle loop polling every 100 ms made hundreds of root traces of bare
    SELECT/UPDATE/BEGIN spans a second. Everything else passes straight through."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner
        self._held: dict[int, list[ReadableSpan]] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.parent is None and span.attributes and BACKGROUND in span.attributes:
            self._held[span.context.trace_id] = []
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        held = self._held.get(context.trace_id) if context is not None else None
        if held is None:
            self.inner.on_end(span)
            return
        if span.parent is not None:
            if len(held) < _MAX_HELD_SPANS:
                held.append(span)
            return
        del self._held[context.trace_id]
        if (span.attributes or {}).get(WORK_ITEMS, 1):
            for child in held:
                self.inner.on_end(child)
            self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def sample_ratio() -> float:
    """The share of traces this process starts that are recorded (OTEL_TRACES_SAMPLER_ARG,
    0..1, default 1); a bad value is refused at start-up, naming the variable."""
    raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not raw:
        return 1.0
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {raw!r} is not a ratio in 0..1")
    return ratio


def _instrument_clients(provider: TracerProvider) -> None:
    """A client span for every PostgreSQL statement (asyncpg: the pools of the hot paths)
    and Redis command (the limiter), children of the RPC that made them."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)


def shutdown_telemetry() -> None:
    """Flushes and stops span export (called last on shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    """A tracer for instrumenting one module."""
    return trace.get_tracer(name)


def current_trace_id() -> str:
    """The W3C trace id of the current span (32 hex digits), or "" outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("00-<trace>-<span>-<flags>"), or "" outside
    any trace: stored with an outbox event, so what the event causes later is a child of the
    span that wrote it."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _is_traceparent(reference: str) -> bool:
    return len(reference) == 55 and reference[2] == "-" and reference[35] == "-"


def trace_id_of(reference: str) -> str:
    """The trace id (32 hex digits) in a stored trace reference: a traceparent or a bare
    trace id (events stored before traceparents were)."""
    return reference[3:35] if _is_traceparent(reference) else reference


def continue_trace(trace_id: str) -> Context | None:
    """A context inside the trace of a stored reference, for work an event causes later.

    A W3C traceparent (what outbox events store): its span is the parent, so the new span
    hangs under the span that wrote the event. A bare trace id (older events): the span
    joins the trace under a remote placeholder parent. None for no trace."""
    if _is_traceparent(trace_id):
        try:
            trace_value, span_value = int(trace_id[3:35], 16), int(trace_id[36:52], 16)
            flags = int(trace_id[53:55], 16)
        except ValueError:
            return None
        if not trace_value or not span_value:
            return None
        return trace.set_span_in_context(NonRecordingSpan(SpanContext(
            trace_value, span_value, is_remote=True, trace_flags=TraceFlags(flags))))
    try:
        value = int(trace_id, 16)
    except ValueError:
        return None
    if not value:
        return None
    parent = SpanContext(value, random.getrandbits(64) or 1, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def annotate(**attributes: str | int | bool) -> None:
    """Puts domain facts (org, decision, reason, amounts) on the current span as `tally.*`
    attributes, when it is being recorded."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"tally.{key}": value for key, value in attributes.items()})
