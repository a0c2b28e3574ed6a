"""WatchPriceBook through real servers: the current book first, every new version within one
second of its publish (on this replica or another sharing the database), a clean end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc

from services.pricing.server import PricingConfig
from tally.pricing.v1 import pricing_pb2 as pb
from tests.pricing.conftest import (
    Stub,
    catalog_draft,
    pricing_server,
    publish,
    scale_rates,
    soon,
    ts,
)

PUSH_DEADLINE_S = 1.0


async def next_book(stream: grpc.aio.UnaryStreamCall[pb.WatchPriceBookRequest,
                                                      pb.WatchPriceBookResponse],
                    timeout_s: float = PUSH_DEADLINE_S) -> pb.PriceBook:
    async with asyncio.timeout(timeout_s):
        reply = await stream.read()
    assert reply is not grpc.aio.EOF, "the stream ended"
    assert isinstance(reply, pb.WatchPriceBookResponse)
    return reply.book


async def test_a_subscriber_receives_a_new_version_within_one_second_of_publishing(
    pricing: Stub,
) -> None:
    stream = pricing.WatchPriceBook(pb.WatchPriceBookRequest())
    assert (await next_book(stream, 5)).version == 1
    await publish(pricing, "p-2", catalog_draft(scale_rates(2)), soon(60))
    pushed = await next_book(stream)
    assert pushed.version == 2 and len(pushed.lines) > 0
    stream.cancel()


async def test_a_reconnecting_subscriber_gets_the_current_version_first(pricing: Stub) -> None:
    effective = soon(0.3)
    await publish(pricing, "p-2", catalog_draft(scale_rates(2)), effective)
    await asyncio.sleep(max((effective - datetime.now(UTC)).total_seconds(), 0) + 0.05)
    stream = pricing.WatchPriceBook(pb.WatchPriceBookRequest(known_version=1))
    assert (await next_book(stream)).version == 2
    stream.cancel()
    # a caller that already holds the current book is sent nothing until the next publish
    holding = pricing.WatchPriceBook(pb.WatchPriceBookRequest(known_version=2))
    await publish(pricing, "p-3", catalog_draft(), soon(60))
    assert (await next_book(holding)).version == 3
    holding.cancel()


async def test_a_scheduled_book_is_sent_after_the_current_one(pricing: Stub) -> None:
    await publish(pricing, "p-future", catalog_draft(scale_rates(2)), soon(600))
    stream = pricing.WatchPriceBook(pb.WatchPriceBookRequest())
    assert [(await next_book(stream)).version for _ in range(2)] == [1, 2]
    stream.cancel()


async def test_history_since_sends_every_book_in_force_since_then_oldest_first(
    pricing: Stub,
) -> None:
    for version in (2, 3):
        effective = soon(0.2)
        await publish(pricing, f"p-{version}", catalog_draft(scale_rates(version)), effective)
        await asyncio.sleep(0.25)
    since = datetime.now(UTC) - timedelta(days=35)
    stream = pricing.WatchPriceBook(pb.WatchPriceBookRequest(history_since=ts(since)))
    assert [(await next_book(stream)).version for _ in range(3)] == [1, 2, 3]
    stream.cancel()


async def test_two_services_sharing_one_database_both_see_a_publish(db_url: str) -> None:
    async with pricing_server(db_url) as (_, first), pricing_server(db_url) as (_, second):
        watching_second = second.WatchPriceBook(pb.WatchPriceBookRequest())
        watching_first = first.WatchPriceBook(pb.WatchPriceBookRequest())
        assert (await next_book(watching_second, 5)).version == 1
        assert (await next_book(watching_first, 5)).version == 1
        await publish(first, "p-2", catalog_draft(scale_rates(2)), soon(60))
        pushed = await asyncio.gather(next_book(watching_second), next_book(watching_first))
        assert [b.version for b in pushed] == [2, 2]
        on_second = await second.GetPriceBook(pb.GetPriceBookRequest(version=2))
        assert on_second.book.version == 2
        watching_first.cancel()
        watching_second.cancel()


async def test_the_stream_ends_cleanly_at_its_lifetime_cap(db_url: str) -> None:
    async with pricing_server(db_url, PricingConfig(watch_lifetime_s=1)) as (_, stub):
        stream = stub.WatchPriceBook(pb.WatchPriceBookRequest())
        assert (await next_book(stream)).version == 1
        async with asyncio.timeout(3):
            assert await stream.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK


async def test_the_stream_ends_cleanly_as_soon_as_the_server_begins_shutting_down(
    db_url: str,
) -> None:
    async with pricing_server(db_url) as (running, stub):
        assert running.grace_seconds >= 10
        stream = stub.WatchPriceBook(pb.WatchPriceBookRequest())
        assert (await next_book(stream, 5)).version == 1
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(running.stop())
        async with asyncio.timeout(2):
            assert await stream.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK, "a clean end: the watcher reconnects"
        await stopping
        assert asyncio.get_running_loop().time() - started < 2, "not held for the grace period"
