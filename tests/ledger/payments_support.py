"""A shop to buy credit in: real pricing and ledger servers (real PostgreSQL), the ledger's
webhook endpoint, and the local payment provider with its checkout pages, all over the wire."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import asyncpg
from aiohttp import web

from services.ledger.payments.local_provider import LocalProvider
from services.ledger.server import LedgerConfig, build
from services.pricing.server import build_for as build_pricing
from tally.common.v1 import common_pb2
from tally.kit import db, signing
from tally.kit.config import load_kit_config
from tally.kit.server import Authenticator, RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as pb
from tally.pricing.v1 import pricing_pb2 as ppb
from tally.rating import load_catalog
from tally.sdk.client import TallyClient
from tally.sdk.pricebook import to_proto

T = TypeVar("T")
CREDIT = 1_000_000
SECRET = "whsec_shop_current_secret"
OLD_SECRET = "whsec_shop_previous_secret"
GOOD_CARD = "4242 4242 4242 4242"
DECLINED_CARD = "4000 0000 0000 0002"
EXPIRY = f"12/{(datetime.now(UTC).year + 3) % 100:02d}"
# The default catalog's starter package: 20.00 USD for 2,000 credits + 100 bonus.
PACKAGE = "individual-20"
PACKAGE_PRICE_MINOR = 2000
PACKAGE_CREDITS = 2000 * CREDIT
PACKAGE_BONUS = 100 * CREDIT


@dataclass
class Shop:
    """Everything a payments test talks to."""

    tally: TallyClient
    provider: LocalProvider
    ledger: RunningServer
    pricing: RunningServer
    db: asyncpg.Pool
    http: aiohttp.ClientSession

    @property
    def webhook_url(self) -> str:
        return self.provider.webhook_url

    async def purchase(self, order_id: str, org: str = "acme", *, package: str = PACKAGE,
                       actor: str = "user:alice", **fields: Any) -> pb.PaymentOrder:
        request = pb.PurchaseRequest(payment_order_id=order_id, org_id=org,
                                     context=common_pb2.RequestContext(actor=actor), **fields)
        if "custom" not in fields:
            request.package_id = package
        return (await self.tally.ledger.Purchase(request)).order

    async def pay(self, order: pb.PaymentOrder, card: str = GOOD_CARD) -> int:
        """Pays an order's checkout with `card` through its form, as a customer; returns the
        page's HTTP status once the provider has delivered what it sent."""
        form = {"card_number": card, "expiry": EXPIRY, "cvc": "123", "name": "Ada Lovelace"}
        async with self.http.post(f"{order.checkout_url}/pay", data=form,
                                  allow_redirects=False) as reply:
            status = reply.status
        await self.provider.settled()
        return status

    async def order(self, order_id: str, org: str = "acme") -> pb.PaymentOrder:
        return (await self.tally.ledger.GetPaymentOrder(pb.GetPaymentOrderRequest(
            org_id=org, payment_order_id=order_id))).order

    async def balance(self, org: str = "acme") -> pb.Balance:
        return (await self.tally.ledger.GetBalance(pb.GetBalanceRequest(org_id=org))).balance

    async def post_webhook(self, body: bytes, header: str) -> tuple[int, dict[str, Any]]:
        """POSTs a webhook to the ledger's endpoint as a provider (or a forger) would."""
        async with self.http.post(self.webhook_url, data=body, headers={
                "Content-Type": "application/json",
                LocalProvider.SIGNATURE_HEADER: header}) as reply:
            return reply.status, await reply.json()

    def event_body(self, event_type: str, order_id: str) -> bytes:
        """The body of an event the provider sent about an order."""
        for event in self.provider.events:
            obj = event["data"]["object"]
            ref = obj.get("client_reference_id") or obj.get("metadata", {}).get(
                "payment_order_id")
            if event["type"] == event_type and ref == order_id:
                return json.dumps(event).encode()
        raise AssertionError(f"no {event_type} event for {order_id}")

    async def outbox(self, org: str, *types: str) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM ledger.outbox WHERE org_id = $1 AND type = ANY($2::text[]) "
            "ORDER BY id", org, list(types))


def signed(body: bytes, secret: str = SECRET, at: int | None = None) -> str:
    return signing.sign([secret], int(time.time()) if at is None else at, body)


def catalog_with_custom_price() -> ppb.PriceBook:
    """The default catalog, also selling custom amounts at 1 US cent per credit."""
    draft = to_proto(load_catalog())
    draft.version = 0
    draft.ClearField("effective_from")
    draft.custom_credit_price_minor["USD"] = "1"
    return draft


async def eventually(check: Callable[[], Awaitable[T | None]], what: str,
                     timeout_s: float = 15.0) -> T:
    """Waits for a condition another task brings about (a background worker), checking it
    every few milliseconds; fails naming `what` if it never holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def open_shop(db_url: str, settings: LedgerConfig | None = None,
                    authenticator: Authenticator | None = None,
                    **provider_options: Any) -> AsyncIterator[Shop]:
    """Pricing (with the catalog published) and a ledger whose payments go through a
    LocalProvider; the ledger accepts webhooks signed with SECRET or OLD_SECRET."""
    config = dataclasses.replace(load_kit_config({}), database_url=db_url,
                                 migrate_on_start=False, db_pool_size=16)
    pricing = await start_server(await build_pricing(db_url, config), port=0)
    config = dataclasses.replace(config, pricing_port=pricing.port)  # bound, then read back
    options: dict[str, Any] = {"retry_first_s": 0.02, "retry_max_s": 0.2, "max_attempts": 8}
    options.update(provider_options)
    provider = LocalProvider(secrets=[SECRET], **options)
    settings = settings or LedgerConfig(webhook_port=0, checkout_port=0,
                                        webhook_secrets=(SECRET, OLD_SECRET),
                                        top_up_poll_ms=20)
    ledger = await start_server(await build(config, settings, provider=provider), port=0,
                                authenticator=authenticator)
    tally = TallyClient({"ledger": f"127.0.0.1:{ledger.port}",
                         "pricing": f"127.0.0.1:{pricing.port}"}, actor="user:test-operator")
    await tally.pricing.PublishPriceBook(ppb.PublishPriceBookRequest(
        request_id="shop-catalog", draft=catalog_with_custom_price(),
        context=common_pb2.RequestContext(actor="user:pricing-admin")))
    pool = await asyncpg.create_pool(db.asyncpg_url(db_url), min_size=1, max_size=4)
    http = aiohttp.ClientSession()
    try:
        yield Shop(tally, provider, ledger, pricing, pool, http)
    finally:
        await http.close()
        await tally.close()
        await ledger.stop()
        await pricing.stop()
        await pool.close()


RECEIVER_SECRET = "whsec_local_test"
"""What a Receiver verifies with (and the providers sending to it sign with)."""


@dataclass
class Receiver:
    """A webhook endpoint: verifies each signature, fails its first `failures` requests (every
    one if < 0), and keeps the events it accepted."""

    secrets: list[str] = field(default_factory=lambda: [RECEIVER_SECRET])
    failures: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        try:
            signing.verify(request.headers.get(LocalProvider.SIGNATURE_HEADER, ""), body,
                           self.secrets, int(time.time()))
        except signing.SignatureError:
            self.bad_signatures += 1
            return web.Response(status=400)
        if self.failures < 0 or len(self.requests) <= self.failures:
            return web.Response(status=503)
        self.accepted.append(json.loads(body))
        return web.Response(status=200)

    def types(self) -> list[str]:
        return [event["type"] for event in self.accepted]
