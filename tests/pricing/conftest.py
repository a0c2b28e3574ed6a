"""A real pricing server (in process, port 0, real PostgreSQL) and helpers to talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeAlias

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.pricing.server import PricingConfig, build_for
from tally.common.v1 import common_pb2
from tally.kit.errors import TallyError, from_rpc_error
from tally.kit.server import Authenticator, RunningServer, start_server
from tally.pricing.v1 import pricing_pb2 as pb
from tally.pricing.v1 import pricing_pb2_grpc
from tally.rating import load_catalog
from tally.sdk.pricebook import to_proto

Stub: TypeAlias = "pricing_pb2_grpc.PricingServiceAsyncStub"

SETTINGS = PricingConfig(watch_lifetime_s=30)


@asynccontextmanager
async def pricing_server(db_url: str, settings: PricingConfig = SETTINGS,
                         authenticator: Authenticator | None = None,
                         ) -> AsyncIterator[tuple[RunningServer, Stub]]:
    """A pricing server on `db_url` and a stub to it."""
    running = await start_server(await build_for(db_url, settings=settings), port=0,
                                 authenticator=authenticator)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pricing_pb2_grpc.PricingServiceStub(channel)
    finally:
        await running.stop()


@pytest.fixture
async def pricing_with_metering(db_url: str) -> AsyncIterator[Stub]:
    """Pricing beside a real metering (and ledger): a book that drops a model or meter asks
    metering what still uses it."""
    from tests.metering.conftest import start_suite, stop_suite

    suite = await start_suite(db_url)
    channel = grpc.aio.insecure_channel(suite.config.address_of("pricing"))
    try:
        yield pricing_pb2_grpc.PricingServiceStub(channel)
    finally:
        await channel.close()
        await stop_suite(suite)


@pytest.fixture
async def pricing(db_url: str) -> AsyncIterator[Stub]:
    async with pricing_server(db_url) as (_, stub):
        yield stub


def catalog_draft(edit: Callable[[pb.PriceBook], None] | None = None) -> pb.PriceBook:
    """The default catalog as a draft, optionally edited."""
    draft = to_proto(load_catalog())
    draft.version = 0
    draft.ClearField("effective_from")
    if edit is not None:
        edit(draft)
    return draft


def line(draft: pb.PriceBook, line_id: str) -> pb.PriceLine:
    """The draft's line with this id."""
    return next(x for x in draft.lines if x.line_id == line_id)


def scale_rates(factor: int) -> Callable[[pb.PriceBook], None]:
    """An edit multiplying every tier rate by `factor`."""
    def edit(draft: pb.PriceBook) -> None:
        for price_line in draft.lines:
            for tier in price_line.tiers:
                tier.rate = str(factor * Decimal(tier.rate))
    return edit


def ts(value: datetime) -> Timestamp:
    """A protobuf Timestamp."""
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def soon(seconds: float = 2.0) -> datetime:
    """An instant `seconds` from now."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def publish(stub: Stub, request_id: str, draft: pb.PriceBook | None = None,
                  effective_from: datetime | None = None, actor: str = "user:pricing-admin"
                  ) -> pb.PublishPriceBookResponse:
    """Publishes `draft` (the catalog by default)."""
    request = pb.PublishPriceBookRequest(
        request_id=request_id, draft=draft or catalog_draft(),
        context=common_pb2.RequestContext(actor=actor))
    if effective_from is not None:
        request.effective_from.FromDatetime(effective_from)
    response: pb.PublishPriceBookResponse = await stub.PublishPriceBook(request)
    return response


def tally_error(exc: grpc.aio.AioRpcError) -> TallyError:
    """The TallyError a failed call carries (asserting there is one)."""
    error = from_rpc_error(exc)
    assert error is not None, exc
    return error


def quantity(meter: int, amount: int) -> common_pb2.MeterQuantity:
    """One MeterQuantity."""
    return common_pb2.MeterQuantity(meter=meter, quantity=amount)  # type: ignore[arg-type]

