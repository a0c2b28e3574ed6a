"""Manual settlement (four eyes) and refunds of unspent purchased credit, against real
PostgreSQL and the local provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.ledger.payments.provider import ProviderError, ProviderRefund
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import (
    CREDIT,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    PACKAGE_PRICE_MINOR,
    Shop,
    open_shop,
)

BANK = pb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


def as_actor(actor: str) -> common_pb2.RequestContext:
    return common_pb2.RequestContext(actor=actor)


async def record(shop: Shop, order_id: str = "bank-1", **fields: object
                 ) -> pb.RecordManualPaymentResponse:
    values: dict[str, object] = {
        "payment_order_id": order_id, "org_id": "acme", "amount_minor": 500_000,
        "currency": "USD", "credits_micros": 500_000 * CREDIT,
        "bonus_credits_micros": 50_000 * CREDIT, "reference": "SEPA 2026-12-01 #4711",
        "method": BANK, "context": as_actor("user:bob-billing")}
    values.update(fields)
    return await shop.tally.ledger.RecordManualPayment(
        pb.RecordManualPaymentRequest(**values))  # type: ignore[arg-type]


async def approve(shop: Shop, order_id: str, actor: str
                  ) -> pb.ApproveManualPaymentResponse:
    return await shop.tally.ledger.ApproveManualPayment(pb.ApproveManualPaymentRequest(
        payment_order_id=order_id, context=as_actor(actor)))


async def refund(shop: Shop, refund_id: str, order_id: str, credits: int = 0,
                 reason: str = "customer asked") -> pb.RefundResponse:
    return await shop.tally.ledger.Refund(pb.RefundRequest(
        refund_id=refund_id, payment_order_id=order_id, amount_micros=credits * CREDIT,
        reason=reason, context=as_actor("user:carol-support")))


async def spend(shop: Shop, transfer_id: str, credits: int) -> None:
    await shop.tally.ledger.Transfer(pb.TransferRequest(
        transfer_id=transfer_id, org_id="acme", kind=pb.TRANSFER_KIND_USAGE,
        amount_micros=credits * CREDIT))


async def paid_order(shop: Shop, order_id: str = "po-1") -> pb.PaymentOrder:
    order = await shop.purchase(order_id)
    await shop.pay(order)
    return await shop.order(order_id)


# --- manual settlement ------------------------------------------------------------------


async def test_a_manual_payment_is_credited_only_when_someone_else_approves_it(shop: Shop
                                                                              ) -> None:
    recorded = (await record(shop)).order
    assert (recorded.state, recorded.kind, recorded.provider, recorded.created_by) == (
        pb.PAYMENT_ORDER_STATE_PENDING, pb.PAYMENT_ORDER_KIND_MANUAL, "manual",
        "user:bob-billing")
    assert (recorded.manual_method, recorded.reference) == (BANK, "SEPA 2026-12-01 #4711")
    with pytest.raises(TallyError) as same_person:
        await approve(shop, "bank-1", "user:bob-billing")
    assert (same_person.value.reason, same_person.value.field) == (
        Reason.PERMISSION_DENIED, "context.actor")
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.transfers") == 0

    approved = await approve(shop, "bank-1", "user:dana-admin")
    assert (approved.order.state, approved.order.approved_by) == (
        pb.PAYMENT_ORDER_STATE_SUCCEEDED, "user:dana-admin")
    assert approved.balance_after.posted_micros == 550_000 * CREDIT
    again = await approve(shop, "bank-1", "user:erin-admin")
    assert again.order == approved.order  # approving an approved order changes nothing
    assert (await shop.balance()).posted_micros == 550_000 * CREDIT
    trail = await shop.db.fetch(
        "SELECT state, actor, cause FROM ledger.payment_order_history "
        "WHERE payment_order_id = 'bank-1' ORDER BY id")
    assert [(r["state"], r["actor"]) for r in trail] == [
        ("PENDING", "user:bob-billing"), ("SUCCEEDED", "user:dana-admin")]
    actors = await shop.db.fetch("SELECT kind, actor FROM ledger.transfers ORDER BY seq")
    assert [(r["kind"], r["actor"]) for r in actors] == [
        ("PURCHASE", "user:dana-admin"), ("BONUS", "user:dana-admin")]


async def test_concurrent_approvals_credit_once(shop: Shop) -> None:
    await record(shop)
    replies = await asyncio.gather(*(approve(shop, "bank-1", f"user:admin-{i}")
                                     for i in range(20)))
    assert {r.order.state for r in replies} == {pb.PAYMENT_ORDER_STATE_SUCCEEDED}
    assert len({r.order.approved_by for r in replies}) == 1
    assert (await shop.balance()).posted_micros == 550_000 * CREDIT


async def test_recording_is_idempotent_on_the_order_id(shop: Shop) -> None:
    first = (await record(shop)).order
    assert (await record(shop)).order == first
    with pytest.raises(TallyError) as caught:
        await record(shop, amount_minor=1)
    assert caught.value.reason is Reason.IDEMPOTENCY_KEY_REUSED


@pytest.mark.parametrize(("fields", "field"), [
    ({"reference": "  "}, "reference"),
    ({"method": pb.MANUAL_PAYMENT_METHOD_UNSPECIFIED}, "method"),
    ({"credits_micros": 0}, "credits_micros"),
    ({"bonus_credits_micros": -1}, "bonus_credits_micros"),
    ({"amount_minor": 0}, "amount_minor"),
    ({"currency": "dollars"}, "currency"),
    ({"payment_order_id": ""}, "payment_order_id"),
])
async def test_a_bad_manual_payment_names_its_field_and_records_nothing(
        shop: Shop, fields: dict[str, object], field: str) -> None:
    with pytest.raises(TallyError) as caught:
        await record(shop, **fields)
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, field)
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.payment_orders") == 0


# --- refunds ----------------------------------------------------------------------------


async def test_partial_refunds_add_up_exactly_to_the_whole(shop: Shop) -> None:
    await paid_order(shop)
    first = await refund(shop, "rf-1", "po-1", 500)
    assert (first.reversed_micros, first.provider_refund_minor,
            first.bonus_forfeited_micros) == (500 * CREDIT, 500, 25 * CREDIT)
    assert first.order.state == pb.PAYMENT_ORDER_STATE_PARTIALLY_REFUNDED
    assert first.transfer.kind == pb.TRANSFER_KIND_REFUND
    assert first.transfer.payment_order_id == "po-1"
    rest = await refund(shop, "rf-2", "po-1")  # 0 = everything still unspent
    assert (rest.reversed_micros, rest.provider_refund_minor, rest.bonus_forfeited_micros) == (
        1500 * CREDIT, 1500, 75 * CREDIT)
    order = rest.order
    assert (order.state, order.refunded_micros, order.refunded_minor) == (
        pb.PAYMENT_ORDER_STATE_REFUNDED, PACKAGE_CREDITS, PACKAGE_PRICE_MINOR)
    assert (await shop.balance()).posted_micros == 0
    refunded = [e for e in shop.provider.events if e["type"] == "charge.refunded"]
    assert len(refunded) == 2
    verified = await shop.tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert verified.ok, verified.detail


async def test_a_refund_takes_back_only_unspent_and_unheld_credit(shop: Shop) -> None:
    await paid_order(shop)
    await spend(shop, "usage-1", 1000)  # burns the 100 bonus first, then 900 purchased
    with pytest.raises(TallyError) as caught:
        await refund(shop, "rf-1", "po-1", 1200)
    assert caught.value.reason is Reason.REFUND_EXCEEDS_UNSPENT
    assert caught.value.metadata["unspent_micros"] == str(1100 * CREDIT)
    await shop.tally.ledger.Reserve(pb.ReserveRequest(
        reservation_id="hold-1", org_id="acme", amount_micros=1000 * CREDIT, ttl_seconds=60))
    everything = await refund(shop, "rf-2", "po-1")
    assert (everything.reversed_micros, everything.provider_refund_minor,
            everything.bonus_forfeited_micros) == (100 * CREDIT, 100, 0)
    balance = await shop.balance()
    assert (balance.posted_micros, balance.held_micros) == (1000 * CREDIT, 1000 * CREDIT)
    assert not [e for e in shop.provider.events if e["type"] == "charge.refunded"
                and e["data"]["object"].get("refund", {}).get("amount") == 1200]


async def test_a_refund_of_everything_unspent_takes_a_credit_lease_back_first(
        shop: Shop) -> None:
    await record(shop, "bank-1")
    await approve(shop, "bank-1", "user:dana-admin")
    lease = await shop.tally.ledger.ExtendLease(pb.ExtendLeaseRequest(
        request_id="x1", lease_id="L1", org_id="acme", holder="metering",
        add_micros=500_000 * CREDIT, ttl_seconds=60))
    assert lease.added_micros == 500_000 * CREDIT  # all but the bonus is leased
    everything = await refund(shop, "rf-1", "bank-1")  # 0 = all that is unspent
    assert (everything.reversed_micros, everything.bonus_forfeited_micros) == (
        500_000 * CREDIT, 50_000 * CREDIT)
    balance = await shop.balance()
    assert (balance.posted_micros, balance.held_micros, balance.leased_micros) == (0, 0, 0)
    verified = await shop.tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert verified.ok, verified.detail


async def test_refund_refusals_name_their_reason_and_change_nothing(shop: Shop) -> None:
    pending = await shop.purchase("po-pending")
    with pytest.raises(TallyError) as not_paid:
        await refund(shop, "rf-1", pending.payment_order_id)
    assert not_paid.value.reason is Reason.PAYMENT_NOT_COMPLETED
    with pytest.raises(TallyError) as unknown:
        await refund(shop, "rf-2", "no-such-order")
    assert unknown.value.reason is Reason.NOT_FOUND
    with pytest.raises(TallyError) as no_reason:
        await refund(shop, "rf-3", "po-pending", reason=" ")
    assert (no_reason.value.reason, no_reason.value.field) == (Reason.INVALID_ARGUMENT,
                                                               "reason")
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.refunds") == 0


async def test_a_refund_replays_by_its_id_without_refunding_twice(shop: Shop) -> None:
    await paid_order(shop)
    first = await refund(shop, "rf-1", "po-1", 300)
    again = await refund(shop, "rf-1", "po-1", 300)
    assert (again.reversed_micros, again.provider_refund_minor, again.transfer) == (
        first.reversed_micros, first.provider_refund_minor, first.transfer)
    assert len([e for e in shop.provider.events if e["type"] == "charge.refunded"]) == 1
    with pytest.raises(TallyError) as caught:
        await refund(shop, "rf-1", "po-1", 400)
    assert caught.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert (await shop.balance()).posted_micros == (PACKAGE_CREDITS + PACKAGE_BONUS
                                                    - 300 * CREDIT - 15 * CREDIT)


async def test_concurrent_refunds_never_exceed_what_is_unspent(shop: Shop) -> None:
    await paid_order(shop)
    outcomes = await asyncio.gather(*(refund(shop, f"rf-{i}", "po-1", 150) for i in range(20)),
                                    return_exceptions=True)
    done = [o for o in outcomes if isinstance(o, pb.RefundResponse)]
    refused = [o for o in outcomes if isinstance(o, TallyError)]
    assert len(done) == 2000 // 150 and len(refused) == 20 - len(done)
    assert {e.reason for e in refused} == {Reason.REFUND_EXCEEDS_UNSPENT}
    order = await shop.order("po-1")
    assert order.refunded_micros == len(done) * 150 * CREDIT
    money = sum(e["data"]["object"]["refund"]["amount"] for e in shop.provider.events
                if e["type"] == "charge.refunded")
    assert money == order.refunded_minor == sum(d.provider_refund_minor for d in done)


async def test_a_manual_payment_refunds_without_the_provider(shop: Shop) -> None:
    await record(shop)
    await approve(shop, "bank-1", "user:dana-admin")
    reply = await refund(shop, "rf-1", "bank-1", 100_000)
    assert (reply.reversed_micros, reply.provider_refund_minor) == (100_000 * CREDIT, 100_000)
    assert shop.provider.events == []


async def test_a_refund_stands_when_the_provider_is_down_and_its_money_follows_once(
        shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    await paid_order(shop)
    real_refund = shop.provider.refund

    async def provider_down(session_id: str, amount_minor: int, key: str) -> ProviderRefund:
        raise ProviderError("connection refused")

    monkeypatch.setattr(shop.provider, "refund", provider_down)
    reply = await refund(shop, "rf-1", "po-1", 500)
    assert (reply.reversed_micros, reply.provider_refund_minor) == (500 * CREDIT, 500)
    row = await shop.db.fetchrow("SELECT * FROM ledger.refunds WHERE refund_id = 'rf-1'")
    assert (row["provider_state"], row["provider_error"]) == ("PENDING", "connection refused")
    assert (await shop.balance()).posted_micros == (PACKAGE_CREDITS + PACKAGE_BONUS
                                                    - 500 * CREDIT - 25 * CREDIT)

    monkeypatch.setattr(shop.provider, "refund", real_refund)
    again = await refund(shop, "rf-1", "po-1", 500)  # a retry (or the ledger's own) sends it
    assert again.transfer == reply.transfer
    row = await shop.db.fetchrow("SELECT * FROM ledger.refunds WHERE refund_id = 'rf-1'")
    assert row["provider_state"] == "DONE" and row["provider_refund_id"].startswith("re_")
    await refund(shop, "rf-1", "po-1", 500)
    refunded = [e for e in shop.provider.events if e["type"] == "charge.refunded"]
    assert [e["data"]["object"]["refund"]["amount"] for e in refunded] == [500]
