"""Usage ingestion through the real services: rated, deduplicated forever, durably debited."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from services.metering.ingestion.rollup import RollupWorker
from services.metering.server import MeteringConfig
from tally.common.v1 import common_pb2
from tally.kit import db, errors
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import CREDIT, Suite, start_suite, stop_suite

ACCEPTED = mpb.EVENT_STATUS_ACCEPTED
DUPLICATE = mpb.EVENT_STATUS_DUPLICATE
REJECTED = mpb.EVENT_STATUS_REJECTED
# One instant for every event that does not name its own, so a resent event is identical.
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


def usage(event_id: str, org: str = "acme", *, model: str = "gpt-4.1-mini",
          input_tokens: int = 1200, output_tokens: int = 300,
          at: datetime | None = None, **context: str) -> mpb.UsageEvent:
    event = mpb.UsageEvent(
        event_id=event_id, model=model, operation=mpb.OPERATION_CHAT,
        context=common_pb2.RequestContext(org_id=org, **context),
        quantities=[
            common_pb2.MeterQuantity(meter=common_pb2.METER_INPUT_TOKENS, quantity=input_tokens),
            common_pb2.MeterQuantity(meter=common_pb2.METER_OUTPUT_TOKENS,
                                     quantity=output_tokens),
        ])
    event.occurred_at.FromDatetime(at or AN_HOUR_AGO)
    return event


async def balance(suite: Suite, org: str = "acme") -> lpb.Balance:
    return (await suite.client.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))).balance


async def test_an_accepted_event_has_a_receipt_and_is_debited(suite: Suite) -> None:
    await suite.fund("acme", 100)
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("e-1", user_id="alice", labels={"team": "search"})]))
    (result,) = reply.results
    assert result.status == ACCEPTED, result
    receipt = result.receipt
    assert receipt.cost_micros > 0
    assert sum(line.cost_micros for line in receipt.lines) == receipt.cost_micros
    assert {line.meter for line in receipt.lines} == {
        common_pb2.METER_INPUT_TOKENS, common_pb2.METER_OUTPUT_TOKENS}
    assert receipt.price_book_version >= 1
    assert receipt.ledger_transfer_id
    after = await balance(suite)
    assert after.posted_micros == 100 * CREDIT - receipt.cost_micros
    assert receipt.balance_after_micros == after.available_micros
    shown = await suite.client.metering.GetUsageEvent(
        mpb.GetUsageEventRequest(org_id="acme", event_id="e-1"))
    assert shown.receipt == receipt
    assert shown.event.context.user_id == "alice"


async def test_a_replayed_event_is_a_duplicate_and_charged_once(suite: Suite) -> None:
    await suite.fund("acme", 100)
    first = (await suite.client.metering.RecordUsage(
        mpb.RecordUsageRequest(events=[usage("e-1")]))).results[0]
    again = (await suite.client.metering.RecordUsage(
        mpb.RecordUsageRequest(events=[usage("e-1")]))).results[0]
    assert again.status == DUPLICATE
    assert again.receipt == first.receipt
    changed = (await suite.client.metering.RecordUsage(
        mpb.RecordUsageRequest(events=[usage("e-1", input_tokens=9999)]))).results[0]
    assert (changed.status, changed.reason) == (REJECTED, "IDEMPOTENCY_KEY_REUSED")
    assert (await balance(suite)).posted_micros == 100 * CREDIT - first.receipt.cost_micros


async def test_bad_events_are_rejected_naming_the_field_and_the_rest_commit(
    suite: Suite,
) -> None:
    await suite.fund("acme", 100)
    now = datetime.now(UTC)
    negative = usage("neg")
    negative.quantities[1].quantity = -5
    unknown_meter = usage("meter")
    unknown_meter.quantities.add(meter=99, quantity=1)  # type: ignore[arg-type]
    no_time = usage("no-time")
    no_time.ClearField("occurred_at")
    cases = {
        "neg": ("INVALID_ARGUMENT", "quantities[1].quantity", negative),
        "meter": ("UNKNOWN_METER", "quantities[2].meter", unknown_meter),
        "model": ("UNKNOWN_MODEL", "model", usage("model", model="no-such-model")),
        "old": ("EVENT_TOO_OLD", "occurred_at", usage("old", at=now - timedelta(days=36))),
        "future": ("EVENT_IN_FUTURE", "occurred_at",
                   usage("future", at=now + timedelta(minutes=6))),
        "no-time": ("INVALID_ARGUMENT", "occurred_at", no_time),
        "": ("INVALID_ARGUMENT", "event_id", usage("")),
        "no-org": ("INVALID_ARGUMENT", "context.org_id", usage("no-org", org="")),
    }
    events = [usage("good-1"), *(case[2] for case in cases.values()), usage("good-2")]
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=events))
    assert [r.status for r in reply.results] == [ACCEPTED, *[REJECTED] * len(cases), ACCEPTED]
    for result, (reason, field, _) in zip(reply.results[1:-1], cases.values(), strict=True):
        assert (result.reason, result.field) == (reason, field), result
    cost = sum(r.receipt.cost_micros for r in reply.results if r.status == ACCEPTED)
    assert (await balance(suite)).posted_micros == 100 * CREDIT - cost
    with pytest.raises(TallyError) as caught:
        await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
            events=[usage(f"x{i}") for i in range(101)]))
    assert caught.value.reason is Reason.BATCH_TOO_LARGE


async def test_a_late_event_is_rated_with_the_book_of_its_time(suite: Suite) -> None:
    await suite.fund("acme", 100)
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("late", at=datetime.now(UTC) - timedelta(days=30))]))
    assert reply.results[0].status == ACCEPTED


async def test_stream_of_1000_with_one_bad_event_accepts_999(suite: Suite) -> None:
    await suite.fund("acme", 1000)
    events = [usage(f"s-{i}") for i in range(1000)]
    events[500] = usage("s-500", model="no-such-model")

    async def batches():  # type: ignore[no-untyped-def]
        yield mpb.StreamUsageRequest(batch_id="1", events=events)

    acks = [ack async for ack in suite.client.metering.StreamUsage(batches())]
    assert [a.batch_id for a in acks] == ["1"]
    statuses = [r.status for r in acks[0].results]
    assert statuses.count(ACCEPTED) == 999
    assert acks[0].results[500].reason == "UNKNOWN_MODEL"


async def test_stream_acks_each_batch_in_order(suite: Suite) -> None:
    await suite.fund("acme", 1000)

    async def batches():  # type: ignore[no-untyped-def]
        for b in range(20):
            yield mpb.StreamUsageRequest(batch_id=str(b),
                                         events=[usage(f"o-{b}-{i}") for i in range(50)])

    acks = [ack async for ack in suite.client.metering.StreamUsage(batches())]
    assert [a.batch_id for a in acks] == [str(b) for b in range(20)]
    assert all(r.status == ACCEPTED for a in acks for r in a.results)


async def test_100k_events_from_8_streams_each_sent_twice_are_charged_once(
    suite: Suite,
) -> None:
    orgs = [f"org-{i}" for i in range(4)]
    for org in orgs:
        await suite.fund(org, 100_000)
    total = 100_000
    rng = random.Random(7)
    events = [usage(f"big-{i}", org=orgs[i % len(orgs)], input_tokens=rng.randint(1, 5000),
                    output_tokens=rng.randint(0, 2000)) for i in range(total)]
    sends = events + events
    rng.shuffle(sends)
    per_client = [sends[i::8] for i in range(8)]
    receipts: dict[str, int] = {}

    async def client_stream(mine: list[mpb.UsageEvent]) -> None:
        async def batches():  # type: ignore[no-untyped-def]
            for start in range(0, len(mine), 1000):
                yield mpb.StreamUsageRequest(batch_id=str(start), events=mine[start:start + 1000])

        async for ack in suite.client.metering.StreamUsage(batches()):
            for result in ack.results:
                assert result.status in (ACCEPTED, DUPLICATE), result
                previous = receipts.setdefault(result.event_id, result.receipt.cost_micros)
                assert previous == result.receipt.cost_micros

    await asyncio.gather(*(client_stream(mine) for mine in per_client))
    assert len(receipts) == total
    charged = sum(receipts.values())
    debited = 0
    for org in orgs:
        debited += 100_000 * CREDIT - (await balance(suite, org)).posted_micros
    assert debited == charged
    # the roll-ups follow the commits off the ack path: once caught up they add up too
    pool = await asyncpg.create_pool(db.asyncpg_url(suite.db_url), min_size=1, max_size=2)
    try:
        await RollupWorker(pool).catch_up()
    finally:
        await pool.close()
    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:
        rolled = await conn.fetchval("SELECT sum(credits_micros) FROM metering.usage_daily")
        events_rolled = await conn.fetchval(
            "SELECT sum(event_count) FROM metering.usage_daily_events")
        debited_in_ledger = await conn.fetchval(
            "SELECT sum(amount_micros) FROM ledger.transfers WHERE kind = 'USAGE'")
    finally:
        await conn.close()
    assert rolled == charged
    assert events_rolled == total
    assert debited_in_ledger == charged


async def test_a_stream_past_its_lifetime_acks_what_it_read_and_asks_to_reconnect(
    db_url: str,
) -> None:
    suite = await start_suite(db_url, MeteringConfig(stream_lifetime_s=1))
    try:
        await suite.fund("acme", 100)
        acked = asyncio.Event()
        told_to_reconnect = asyncio.Event()

        async def batches():  # type: ignore[no-untyped-def]
            yield mpb.StreamUsageRequest(batch_id="1", events=[usage("life-1")])
            await acked.wait()
            yield mpb.StreamUsageRequest(batch_id="2", events=[usage("life-2")])
            await told_to_reconnect.wait()  # idle: the server must end the stream itself

        replies = []
        async for reply in suite.client.metering.StreamUsage(batches()):
            replies.append(reply)
            if reply.batch_id == "1":
                acked.set()
            if reply.reconnect:
                told_to_reconnect.set()
        assert [(r.batch_id, r.reconnect) for r in replies] == [
            ("1", False), ("2", False), ("", True)]
        assert all(r.results[0].status == ACCEPTED for r in replies[:2])
    finally:
        await stop_suite(suite)


async def test_an_oversized_stream_batch_ends_the_stream_after_the_earlier_acks(
    suite: Suite,
) -> None:
    await suite.fund("acme", 100)

    async def batches():  # type: ignore[no-untyped-def]
        yield mpb.StreamUsageRequest(batch_id="ok", events=[usage("fine")])
        yield mpb.StreamUsageRequest(batch_id="big",
                                     events=[usage(f"big-{i}") for i in range(1001)])

    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for ack in suite.client.metering.StreamUsage(batches()):
            acks.append(ack.batch_id)
    assert acks == ["ok"]
    error = errors.from_rpc_error(caught.value)
    assert error is not None and error.reason is Reason.BATCH_TOO_LARGE
    assert error.message.startswith("events:")


async def test_a_shutting_down_server_acks_what_it_read_and_asks_streams_to_reconnect(
    suite: Suite,
) -> None:
    await suite.fund("acme", 100)
    acked = asyncio.Event()
    done = asyncio.Event()

    async def batches():  # type: ignore[no-untyped-def]
        yield mpb.StreamUsageRequest(batch_id="1", events=[usage("bye-1")])
        await done.wait()  # idle until the server ends the stream

    replies = []

    async def consume() -> None:
        async for reply in suite.client.metering.StreamUsage(batches()):
            replies.append(reply)
            acked.set()
        done.set()

    consumer = asyncio.create_task(consume())
    await acked.wait()
    # grace is 10 s; an idle stream must not hold the shutdown that long
    await asyncio.wait_for(suite.metering.stop(), 5)
    await asyncio.wait_for(consumer, 5)
    assert [(r.batch_id, r.reconnect) for r in replies] == [("1", False), ("", True)]
