"""A service answers only for the regions it serves (others: FAILED_PRECONDITION naming the
org's region), and keys' last use reaches accounts from the guards' caches."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit.audit import Auditor, grpc_sink
from tally.kit.errors import Reason, from_rpc_error
from tally.pricing.v1 import pricing_pb2 as pb
from tests.pricing.conftest import pricing_server

from .conftest import Identities, bearer


async def test_an_org_of_another_region_is_sent_to_its_region(ids: Identities,
                                                              db_url: str) -> None:
    await ids.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id="gamma", name="Gamma", region="us-east", seat_limit=2,
        owner_subject="owner@gamma.test"))
    here = await ids.key("acme", apb.ROLE_VIEWER)
    there = await ids.key("gamma", apb.ROLE_VIEWER)
    guard = ids.guard()
    guard.regions = frozenset({"eu-west"})
    async with pricing_server(db_url, authenticator=guard) as (_, stub):
        await ids.synced(guard)
        quote = pb.QuoteRequest(model="gpt-4.1-mini", is_estimate=True)
        quote.context.org_id = "gamma"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Quote(quote, metadata=tuple(bearer(there.secret).items()))
        assert failure.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        error = from_rpc_error(failure.value)
        assert error is not None and error.reason is Reason.WRONG_REGION
        assert error.metadata["region"] == "us-east" and "'us-east'" in error.message
        quote.context.org_id = "acme"
        try:
            await stub.Quote(quote, metadata=tuple(bearer(here.secret).items()))
        except grpc.aio.AioRpcError as exc:  # priced or refused on its merits, not sent away
            assert exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION,
                                      grpc.StatusCode.PERMISSION_DENIED,
                                      grpc.StatusCode.UNAUTHENTICATED), exc


async def test_a_keys_last_use_reaches_accounts(ids: Identities, db_url: str) -> None:
    key = await ids.key("acme", apb.ROLE_VIEWER)
    guard = ids.guard()
    channel = grpc.aio.insecure_channel(ids.address)
    guard.auditor = Auditor("pricing", grpc_sink(channel), flush_ms=10,
                            key_uses=guard.cache.take_key_uses)
    try:
        async with pricing_server(db_url, authenticator=guard) as (_, stub):
            await ids.synced(guard)
            before = time.time()
            await stub.GetPriceBook(pb.GetPriceBookRequest(),
                                    metadata=tuple(bearer(key.secret).items()))
            deadline = time.monotonic() + 10
            while True:
                listed = await ids.accounts.ListApiKeys(apb.ListApiKeysRequest(org_id="acme"))
                (shown,) = [k for k in listed.keys if k.key_id == key.key.key_id]
                if shown.HasField("last_use_time"):
                    break
                assert time.monotonic() < deadline, "last use never reported"
                await asyncio.sleep(0.02)
            assert shown.last_use_time.ToNanoseconds() / 1e9 >= before - 1
    finally:
        await channel.close()


async def test_an_org_that_requires_sso_refuses_its_peoples_keys_but_not_its_gateways(
        ids: Identities) -> None:
    from tally.kit.errors import TallyError

    guard = await ids.started(ids.guard())
    person_key = await ids.key("acme", apb.ROLE_DEVELOPER)
    gateway_key = await ids.key("acme", apb.ROLE_GATEWAY)
    other_org_key = await ids.key("beta", apb.ROLE_DEVELOPER)
    changed = await ids.accounts.SetSsoRequired(apb.SetSsoRequiredRequest(
        org_id="acme", is_sso_required=True))
    assert changed.org.is_sso_required
    await ids.synced(guard)
    with pytest.raises(TallyError) as refused:
        await guard.verify(bearer(person_key.secret), None)
    assert refused.value.reason is Reason.UNAUTHENTICATED
    assert "single sign-on" in refused.value.message
    assert (await guard.verify(bearer(gateway_key.secret), None)).roles_in("acme") == {
        "gateway"}
    assert (await guard.verify(bearer(ids.provider.token("owner@acme.test")), None)
            ).roles_in("acme") == {"owner"}
    await guard.verify(bearer(other_org_key.secret), None)  # beta does not require it
    await ids.accounts.SetSsoRequired(apb.SetSsoRequiredRequest(org_id="acme"))
    await ids.synced(guard)
    await guard.verify(bearer(person_key.secret), None)
