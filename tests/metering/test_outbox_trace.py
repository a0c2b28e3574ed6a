"""Metering's outbox keeps the full W3C traceparent of the span that wrote each event, so the
notifier's span for a budget alarm is a child of that span (not of a parent span id invented
from a bare trace id, which no exporter ever sent)."""

from __future__ import annotations

from datetime import UTC, datetime

from opentelemetry import trace

from services.notifier.follower import MeteringSource
from tally.kit.telemetry import continue_trace
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
from tests.metering.test_authorize import add_budget
from tests.metering.test_ingestion import ACCEPTED, usage

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


async def test_a_budget_alarm_carries_the_traceparent_of_the_span_that_wrote_it(
        suite: Suite) -> None:
    await suite.fund("acme", 1_000)
    await add_budget(suite, "b-traced", 1, enforcement="ALERT_ONLY")
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[usage(
        "traced-1", model="gpt-4.1", input_tokens=2_400, output_tokens=0,
        at=datetime.now(UTC))]), metadata=(("traceparent", TRACEPARENT),))
    assert reply.results[0].status == ACCEPTED
    source = MeteringSource(suite.client.metering)
    async for batch in source.batches(0):
        event = batch[0]
        break
    stream = suite.client.metering.StreamEvents(mpb.StreamEventsRequest())
    wire = (await anext(aiter(stream))).events[0]
    stream.cancel()
    assert wire.trace_id == f"{TRACE_ID:032x}"
    version, trace_id, span_id, flags = wire.traceparent.split("-")
    assert (version, trace_id, len(span_id), flags) == ("00", f"{TRACE_ID:032x}", 16, "01")
    assert int(span_id, 16) != 0
    # the notifier continues the trace under that very span
    assert event.trace_id == wire.traceparent
    parent = trace.get_current_span(continue_trace(event.trace_id)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (TRACE_ID, int(span_id, 16))
