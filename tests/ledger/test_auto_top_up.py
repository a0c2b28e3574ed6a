"""Automatic top-up: one order per crossing however many debits cross, the daily cap, failed
charges that alert and then throttle, and the payment that lifts the throttle."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from services.ledger.server import LedgerConfig
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import (
    CREDIT,
    OLD_SECRET,
    PACKAGE,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    SECRET,
    Shop,
    eventually,
    open_shop,
)

THRESHOLD = 1000 * CREDIT


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    settings = LedgerConfig(webhook_port=0, checkout_port=0, webhook_secrets=(SECRET, OLD_SECRET),
                            top_up_poll_ms=20, top_up_failures_to_throttle=2)
    async with open_shop(db_url, settings) as opened:
        yield opened


async def configure(shop: Shop, request_id: str, org: str = "acme", *,
                    payment_method: str = "pm_card_visa", max_per_day: int = 5,
                    **amount: object) -> pb.AutoTopUp:
    config = pb.AutoTopUp(org_id=org, enabled=True, threshold_micros=THRESHOLD,
                          max_per_day=max_per_day, payment_method_id=payment_method,
                          **amount)  # type: ignore[arg-type]
    if not amount:
        config.package_id = PACKAGE
    reply = await shop.tally.ledger.SetAutoTopUp(pb.SetAutoTopUpRequest(
        request_id=request_id, auto_top_up=config,
        context=common_pb2.RequestContext(actor="user:owner")))
    return reply.auto_top_up


async def fund(shop: Shop, credits: int, org: str = "acme") -> None:
    await shop.tally.ledger.Transfer(pb.TransferRequest(
        transfer_id=f"promo-{org}-{credits}", org_id=org, kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=credits * CREDIT, reason="starting credit"))


async def debit_burst(shop: Shop, count: int, credits_each: int, org: str = "acme",
                      prefix: str = "ev") -> None:
    """`count` usage debits, ten per batch, from 20 concurrent callers."""
    batches = [pb.PostUsageBatchRequest(batch_id=f"{prefix}-batch-{b}", items=[
        pb.UsageItem(event_id=f"{prefix}-{b}-{i}", org_id=org,
                     cost_micros=credits_each * CREDIT) for i in range(10)])
        for b in range(count // 10)]
    gate = asyncio.Semaphore(20)

    async def post(batch: pb.PostUsageBatchRequest) -> None:
        async with gate:
            await shop.tally.ledger.PostUsageBatch(batch)

    await asyncio.gather(*(post(b) for b in batches))


async def caught_up(shop: Shop) -> None:
    """Waits until the top-up follower has read every event committed so far."""
    async def done() -> bool:
        # one statement, one snapshot: read apart, an event sealed between the reads would
        # count as neither unsealed nor last
        row = await shop.db.fetchrow(
            "SELECT (SELECT max(sequence) FROM ledger.outbox WHERE type = 'BALANCE_CHANGED') "
            "AS last, (SELECT count(*) FROM ledger.outbox WHERE sequence IS NULL) AS unsealed, "
            "(SELECT sequence FROM ledger.outbox_cursors WHERE consumer = 'auto-top-up') "
            "AS cursor")
        assert row is not None
        return (row["unsealed"] == 0 and row["cursor"] is not None
                and row["cursor"] >= (row["last"] or 0))
    await eventually(done, "the top-up follower to catch up")


async def top_up_orders(shop: Shop, org: str = "acme") -> list[pb.PaymentOrder]:
    ids = await shop.db.fetch("SELECT payment_order_id FROM ledger.payment_orders "
                              "WHERE org_id = $1 AND kind = 'AUTO_TOP_UP' ORDER BY created_at",
                              org)
    return [await shop.order(r["payment_order_id"], org) for r in ids]


async def test_a_burst_of_1000_debits_crossing_the_threshold_opens_exactly_one_order(
        shop: Shop) -> None:
    await fund(shop, 1500)
    await configure(shop, "cfg-1", payment_method="pm_card_pending")
    await debit_burst(shop, 1000, 1)  # 1,500 -> 500 credits, crossing 1,000 once
    await caught_up(shop)
    orders = await top_up_orders(shop)
    assert [(o.state, o.kind) for o in orders] == [
        (pb.PAYMENT_ORDER_STATE_PENDING, pb.PAYMENT_ORDER_KIND_AUTO_TOP_UP)]
    assert len(await shop.outbox("acme", "LOW_BALANCE")) == 1

    await shop.provider.complete_pending(orders[0].provider_session_id, succeed=True)
    await shop.provider.settled()
    paid = await shop.order(orders[0].payment_order_id)
    assert paid.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert (await shop.balance()).posted_micros == 500 * CREDIT + PACKAGE_CREDITS + PACKAGE_BONUS
    assert [json.loads(e["attributes"])["payment_order_id"]
            for e in await shop.outbox("acme", "TOP_UP_SUCCEEDED")] == [paid.payment_order_id]
    await caught_up(shop)
    assert len(await top_up_orders(shop)) == 1  # back above the threshold: nothing more


async def test_the_daily_cap_stops_top_ups_and_says_so_once(shop: Shop) -> None:
    await fund(shop, 500)
    # each top-up buys 100 credits: still below 1,000, so the next balance change asks again
    await configure(shop, "cfg-1", max_per_day=3,
                    custom=pb.CustomAmount(amount_minor=100, currency="USD"))
    await debit_burst(shop, 10, 1)

    async def three_paid() -> bool:
        orders = await top_up_orders(shop)
        return len(orders) == 3 and all(o.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
                                        for o in orders)
    await eventually(three_paid, "three top-ups")
    await debit_burst(shop, 10, 1, prefix="later")
    await caught_up(shop)
    assert len(await top_up_orders(shop)) == 3
    refused = [json.loads(e["attributes"]) for e in await shop.outbox("acme", "TOP_UP_FAILED")]
    assert refused == [{"failure_reason": "max_per_day reached"}]
    assert (await shop.balance()).posted_micros == (500 - 20 + 300) * CREDIT


async def test_failed_top_ups_alert_then_throttle_until_a_payment_clears_it(shop: Shop
                                                                           ) -> None:
    await fund(shop, 1500)
    await configure(shop, "cfg-1", payment_method="pm_card_chargeDeclined")
    await debit_burst(shop, 10, 60)  # 1,500 -> 900
    await eventually(lambda: _failed_orders(shop, 1), "the first failed top-up")
    await debit_burst(shop, 10, 1, prefix="more")  # still below: a second try, failing too
    await eventually(lambda: _failed_orders(shop, 2), "the second failed top-up")
    failures = [json.loads(e["attributes"]) for e in await shop.outbox("acme", "TOP_UP_FAILED")]
    assert [f["failure_reason"] for f in failures] == ["card_declined", "card_declined"]
    balance = await shop.balance()
    assert balance.billing_state == common_pb2.BILLING_STATE_THROTTLED
    changed = await shop.outbox("acme", "BILLING_STATE_CHANGED")
    assert "automatic top-up failed 2 times in a row" in json.loads(
        changed[-1]["attributes"])["cause"]

    order = await shop.purchase("po-rescue")  # the customer pays by hand
    await shop.pay(order)
    assert (await shop.balance()).billing_state == common_pb2.BILLING_STATE_ACTIVE


async def _failed_orders(shop: Shop, count: int) -> bool:
    orders = await top_up_orders(shop)
    return len([o for o in orders if o.state == pb.PAYMENT_ORDER_STATE_FAILED]) >= count


async def test_a_charge_the_provider_refuses_outright_fails_the_order(shop: Shop) -> None:
    await fund(shop, 1500)
    await configure(shop, "cfg-1", payment_method="pm_no_such_method")
    await debit_burst(shop, 10, 60)

    async def failed() -> list[pb.PaymentOrder]:
        return [o for o in await top_up_orders(shop) if o.state == pb.PAYMENT_ORDER_STATE_FAILED]
    [order] = await eventually(failed, "the refused top-up")
    assert "no such payment method" in order.failure_reason


async def test_top_up_settings_are_validated_and_idempotent(shop: Shop) -> None:
    unset = await shop.tally.ledger.GetAutoTopUp(pb.GetAutoTopUpRequest(org_id="acme"))
    assert not unset.auto_top_up.enabled
    stored = await configure(shop, "cfg-1")
    assert (stored.package_id, stored.threshold_micros, stored.updated_by) == (
        PACKAGE, THRESHOLD, "user:owner")
    assert await configure(shop, "cfg-1") == stored
    with pytest.raises(TallyError) as reused:
        await configure(shop, "cfg-1", max_per_day=4)
    assert reused.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    for n, (fields, field) in enumerate([
        ({"payment_method": ""}, "auto_top_up.payment_method_id"),
        ({"max_per_day": 0}, "auto_top_up.max_per_day"),
        ({"max_per_day": 25}, "auto_top_up.max_per_day"),
        ({"custom": pb.CustomAmount(amount_minor=100, currency="XXX")},
         "auto_top_up.custom.currency"),
    ]):
        with pytest.raises(TallyError) as caught:
            await configure(shop, f"bad-{n}", **fields)  # type: ignore[arg-type]
        assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, field)
    with pytest.raises(TallyError) as unknown:
        await configure(shop, "bad-package", package_id="no-such-package")
    assert (unknown.value.reason, unknown.value.field) == (Reason.NOT_FOUND,
                                                           "auto_top_up.package_id")
    got = await shop.tally.ledger.GetAutoTopUp(pb.GetAutoTopUpRequest(org_id="acme"))
    assert got.auto_top_up == stored


async def test_an_order_opened_before_a_crash_is_charged_once_after_it(shop: Shop) -> None:
    await fund(shop, 1500)
    await configure(shop, "cfg-1")
    # What a ledger stopped between committing a top-up order and charging it leaves behind.
    await shop.db.execute(
        "INSERT INTO ledger.payment_orders (payment_order_id, org_id, kind, state, "
        "amount_minor, currency, credits_micros, bonus_credits_micros, provider, created_by, "
        "created_at) VALUES ('topup:acme:1', 'acme', 'AUTO_TOP_UP', 'PENDING', 2000, 'USD', "
        "$1, $2, 'local', 'service:auto-top-up', now() - interval '1 minute')",
        PACKAGE_CREDITS, PACKAGE_BONUS)

    async def paid() -> bool:
        return (await shop.order("topup:acme:1")).state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    await eventually(paid, "the resumed top-up to be paid")
    await shop.provider.settled()
    charges = [e for e in shop.provider.events if e["type"] == "payment_intent.succeeded"]
    assert len(charges) == 1
    assert (await shop.balance()).posted_micros == 1500 * CREDIT + PACKAGE_CREDITS + PACKAGE_BONUS


async def test_many_orgs_topping_up_while_they_spend_each_get_one_paid_top_up(shop: Shop
                                                                              ) -> None:
    orgs = [f"org-{i}" for i in range(10)]
    for org in orgs:
        await fund(shop, 1500, org)
        await configure(shop, f"cfg-{org}", org)
    # usage, webhooks crediting top-ups and the follower all touch the same orgs at once
    await asyncio.gather(*(debit_burst(shop, 200, 5, org, prefix=org) for org in orgs))
    for org in orgs:
        async def paid(org: str = org) -> bool:
            orders = await top_up_orders(shop, org)
            return [o.state for o in orders] == [pb.PAYMENT_ORDER_STATE_SUCCEEDED]
        await eventually(paid, f"the top-up of {org}")
    await caught_up(shop)
    for org in orgs:
        assert len(await top_up_orders(shop, org)) == 1
        balance = await shop.balance(org)
        assert balance.posted_micros == 500 * CREDIT + PACKAGE_CREDITS + PACKAGE_BONUS
    verified = await shop.tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert verified.ok, verified.detail
