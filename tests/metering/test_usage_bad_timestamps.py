"""A usage event whose occurred_at is past either end of the representable range is rejected
alone (EVENT_TOO_OLD / EVENT_IN_FUTURE); the other events of the call are recorded."""

from __future__ import annotations

from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
from tests.metering.test_authorize import sql
from tests.metering.test_ingestion import ACCEPTED, REJECTED, usage


async def test_an_unrepresentable_timestamp_rejects_only_its_event(suite: Suite) -> None:
    await suite.fund("acme", 100)
    future, past, bad_nanos = usage("far-future"), usage("far-past"), usage("bad-nanos")
    future.occurred_at.seconds = 2**62
    past.occurred_at.seconds = -(2**62)
    bad_nanos.occurred_at.nanos = 1_000_000_000
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("fine-1"), future, past, bad_nanos, usage("fine-2")]))
    outcome = [(r.status, r.reason, r.field) for r in reply.results]
    assert outcome == [
        (ACCEPTED, "", ""),
        (REJECTED, "EVENT_IN_FUTURE", "occurred_at"),
        (REJECTED, "EVENT_TOO_OLD", "occurred_at"),
        (REJECTED, "INVALID_ARGUMENT", "occurred_at"),
        (ACCEPTED, "", ""),
    ]


async def test_a_nul_in_one_event_rejects_only_that_event(suite: Suite) -> None:
    await suite.fund("acme", 100)
    in_model, in_label, in_evidence = usage("nul-model"), usage("nul-label"), usage("nul-ev")
    in_model.model = "gpt-4.1-mini\x00"
    in_label.context.labels["team"] = "a\x00b"
    in_evidence.evidence.request_id = "req\x00"
    events = [usage("ok-1"), in_model, in_label, in_evidence, usage("ok-2")]
    expected = [(ACCEPTED, "", ""),
                (REJECTED, "INVALID_ARGUMENT", "model"),
                (REJECTED, "INVALID_ARGUMENT", "context.labels"),
                (REJECTED, "INVALID_ARGUMENT", "evidence.request_id"),
                (ACCEPTED, "", "")]
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=events))
    assert [(r.status, r.reason, r.field) for r in reply.results] == expected
    assert "NUL" in reply.results[1].message

    async def one_batch():  # type: ignore[no-untyped-def]
        renamed = [mpb.UsageEvent() for _ in events]
        for copy, event in zip(renamed, events, strict=True):
            copy.CopyFrom(event)
            copy.event_id = f"s-{event.event_id}"
        yield mpb.StreamUsageRequest(batch_id="b1", events=renamed)

    acks = [ack async for ack in suite.client.metering.StreamUsage(one_batch())]
    assert [(r.status, r.reason, r.field) for r in acks[0].results] == expected
    rows = await sql(suite, "SELECT event_id FROM metering.usage_events ORDER BY event_id")
    assert [r[0] for r in rows] == ["ok-1", "ok-2", "s-ok-1", "s-ok-2"]
