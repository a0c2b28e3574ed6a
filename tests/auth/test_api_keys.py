"""API keys verified by real servers from their local caches: revocation on every replica
within a second, expiry, rotation's overlap, and the calls a key of one org can never make."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit.errors import Reason, TallyError, from_rpc_error
from tally.pricing.v1 import pricing_pb2 as pb
from tally.pricing.v1 import pricing_pb2_grpc
from tests.pricing.conftest import catalog_draft, pricing_server

from .conftest import Identities, bearer

REVOCATION_BOUND_S = 1.0


@asynccontextmanager
async def replicas(ids: Identities, db_url: str, count: int
                   ) -> AsyncIterator[list[pricing_pb2_grpc.PricingServiceStub]]:
    """`count` pricing servers on one database, each verifying with its own guard."""
    async with AsyncExitStack() as stack:
        stubs = []
        for _ in range(count):
            guard = ids.guard()
            _, stub = await stack.enter_async_context(
                pricing_server(db_url, authenticator=guard))
            await asyncio.wait_for(guard.cache.ready.wait(), 10)
            stubs.append(stub)
        yield stubs


async def refused(stub: pricing_pb2_grpc.PricingServiceStub, secret: str) -> Reason | None:
    """The reason a GetPriceBook with `secret` is refused, or None if it is served."""
    try:
        await stub.GetPriceBook(pb.GetPriceBookRequest(), metadata=tuple(bearer(secret).items()))
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        assert error is not None, exc
        return error.reason
    return None


async def until_refused(stub: pricing_pb2_grpc.PricingServiceStub, secret: str,
                        bound_s: float) -> float:
    """Seconds until `secret` is refused (fails past `bound_s`)."""
    started = time.monotonic()
    while await refused(stub, secret) is None:
        assert time.monotonic() - started < bound_s, f"still served after {bound_s}s"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_a_revoked_key_is_refused_by_every_replica_within_a_second(
        ids: Identities, db_url: str) -> None:
    key = await ids.key("acme", apb.ROLE_VIEWER)
    async with replicas(ids, db_url, 3) as stubs:
        await ids.synced()
        for stub in stubs:
            assert await refused(stub, key.secret) is None
        revoked_at = time.monotonic()
        await ids.accounts.RevokeApiKey(apb.RevokeApiKeyRequest(org_id="acme",
                                                                key_id=key.key.key_id))
        delays = await asyncio.gather(*(until_refused(s, key.secret, REVOCATION_BOUND_S)
                                        for s in stubs))
        assert time.monotonic() - revoked_at < REVOCATION_BOUND_S + 0.5
        assert max(delays) < REVOCATION_BOUND_S
        for stub in stubs:
            assert await refused(stub, key.secret) is Reason.UNAUTHENTICATED


async def test_an_expired_key_is_refused(ids: Identities, db_url: str) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=1)
    stamp = apb.ApiKey().expire_time
    stamp.FromDatetime(expires)
    key = await ids.key("acme", apb.ROLE_VIEWER, expire_time=stamp)
    async with replicas(ids, db_url, 1) as (stub,):
        await ids.synced()
        if datetime.now(UTC) < expires - timedelta(milliseconds=200):
            assert await refused(stub, key.secret) is None
        await until_refused(stub, key.secret, 5)
        assert datetime.now(UTC) >= expires
        assert await refused(stub, key.secret) is Reason.UNAUTHENTICATED


async def test_during_a_rotation_both_keys_work_and_after_it_only_the_new_one(
        ids: Identities, db_url: str) -> None:
    old = await ids.key("acme", apb.ROLE_VIEWER)
    async with replicas(ids, db_url, 1) as (stub,):
        rotated = await ids.accounts.RotateApiKey(apb.RotateApiKeyRequest(
            request_id="rot-1", org_id="acme", key_id=old.key.key_id, overlap_seconds=2))
        await ids.synced()
        ends = rotated.previous.expire_time.ToDatetime(tzinfo=UTC)
        if datetime.now(UTC) < ends - timedelta(milliseconds=500):
            assert await refused(stub, old.secret) is None
        assert await refused(stub, rotated.secret) is None
        await until_refused(stub, old.secret, 5)
        assert datetime.now(UTC) >= ends
        assert await refused(stub, rotated.secret) is None


async def test_a_rotation_without_overlap_ends_the_old_key_at_once(ids: Identities,
                                                                   db_url: str) -> None:
    old = await ids.key("acme", apb.ROLE_VIEWER)
    async with replicas(ids, db_url, 1) as (stub,):
        rotated = await ids.accounts.RotateApiKey(apb.RotateApiKeyRequest(
            request_id="rot-0", org_id="acme", key_id=old.key.key_id, overlap_seconds=0))
        await ids.synced()
        assert await refused(stub, old.secret) is Reason.UNAUTHENTICATED
        assert await refused(stub, rotated.secret) is None


@pytest.mark.parametrize("header", [
    "Bearer tly_prod_NotARealKeyAtAll000000000000000",
    "Bearer " + "tly_" + "x" * 500,
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "Bearer " + "a.b.c" * 1400,
    "Bearer not-a-credential",
])
async def test_malformed_or_unknown_credentials_are_unauthenticated_never_internal(
        ids: Identities, db_url: str, header: str) -> None:
    async with replicas(ids, db_url, 1) as (stub,):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetPriceBook(pb.GetPriceBookRequest(),
                                    metadata=(("authorization", header),))
        assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_publishing_a_price_book_needs_credentials_and_the_operator_role(
        ids: Identities, db_url: str) -> None:
    """The issue's first finding: an empty PublishPriceBook from anyone wiped the catalog."""
    admin = await ids.key("acme", apb.ROLE_ADMIN)
    async with replicas(ids, db_url, 1) as (stub,):
        await ids.synced()
        request = pb.PublishPriceBookRequest(request_id="wipe", draft=pb.PriceBook())
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.PublishPriceBook(request)
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as org_admin:
            await stub.PublishPriceBook(request, metadata=tuple(bearer(admin.secret).items()))
        assert org_admin.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "pricing.PublishPriceBook" in (org_admin.value.details() or "")
        served = await stub.GetPriceBook(pb.GetPriceBookRequest(),
                                         metadata=tuple(bearer(admin.secret).items()))
        assert served.book.version == 1 and len(served.book.lines) == len(
            catalog_draft().lines)


async def test_a_key_of_one_org_cannot_touch_another(ids: Identities, db_url: str) -> None:
    key = await ids.key("acme", apb.ROLE_ADMIN)
    async with replicas(ids, db_url, 1) as (stub,):
        await ids.synced()
        metadata = tuple(bearer(key.secret).items())
        quote = pb.QuoteRequest()
        quote.context.org_id = "beta"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Quote(quote, metadata=metadata)
        assert failure.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'beta'" in (failure.value.details() or "")



async def test_an_oversized_token_is_refused_before_it_is_parsed(ids: Identities) -> None:
    """gRPC's own metadata limit (8 KiB) stops most; the guard's holds where that is raised."""
    guard = ids.guard()
    with pytest.raises(TallyError) as failure:
        await guard.verify({"authorization": "Bearer " + "e" * 9000 + ".x.y"}, None)
    assert failure.value.reason is Reason.UNAUTHENTICATED
    assert "longer than" in failure.value.message
