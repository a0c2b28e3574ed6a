"""The Stripe provider, end to end: real pricing and ledger servers (real PostgreSQL) whose
payments go through StripeProvider and stripe-python to a local fake of Stripe's API
(tests/support/fake_stripe.py), with webhooks signed as Stripe signs them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from services.ledger.payments.provider import (
    ChargeRequest,
    CheckoutRequest,
    ProviderError,
    ProviderEventType,
    ProviderUnavailable,
)
from services.ledger.payments.stripe_provider import StripeProvider
from services.ledger.server import LedgerConfig, build, payment_provider
from services.pricing.server import build_for as build_pricing
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.config import ConfigError, load, load_kit_config
from tally.kit.errors import Reason, TallyError
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as pb
from tally.pricing.v1 import pricing_pb2 as ppb
from tally.sdk.client import TallyClient
from tests.ledger.payments_support import (
    CREDIT,
    PACKAGE,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    PACKAGE_PRICE_MINOR,
    catalog_with_custom_price,
    eventually,
)
from tests.support.fake_stripe import SECRET_KEY, WEBHOOK_SECRET, FakeStripe

THRESHOLD = 1000 * CREDIT
PAID = pb.PAYMENT_ORDER_STATE_SUCCEEDED


@dataclass
class StripeShop:
    tally: TallyClient
    stripe: FakeStripe
    provider: StripeProvider
    ledger: RunningServer
    db: asyncpg.Pool
    webhook_url: str

    async def purchase(self, order_id: str, org: str = "acme") -> pb.PaymentOrder:
        return (await self.tally.ledger.Purchase(pb.PurchaseRequest(
            payment_order_id=order_id, org_id=org, package_id=PACKAGE,
            context=common_pb2.RequestContext(actor="user:alice")))).order

    async def order(self, order_id: str, org: str = "acme") -> pb.PaymentOrder:
        return (await self.tally.ledger.GetPaymentOrder(pb.GetPaymentOrderRequest(
            org_id=org, payment_order_id=order_id))).order

    async def posted(self, org: str = "acme") -> int:
        """The org's posted credit (0 while it has no account: nothing was ever credited)."""
        try:
            return (await self.tally.ledger.GetBalance(
                pb.GetBalanceRequest(org_id=org))).balance.posted_micros
        except TallyError as exc:
            if exc.reason is not Reason.NOT_FOUND:
                raise
            return 0

    async def refund(self, refund_id: str, order_id: str, credits: int = 0
                     ) -> pb.RefundResponse:
        return await self.tally.ledger.Refund(pb.RefundRequest(
            refund_id=refund_id, payment_order_id=order_id, amount_micros=credits * CREDIT,
            reason="customer asked", context=common_pb2.RequestContext(actor="user:carol")))


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[StripeShop]:
    fake = FakeStripe()
    await fake.start()
    config = dataclasses.replace(load_kit_config({}), database_url=db_url,
                                 migrate_on_start=False, db_pool_size=16)
    pricing = await start_server(await build_pricing(db_url, config), port=0)
    config = dataclasses.replace(config, pricing_port=pricing.port)
    # no network retries inside stripe-python here: each error answer reaches the ledger
    provider = StripeProvider(SECRET_KEY, success_url="https://tally.test/paid",
                              api_base=fake.url, max_network_retries=0)
    settings = LedgerConfig(payment_provider="stripe", webhook_port=0,  # bound, then read
                            webhook_secrets=(WEBHOOK_SECRET,), top_up_poll_ms=20,
                            top_up_failures_to_throttle=2)
    ledger = await start_server(await build(config, settings, provider=provider), port=0)
    tally = TallyClient({"ledger": f"127.0.0.1:{ledger.port}",
                         "pricing": f"127.0.0.1:{pricing.port}"}, actor="user:test-operator")
    await tally.pricing.PublishPriceBook(ppb.PublishPriceBookRequest(
        request_id="shop-catalog", draft=catalog_with_custom_price(),
        context=common_pb2.RequestContext(actor="user:pricing-admin")))
    pool = await asyncpg.create_pool(db.asyncpg_url(db_url), min_size=1, max_size=4)
    try:
        yield StripeShop(tally, fake, provider, ledger, pool,
                         f"{ledger.app.http_urls['webhooks']}/stripe")
    finally:
        await tally.close()
        await ledger.stop()
        await pricing.stop()
        await pool.close()
        await provider.stop()
        await fake.stop()


async def paid(shop: StripeShop, order_id: str = "po-1") -> pb.PaymentOrder:
    order = await shop.purchase(order_id)
    completed = shop.stripe.complete_checkout(order.provider_session_id)
    assert await shop.stripe.deliver(completed, shop.webhook_url) == (
        200, {"received": True, "duplicate": False})
    return await shop.order(order_id)


async def test_a_purchase_opens_a_stripe_checkout_and_credits_once_on_its_signed_webhook(
    shop: StripeShop,
) -> None:
    order = await shop.purchase("po-1")
    assert order.state == pb.PAYMENT_ORDER_STATE_PENDING
    assert order.provider == "stripe" and order.provider_session_id.startswith("cs_")
    assert order.checkout_url == f"https://checkout.stripe.com/c/pay/{order.provider_session_id}"
    (create,) = shop.stripe.writes("/v1/checkout/sessions")
    assert create.idempotency_key == "checkout:po-1"
    assert create.params["client_reference_id"] == "po-1"
    assert create.params["metadata"] == {"payment_order_id": "po-1", "org_id": "acme"}
    assert create.params["line_items"]["0"]["price_data"]["unit_amount"] == str(
        PACKAGE_PRICE_MINOR)  # minor units, an integer
    assert create.params["line_items"]["0"]["price_data"]["currency"] == "usd"
    assert create.params["success_url"] == "https://tally.test/paid"
    assert await shop.posted() == 0  # nothing before the webhook

    completed = shop.stripe.complete_checkout(order.provider_session_id)
    assert await shop.stripe.deliver(completed, shop.webhook_url) == (
        200, {"received": True, "duplicate": False})
    assert (await shop.order("po-1")).state == PAID
    assert await shop.posted() == PACKAGE_CREDITS + PACKAGE_BONUS
    # Stripe also reports the checkout's payment intent, and redelivers: no second credit
    intent = shop.stripe.event("payment_intent.succeeded",
                               shop.stripe.sessions[order.provider_session_id]["payment_intent"])
    assert (await shop.stripe.deliver(intent, shop.webhook_url))[0] == 200
    assert await shop.stripe.deliver(completed, shop.webhook_url) == (
        200, {"received": True, "duplicate": True})
    assert await shop.posted() == PACKAGE_CREDITS + PACKAGE_BONUS
    verified = await shop.tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert verified.ok, verified.detail


async def test_purchase_replayed_reuses_its_stripe_session(shop: StripeShop) -> None:
    first = await shop.purchase("po-1")
    again = await shop.purchase("po-1")
    assert again.provider_session_id == first.provider_session_id
    assert len(shop.stripe.sessions) == 1


async def test_a_webhook_with_a_bad_signature_or_a_stale_or_future_time_is_refused(
    shop: StripeShop,
) -> None:
    order = await shop.purchase("po-1")
    completed = shop.stripe.complete_checkout(order.provider_session_id)
    now = int(time.time())
    for attempt in (
        {"secret": "whsec_someone_else_entirely"},
        {"timestamp": now - 301},
        {"timestamp": now + 301},
        {"signature": "t=1,v0=abc"},
        {"signature": ""},
    ):
        status, body = await shop.stripe.deliver(completed, shop.webhook_url,
                                                 **attempt)  # type: ignore[arg-type]
        assert (status, body["error"]) == (400, "WEBHOOK_SIGNATURE_INVALID"), attempt
    assert await shop.posted() == 0
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.provider_events") == 0
    # the genuine delivery, just inside the tolerance, still credits
    assert (await shop.stripe.deliver(completed, shop.webhook_url,
                                      timestamp=now - 290))[0] == 200
    assert await shop.posted() == PACKAGE_CREDITS + PACKAGE_BONUS


async def test_a_top_up_charges_the_saved_card_off_session_and_credits_on_its_webhook(
    shop: StripeShop,
) -> None:
    await configure_top_up(shop, "pm_card_visa")
    await shop.tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(batch_id="b1", items=[
        pb.UsageItem(event_id="e1", org_id="acme", cost_micros=1500 * CREDIT)]))
    create = await eventually(
        lambda: _first(shop.stripe.writes("/v1/payment_intents")), "a payment intent")
    order_id = create.params["metadata"]["payment_order_id"]
    assert create.idempotency_key == f"charge:{order_id}"
    assert (create.params["confirm"], create.params["off_session"]) == ("true", "true")
    assert create.params["payment_method"] == "pm_card_visa"
    assert create.params["customer"] == "cus_TallyFake0001"  # the saved method's customer
    assert create.params["amount"] == str(PACKAGE_PRICE_MINOR)
    order = await eventually(lambda: _attached(shop, order_id), "the intent on the order")
    assert order.provider_session_id.startswith("pi_")
    succeeded = shop.stripe.event("payment_intent.succeeded", order.provider_session_id)
    assert (await shop.stripe.deliver(succeeded, shop.webhook_url))[0] == 200
    assert (await shop.order(order_id)).state == PAID
    assert await shop.posted() == 2000 * CREDIT - 1500 * CREDIT + PACKAGE_CREDITS + \
        PACKAGE_BONUS


@pytest.mark.parametrize(("method", "reason"), [
    ("pm_card_chargeDeclined", "card_declined"),
    ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ("pm_card_authenticationRequired", "authentication_required"),
])
async def test_a_declined_top_up_fails_its_order_with_stripes_reason_and_credits_nothing(
    shop: StripeShop, method: str, reason: str,
) -> None:
    await configure_top_up(shop, method)
    await shop.tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(batch_id="b1", items=[
        pb.UsageItem(event_id="e1", org_id="acme", cost_micros=1500 * CREDIT)]))
    order = await eventually(lambda: _failed_top_up(shop), "the top-up to fail")
    assert order.failure_reason == reason
    # Stripe's payment_intent.payment_failed (requires_payment_method) arrives as well
    (intent,) = shop.stripe.intents.values()
    assert intent["status"] == "requires_payment_method"
    failed = shop.stripe.event("payment_intent.payment_failed", intent["id"])
    assert (await shop.stripe.deliver(failed, shop.webhook_url))[0] == 200
    assert (await shop.order(order.payment_order_id)).state == pb.PAYMENT_ORDER_STATE_FAILED
    assert await shop.posted() == 500 * CREDIT  # 2000 funded - 1500 used, nothing added


async def test_a_refund_goes_to_stripe_with_the_payment_intent_and_its_own_key(
    shop: StripeShop,
) -> None:
    order = await paid(shop)
    reply = await shop.refund("rf-1", "po-1", 500)
    assert reply.provider_refund_minor == 500
    (create,) = shop.stripe.writes("/v1/refunds")
    intent = shop.stripe.sessions[order.provider_session_id]["payment_intent"]
    assert create.params == {"payment_intent": intent, "amount": "500"}
    assert create.idempotency_key == "refund:rf-1"
    row = await shop.db.fetchrow("SELECT * FROM ledger.refunds WHERE refund_id = 'rf-1'")
    assert row["provider_state"] == "DONE"
    assert row["provider_refund_id"] in shop.stripe.refunds
    # Stripe's charge.refunded is acknowledged and changes nothing
    refunded = shop.stripe.event("charge.refunded", shop.stripe.intents[intent]["latest_charge"])
    assert (await shop.stripe.deliver(refunded, shop.webhook_url))[0] == 200
    assert (await shop.refund("rf-1", "po-1", 500)).transfer == reply.transfer
    assert len(shop.stripe.writes("/v1/refunds")) == 1


RATE_LIMITED = {"type": "invalid_request_error", "code": "rate_limit",
                "message": "Too many requests hit the API too quickly."}
SERVER_ERROR = {"type": "api_error", "message": "Something went wrong on Stripe's end."}


@pytest.mark.parametrize(("status", "error"), [(429, RATE_LIMITED), (500, SERVER_ERROR),
                                               (503, SERVER_ERROR)])
async def test_stripe_unavailable_at_checkout_is_unavailable_and_a_retry_finishes_the_order(
    shop: StripeShop, status: int, error: dict[str, str],
) -> None:
    shop.stripe.fail_next("/v1/checkout/sessions", status, error)
    with pytest.raises(TallyError) as caught:
        await shop.purchase("po-1")
    assert caught.value.reason is Reason.UNAVAILABLE
    assert await shop.posted() == 0
    order = await shop.purchase("po-1")  # the client's retry, same order id
    assert order.provider_session_id.startswith("cs_")
    keys = [r.idempotency_key for r in shop.stripe.writes("/v1/checkout/sessions")]
    assert keys == ["checkout:po-1", "checkout:po-1"]


@pytest.mark.parametrize(("status", "error"), [(429, RATE_LIMITED), (502, SERVER_ERROR)])
async def test_stripe_unavailable_for_a_top_up_leaves_the_order_pending_and_credits_nothing(
    shop: StripeShop, status: int, error: dict[str, str],
) -> None:
    shop.stripe.fail_next("/v1/payment_intents", status, error)
    await configure_top_up(shop, "pm_card_visa")
    await shop.tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(batch_id="b1", items=[
        pb.UsageItem(event_id="e1", org_id="acme", cost_micros=1500 * CREDIT)]))
    create = await eventually(
        lambda: _first(shop.stripe.writes("/v1/payment_intents")), "a payment intent")
    order = await shop.order(create.params["metadata"]["payment_order_id"])
    assert (order.state, order.provider_session_id) == (pb.PAYMENT_ORDER_STATE_PENDING, "")
    assert not shop.stripe.intents
    assert await shop.posted() == 500 * CREDIT


async def test_stripe_unavailable_for_a_refund_keeps_it_pending_until_stripe_confirms(
    shop: StripeShop,
) -> None:
    await paid(shop)
    shop.stripe.fail_next("/v1/refunds", 503, SERVER_ERROR)
    reply = await shop.refund("rf-1", "po-1", 500)
    row = await shop.db.fetchrow("SELECT * FROM ledger.refunds WHERE refund_id = 'rf-1'")
    assert row["provider_state"] == "PENDING" and "503" in row["provider_error"]
    again = await shop.refund("rf-1", "po-1", 500)
    assert again.transfer == reply.transfer
    row = await shop.db.fetchrow("SELECT * FROM ledger.refunds WHERE refund_id = 'rf-1'")
    assert row["provider_state"] == "DONE"
    assert len(shop.stripe.refunds) == 1
    keys = [r.idempotency_key for r in shop.stripe.writes("/v1/refunds")]
    assert keys == ["refund:rf-1", "refund:rf-1"]


def test_the_provider_never_shows_its_secret_key() -> None:
    provider = StripeProvider("sk_live_51abcdefghijklmnopqrstuvwxyzWXYZ",
                              success_url="https://tally.test/paid")
    assert "abcdef" not in repr(provider) and repr(provider).endswith("...WXYZ)")


# ---- helpers ---------------------------------------------------------------------------------


async def configure_top_up(shop: StripeShop, method: str) -> None:
    await shop.tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="promo", org_id="acme", kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=2000 * CREDIT, reason="starting credit"))
    await shop.tally.ledger.SetAutoTopUp(pb.SetAutoTopUpRequest(
        request_id=f"cfg-{method}", auto_top_up=pb.AutoTopUp(
            org_id="acme", enabled=True, threshold_micros=THRESHOLD, max_per_day=5,
            payment_method_id=method, package_id=PACKAGE),
        context=common_pb2.RequestContext(actor="user:owner")))


async def _first(items: list[object]) -> object | None:
    return items[0] if items else None


async def _attached(shop: StripeShop, order_id: str) -> pb.PaymentOrder | None:
    order = await shop.order(order_id)
    return order if order.provider_session_id else None


async def _failed_top_up(shop: StripeShop) -> pb.PaymentOrder | None:
    orders = (await shop.tally.ledger.ListPaymentOrders(pb.ListPaymentOrdersRequest(
        org_id="acme"))).orders
    return next((o for o in orders if o.state == pb.PAYMENT_ORDER_STATE_FAILED), None)


# ---- configuration ---------------------------------------------------------------------------


def _start_ledger(**env: str) -> subprocess.CompletedProcess[str]:
    """`python -m services.ledger` with only `env` (and PATH) set; it should stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "services.ledger"], capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "TALLY_DATABASE_URL":
             "postgresql://nobody@127.0.0.1:1/none", **env}, check=False)


def test_the_ledger_refuses_to_start_the_local_provider_in_production() -> None:
    started = _start_ledger(TALLY_ENVIRONMENT="production")
    assert started.returncode == 2
    assert ("config error: TALLY_LEDGER_PAYMENT_PROVIDER: is local (the development provider"
            in started.stderr)
    assert "TALLY_ENVIRONMENT=production" in started.stderr


def test_stripe_without_its_settings_names_every_missing_one_and_no_secret(
    tmp_path: Path,
) -> None:
    started = _start_ledger(TALLY_ENVIRONMENT="production",
                            TALLY_LEDGER_PAYMENT_PROVIDER="stripe")
    assert started.returncode == 2
    for var in ("TALLY_LEDGER_STRIPE_SECRET_KEY", "TALLY_LEDGER_WEBHOOK_SECRETS",
                "TALLY_LEDGER_STRIPE_SUCCESS_URL"):
        assert f"config error: {var}: is required" in started.stderr, var
    leaked = "whsec_short"
    started = _start_ledger(TALLY_LEDGER_PAYMENT_PROVIDER="stripe",
                            TALLY_LEDGER_STRIPE_SECRET_KEY="pk_live_publishable_not_secret",
                            TALLY_LEDGER_WEBHOOK_SECRETS=leaked)
    assert started.returncode == 2
    assert "TALLY_LEDGER_STRIPE_SECRET_KEY: expected a Stripe secret" in started.stderr
    assert "TALLY_LEDGER_WEBHOOK_SECRETS: expected" in started.stderr
    assert "pk_live_publishable" not in started.stderr and leaked not in started.stderr
    key_file = tmp_path / "stripe-key"
    key_file.write_text("sk_test_tally_from_a_file_0001\n")
    started = _start_ledger(TALLY_ENVIRONMENT="production",
                            TALLY_LEDGER_PAYMENT_PROVIDER="stripe",
                            TALLY_LEDGER_STRIPE_SECRET_KEY_FILE=str(key_file),
                            TALLY_LEDGER_WEBHOOK_SECRETS=WEBHOOK_SECRET,
                            TALLY_LEDGER_STRIPE_SUCCESS_URL="https://tally.test/paid")
    assert started.returncode == 2  # read from the file, and refused as a test-mode key
    assert ("TALLY_LEDGER_STRIPE_SECRET_KEY: is a test-mode key while "
            "TALLY_ENVIRONMENT=production") in started.stderr
    assert "sk_test_tally_from_a_file" not in started.stderr


def test_stripe_settings_build_a_stripe_provider() -> None:
    settings = load(LedgerConfig, {
        "TALLY_LEDGER_PAYMENT_PROVIDER": "stripe",
        "TALLY_LEDGER_STRIPE_SECRET_KEY": SECRET_KEY,
        "TALLY_LEDGER_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "TALLY_LEDGER_STRIPE_SUCCESS_URL": "https://tally.test/paid"})
    provider = payment_provider(load_kit_config({}), settings, settings.webhook_secrets)
    assert isinstance(provider, StripeProvider)
    assert (provider.name, provider.signature_header) == ("stripe", "Stripe-Signature")
    with pytest.raises(ConfigError) as caught:
        payment_provider(load_kit_config({}), dataclasses.replace(
            settings, payment_provider="local", environment="production"), None)
    assert [var for var, _ in caught.value.problems] == ["TALLY_LEDGER_PAYMENT_PROVIDER"]


# ---- the adapter alone, against the fake ------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = FakeStripe()
    await server.start()
    yield server
    await server.stop()


def _checkout(order_id: str = "po-1") -> CheckoutRequest:
    return CheckoutRequest(order_id, "acme", 2000, "USD", "2,000 credits + 100 bonus")


async def test_stripe_pythons_own_retry_of_a_5xx_reuses_the_idempotency_key(
    fake: FakeStripe,
) -> None:
    provider = StripeProvider(SECRET_KEY, success_url="https://tally.test/paid",
                              api_base=fake.url, max_network_retries=1)
    try:
        fake.fail_next("/v1/checkout/sessions", 503, SERVER_ERROR)
        session = await provider.create_checkout(_checkout())
        again = await provider.create_checkout(_checkout())  # a ledger retry: replayed
    finally:
        await provider.stop()
    assert again == session and list(fake.sessions) == [session.session_id]
    assert [r.idempotency_key for r in fake.writes("/v1/checkout/sessions")] == [
        "checkout:po-1"] * 3


async def test_a_refused_request_is_a_refusal_with_stripes_code_not_unavailable(
    fake: FakeStripe,
) -> None:
    provider = StripeProvider(SECRET_KEY, success_url="https://tally.test/paid",
                              api_base=fake.url, max_network_retries=0)
    wrong_key = StripeProvider("sk_test_not_the_fakes_key_00000",
                               success_url="https://tally.test/paid", api_base=fake.url,
                               max_network_retries=0)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.charge(ChargeRequest("po-1", "acme", 2000, "USD", "pm_unknown",
                                                "top-up"))
        assert not isinstance(caught.value, ProviderUnavailable)
        assert str(caught.value).startswith("resource_missing:")
        with pytest.raises(ProviderError) as caught:
            await wrong_key.create_checkout(_checkout())
        assert not isinstance(caught.value, ProviderUnavailable)
        assert "sk_test_not_the_fakes_key" not in str(caught.value)
    finally:
        await provider.stop()
        await wrong_key.stop()
    assert not fake.sessions and not fake.intents


def test_stripe_events_are_read_in_the_ledgers_terms() -> None:
    provider = StripeProvider(SECRET_KEY, success_url="https://tally.test/paid")
    session = {"id": "cs_test_1", "object": "checkout.session", "amount_total": 2000,
               "currency": "usd", "client_reference_id": "po-1", "payment_status": "unpaid",
               "metadata": {"payment_order_id": "po-1"}}

    def event(event_type: str, obj: dict[str, object]) -> bytes:
        return json.dumps({"id": "evt_1", "object": "event", "type": event_type,
                           "created": 1_700_000_000, "data": {"object": obj}}).encode()

    unpaid = provider.parse_event(event("checkout.session.completed", session))
    assert unpaid.type is ProviderEventType.OTHER  # a bank debit still settling
    settled = provider.parse_event(event("checkout.session.async_payment_succeeded",
                                         {**session, "payment_status": "paid"}))
    assert (settled.type, settled.payment_order_id, settled.amount_minor, settled.currency,
            settled.session_id) == (ProviderEventType.PAYMENT_SUCCEEDED, "po-1", 2000, "USD",
                                    "cs_test_1")
    failed = provider.parse_event(event("payment_intent.payment_failed", {
        "id": "pi_1", "object": "payment_intent", "amount": 2000, "currency": "usd",
        "metadata": {"payment_order_id": "po-2"},
        "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}}))
    assert (failed.type, failed.failure_reason) == (ProviderEventType.PAYMENT_FAILED,
                                                    "insufficient_funds")
    foreign = provider.parse_event(event("payment_intent.succeeded", {
        "id": "pi_2", "object": "payment_intent", "amount": 5, "currency": "usd",
        "metadata": {}}))  # another integration's payment on the same account
    assert foreign.type is ProviderEventType.OTHER
    assert provider.parse_event(event("customer.created", {"id": "cus_1"})).type is \
        ProviderEventType.OTHER
    for bad in (b"not json", b"[]", json.dumps({"object": "event"}).encode()):
        with pytest.raises(ValueError):
            provider.parse_event(bad)
