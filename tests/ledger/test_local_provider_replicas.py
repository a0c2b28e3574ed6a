"""The local (development) provider as the ledger runs it: its checkouts live in PostgreSQL,
so two ledger replicas on one database share them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import aiohttp
import asyncpg
import pytest

from services.ledger.server import LedgerConfig, build
from services.pricing.server import build_for as build_pricing
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.config import load_kit_config
from tally.kit.server import start_server
from tally.ledger.v1 import ledger_pb2 as pb
from tally.pricing.v1 import pricing_pb2 as ppb
from tally.sdk.client import TallyClient
from tests.ledger.payments_support import (
    EXPIRY,
    GOOD_CARD,
    PACKAGE,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    catalog_with_custom_price,
    eventually,
)

SUCCEEDED = pb.PAYMENT_ORDER_STATE_SUCCEEDED
FORM = {"card_number": GOOD_CARD, "expiry": EXPIRY, "cvc": "123", "name": "Ada Lovelace"}


@dataclasses.dataclass
class Replicas:
    clients: list[TallyClient]
    pages: list[str]
    """Each replica's checkout page base URL."""
    db: asyncpg.Pool
    http: aiohttp.ClientSession


@pytest.fixture
async def replicas(db_url: str) -> AsyncIterator[Replicas]:
    async with AsyncExitStack() as stack:
        config = dataclasses.replace(load_kit_config({}), database_url=db_url,
                                     migrate_on_start=False, db_pool_size=8)
        pricing = await start_server(await build_pricing(db_url, config), port=0)
        config = dataclasses.replace(config, pricing_port=pricing.port)  # bound, then read
        stack.push_async_callback(pricing.stop)
        clients, pages = [], []
        for _ in range(2):
            # the ledger builds its own local provider, as in `tally up` (no chaos here)
            settings = LedgerConfig(webhook_port=0, checkout_port=0,
                                    local_duplicate_rate=0.0, local_reorder_rate=0.0)
            ledger = await start_server(await build(config, settings), port=0)
            stack.push_async_callback(ledger.stop)
            client = TallyClient({"ledger": f"127.0.0.1:{ledger.port}",
                                  "pricing": f"127.0.0.1:{pricing.port}"},
                                 actor="user:test-operator")
            stack.push_async_callback(client.close)
            clients.append(client)
            pages.append(ledger.app.http_urls["checkout"])  # bound on port 0, read back
        await clients[0].pricing.PublishPriceBook(ppb.PublishPriceBookRequest(
            request_id="shop-catalog", draft=catalog_with_custom_price(),
            context=common_pb2.RequestContext(actor="user:pricing-admin")))
        pool = await asyncpg.create_pool(db.asyncpg_url(db_url), min_size=1, max_size=2)
        stack.push_async_callback(pool.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Replicas(clients, pages, pool, http)


async def purchase(replicas: Replicas, replica: int, order_id: str) -> pb.PaymentOrder:
    return (await replicas.clients[replica].ledger.Purchase(pb.PurchaseRequest(
        payment_order_id=order_id, org_id="acme", package_id=PACKAGE,
        context=common_pb2.RequestContext(actor="user:alice")))).order


async def settled(replicas: Replicas, order_id: str) -> pb.PaymentOrder | None:
    order = (await replicas.clients[0].ledger.GetPaymentOrder(pb.GetPaymentOrderRequest(
        org_id="acme", payment_order_id=order_id))).order
    return order if order.state == SUCCEEDED else None


async def test_a_checkout_opened_through_one_replica_is_paid_on_the_others_page(
    replicas: Replicas,
) -> None:
    order = await purchase(replicas, 0, "po-1")
    session = order.provider_session_id
    assert order.checkout_url == f"{replicas.pages[0]}/checkout/{session}"
    async with replicas.http.get(f"{replicas.pages[1]}/checkout/{session}") as page:
        assert page.status == 200 and "Pay" in await page.text()
    async with replicas.http.post(f"{replicas.pages[1]}/checkout/{session}/pay", data=FORM,
                                  allow_redirects=False) as paid:
        assert paid.status == 303
    await eventually(lambda: settled(replicas, "po-1"), "the order to be paid")
    balance = (await replicas.clients[1].ledger.GetBalance(
        pb.GetBalanceRequest(org_id="acme"))).balance
    assert balance.posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
    # the first replica's page knows it is paid too
    async with replicas.http.get(f"{replicas.pages[0]}/checkout/{session}") as page:
        assert 'id="paid"' in await page.text()
    # and a replay of the purchase on the second replica is the same checkout
    assert (await purchase(replicas, 1, "po-1")).provider_session_id == session


async def test_many_submits_of_one_checkout_on_both_replicas_pay_it_once(
    replicas: Replicas,
) -> None:
    order = await purchase(replicas, 1, "po-1")
    session = order.provider_session_id

    async def submit(i: int) -> int:
        async with replicas.http.post(f"{replicas.pages[i % 2]}/checkout/{session}/pay",
                                      data=FORM, allow_redirects=False) as reply:
            return reply.status

    statuses = await asyncio.gather(*(submit(i) for i in range(16)))
    assert set(statuses) == {303}  # to the success page, whoever paid
    await eventually(lambda: settled(replicas, "po-1"), "the order to be paid")
    # exactly one payment event was ever made (no chaos: one delivery each)
    events = await replicas.db.fetch(
        "SELECT type FROM ledger.provider_events WHERE payment_order_id = 'po-1'")
    assert [e["type"] for e in events] == ["PAYMENT_SUCCEEDED"]
    assert await replicas.db.fetchval(
        "SELECT (body->>'is_paid')::boolean FROM ledger.local_provider_payments "
        "WHERE session_id = $1", session)
    balance = (await replicas.clients[0].ledger.GetBalance(
        pb.GetBalanceRequest(org_id="acme"))).balance
    assert balance.posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
