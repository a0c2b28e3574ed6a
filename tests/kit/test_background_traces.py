"""Background loops leave no traces while idle; a run that does work is one trace: its span
with the run's queries under it."""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tally.kit.background import run_periodically
from tally.kit.telemetry import WorkOnly


async def test_idle_runs_export_nothing_and_a_working_run_is_one_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(WorkOnly(SimpleSpanProcessor(exporter)))
    tracer = provider.get_tracer("test")
    stop = asyncio.Event()
    runs = 0

    async def sweep() -> int:
        nonlocal runs
        runs += 1
        with tracer.start_as_current_span("SELECT", kind=trace.SpanKind.CLIENT):
            pass  # what the database instrumentation records for each query
        if runs == 5:
            stop.set()
            return 3  # this run handled three items
        return 0

    await run_periodically("sweep", 0.0, sweep, stop, tracer=tracer)
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["SELECT", "background.sweep"]
    root = next(s for s in spans if s.name == "background.sweep")
    query = next(s for s in spans if s.name == "SELECT")
    assert root.parent is None and root.attributes["tally.work_items"] == 3
    assert query.parent is not None and query.parent.span_id == root.context.span_id
    assert query.context.trace_id == root.context.trace_id
