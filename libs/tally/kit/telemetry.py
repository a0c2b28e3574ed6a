"""OpenTelemetry setup shared by every process.

Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard variable,
so collectors and operators configure Tally like any other OTel-instrumented program);
PostgreSQL statements and Redis commands get client spans under the RPC that made them.
Otherwise spans still get trace and span ids, so trace ids reach the logs and propagate to
the next service, but a trace this process starts is not recorded (nothing would export it,
and recording costs every RPC tens of microseconds); a trace a caller marked sampled still is,
and stays sampled downstream. `OTEL_TRACES_SAMPLER`, when set, decides instead.
"""

from __future__ import annotations

import os
import random

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
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
    sampler = None  # the SDK's default, or OTEL_TRACES_SAMPLER
    if exporter is None and not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ParentBased(ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create({"service.name": f"tally-{service}"}),
                              sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _instrument_clients(provider)
    _provider = provider
    return provider


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
