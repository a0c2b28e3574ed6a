"""A usage event whose occurred_at is past either end of the representable range is rejected
alone (EVENT_TOO_OLD / EVENT_IN_FUTURE); the other events of the call are recorded."""

from __future__ import annotations

from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
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
