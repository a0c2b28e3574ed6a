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

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
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
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _instrument_clients(provider)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


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


def continue_trace(trace_id: str) -> Context | None:
    """A context inside the trace `trace_id` (32 hex digits, as stored with outbox events),
    for work an event causes later: its span joins the trace that caused the event, under a
    remote placeholder parent (the event's own span is not stored). None for no trace."""
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
