"""Nothing acknowledged is lost and nothing is charged twice: crashes, a dead ledger, no pricing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import grpc
import pytest

from services.metering.adapters import GrpcLedger, WatchedPriceBooks
from services.metering.ingestion import convert as convert_usage
from services.metering.ingestion.committer import CommitSettings, GroupCommitter
from services.metering.ingestion.store import UsageEventStore
from services.metering.server import MeteringConfig
from tally.cli.suite import health_state
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2_grpc
from tally.metering.v1 import metering_pb2 as mpb
from tally.metering.v1 import metering_pb2_grpc
from tally.pricing.v1 import pricing_pb2_grpc
from tests.metering.conftest import CREDIT, Suite, start_suite, stop_suite
from tests.metering.test_ingestion import ACCEPTED, DUPLICATE, balance, usage

REPO = Path(__file__).resolve().parents[2]


async def _until(condition, what: str, attempts: int = 400) -> None:  # type: ignore[no-untyped-def]
    """Waits for a condition to become true (bounded); fails naming what never happened."""
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


async def test_a_batch_recorded_but_never_posted_is_posted_once_at_restart(
    suite: Suite,
) -> None:
    await suite.fund("acme", 100)
    pool = await db.create_pool(suite.db_url, max_size=2)
    pricing = grpc.aio.insecure_channel(suite.config.address_of("pricing"))
    dead = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")  # nobody listens there
    live = grpc.aio.insecure_channel(suite.config.address_of("ledger"))
    stop = asyncio.Event()
    try:
        books = WatchedPriceBooks(pricing_pb2_grpc.PricingServiceStub(pricing))
        watcher = asyncio.create_task(books.watch(stop))
        await asyncio.wait_for(books.ready.wait(), 10)
        store = UsageEventStore(pool)
        doomed = GroupCommitter(store, GrpcLedger(ledger_pb2_grpc.LedgerServiceStub(dead), 1.0),
                                books, CommitSettings())
        await doomed.start()
        submit = asyncio.create_task(doomed.submit(
            [convert_usage.event(usage(f"c-{i}")) for i in range(10)]))

        async def recorded() -> bool:
            return bool(await store.pending_batches())

        await _until(recorded, "the batch was recorded")
        submit.cancel()  # the process "dies" between its two commits
        await doomed.stop()
        assert (await balance(suite)).posted_micros == 100 * CREDIT  # nothing debited yet

        restarted = GroupCommitter(store, GrpcLedger(ledger_pb2_grpc.LedgerServiceStub(live)),
                                   books, CommitSettings())
        assert await restarted.replay_pending() == 1
        assert await restarted.replay_pending() == 0
        charged = 100 * CREDIT - (await balance(suite)).posted_micros
        again = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
            events=[usage(f"c-{i}") for i in range(10)]))
        assert all(r.status == DUPLICATE for r in again.results)
        assert sum(r.receipt.cost_micros for r in again.results) == charged
        assert all(r.receipt.ledger_transfer_id for r in again.results)
        stop.set()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    finally:
        for channel in (pricing, dead, live):
            await channel.close()
        await pool.close()


async def test_ingestion_continues_on_the_cached_book_when_pricing_is_down(
    suite: Suite,
) -> None:
    await suite.fund("acme", 100)
    await suite.pricing.stop()
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("while-pricing-down")]))
    assert reply.results[0].status == ACCEPTED


async def test_ledger_down_stops_acks_and_new_calls_see_unavailable(db_url: str) -> None:
    suite = await start_suite(db_url, MeteringConfig(max_buffered_events=10,
                                                     buffer_wait_ms=300))
    try:
        await suite.fund("acme", 100)
        await suite.ledger.stop()
        stuck = asyncio.ensure_future(suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
            events=[usage(f"d-{i}") for i in range(10)])))
        conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
        try:
            async def recorded() -> bool:  # the ten fill the buffer before the next call
                return bool(await conn.fetchval("SELECT count(*) FROM metering.ledger_batches "
                                                "WHERE posted_at IS NULL"))

            await _until(recorded, "the ten events were recorded")
        finally:
            await conn.close()
        with pytest.raises(TallyError) as caught:
            await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
                events=[usage("one-more")]))
        assert caught.value.reason is Reason.UNAVAILABLE

        async def one_batch():  # type: ignore[no-untyped-def]
            yield mpb.StreamUsageRequest(batch_id="late", events=[usage("by-stream")])

        with pytest.raises(grpc.aio.AioRpcError) as stream_caught:
            async for _ in suite.client.metering.StreamUsage(one_batch()):
                raise AssertionError("a batch was acknowledged while the ledger was down")
        assert stream_caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert not stuck.done(), "nothing is acknowledged before its debit is durable"
        await suite.restart_ledger()
        results = (await asyncio.wait_for(stuck, 30)).results
        assert all(r.status == ACCEPTED for r in results)
        charged = sum(r.receipt.cost_micros for r in results)
        assert 100 * CREDIT - (await balance(suite)).posted_micros == charged
    finally:
        await stop_suite(suite)


async def test_sigkill_during_streams_loses_no_acked_event_and_charges_none_twice(
    suite: Suite,
) -> None:
    await suite.fund("acme", 10_000)
    await suite.metering.stop()  # metering runs as a real process from here on
    port = free_port()
    env = dict(os.environ, TALLY_DATABASE_URL=suite.db_url, TALLY_MIGRATE_ON_START="false",
               TALLY_PRICING_PORT=str(suite.config.pricing_port),
               TALLY_LEDGER_PORT=str(suite.config.ledger_port), TALLY_METERING_PORT=str(port),
               TALLY_METERING_FLUSH_INTERVAL_MS="2")
    events = [usage(f"k-{i}") for i in range(3000)]
    batches = [events[i:i + 100] for i in range(0, len(events), 100)]
    acked: dict[str, int] = {}
    unacked = list(range(len(batches)))
    for attempt in range(4):
        process = subprocess.Popen(  # noqa: ASYNC220 - started once per round, then awaited
            [sys.executable, "-m", "services.metering"], cwd=REPO,
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async def serving() -> bool:
                return await health_state(f"127.0.0.1:{port}", 0.5) == "SERVING"

            await _until(serving, "metering came up")
            kill_after = 3 if attempt < 3 else None  # the last run is left to finish
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            sending = list(unacked)

            async def requests(sending: list[int] = sending):  # type: ignore[no-untyped-def]
                for index in sending:
                    yield mpb.StreamUsageRequest(batch_id=str(index), events=batches[index])

            try:
                async for ack in stub.StreamUsage(requests()):
                    for result in ack.results:
                        assert result.status in (ACCEPTED, DUPLICATE)
                        cost = acked.setdefault(result.event_id, result.receipt.cost_micros)
                        assert cost == result.receipt.cost_micros
                    unacked.remove(int(ack.batch_id))
                    if kill_after is not None and len(sending) - len(unacked) >= kill_after:
                        process.send_signal(signal.SIGKILL)
                        break
            except grpc.aio.AioRpcError:
                pass  # the server died under us: resend what was not acknowledged
            await channel.close()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL if attempt < 3 else signal.SIGTERM)
            process.wait(timeout=30)
        if not unacked:
            break
    assert not unacked
    assert len(acked) == len(events)
    charged = sum(acked.values())
    assert 10_000 * CREDIT - (await balance(suite)).posted_micros == charged
    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:
        # the ledger debits per org per batch: its USAGE transfers sum to what was acked
        assert await conn.fetchval("SELECT count(*) FROM metering.usage_events") == len(events)
        assert await conn.fetchval("SELECT sum(amount_micros) FROM ledger.transfers "
                                   "WHERE kind = 'USAGE'") == charged
        assert await conn.fetchval("SELECT count(*) FROM metering.ledger_batches "
                                   "WHERE posted_at IS NULL") == 0
    finally:
        await conn.close()
