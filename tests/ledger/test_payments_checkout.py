"""Buying credit through hosted checkout, and the webhook endpoint that alone grants it:
signatures, replays, forgeries, rotation, failures after verification, events out of order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from services.ledger.server import LedgerConfig
from tally.common.v1 import common_pb2
from tally.kit import metrics
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import (
    CREDIT,
    DECLINED_CARD,
    OLD_SECRET,
    PACKAGE,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    PACKAGE_PRICE_MINOR,
    SECRET,
    Shop,
    eventually,
    open_shop,
    signed,
)

COMPLETED = "checkout.session.completed"
WEBHOOKS = "tally_ledger_payment_webhooks_total"


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def test_a_purchase_credits_only_when_the_signed_webhook_says_paid(shop: Shop) -> None:
    order = await shop.purchase("po-1")
    assert order.state == pb.PAYMENT_ORDER_STATE_PENDING
    assert (order.amount_minor, order.currency, order.credits_micros,
            order.bonus_credits_micros) == (PACKAGE_PRICE_MINOR, "USD", PACKAGE_CREDITS,
                                            PACKAGE_BONUS)
    assert order.checkout_url.startswith(shop.provider.url)
    assert order.kind == pb.PAYMENT_ORDER_KIND_CHECKOUT and order.created_by == "user:alice"
    with pytest.raises(TallyError) as unknown:
        await shop.balance()  # nothing is credited (not even an account) before payment
    assert unknown.value.reason is Reason.NOT_FOUND

    assert await shop.pay(order) == 303
    paid = await shop.order("po-1")
    assert paid.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert paid.credit_transfer_id == "purchase:po-1" and not paid.checkout_url
    balance = await shop.balance()
    assert balance.posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
    assert balance.billing_state == common_pb2.BILLING_STATE_ACTIVE
    assert sorted((g.grant_kind, g.remaining_micros) for g in balance.grants) == sorted(
        [(pb.GRANT_KIND_PURCHASED, PACKAGE_CREDITS), (pb.GRANT_KIND_BONUS, PACKAGE_BONUS)])
    listed = await shop.tally.ledger.ListTransactions(pb.ListTransactionsRequest(org_id="acme"))
    assert sorted((t.kind, t.amount_micros, t.payment_order_id) for t in listed.transfers) == \
        sorted([(pb.TRANSFER_KIND_PURCHASE, PACKAGE_CREDITS, "po-1"),
                (pb.TRANSFER_KIND_BONUS, PACKAGE_BONUS, "po-1")])
    succeeded = await shop.outbox("acme", "PAYMENT_SUCCEEDED")
    assert [json.loads(e["attributes"])["payment_order_id"] for e in succeeded] == ["po-1"]


async def test_purchase_is_idempotent_on_its_order_id(shop: Shop) -> None:
    first = await shop.purchase("po-1")
    again = await shop.purchase("po-1")
    assert again == first  # same order, same checkout session
    assert len([e for e in shop.provider.events]) == 0
    with pytest.raises(TallyError) as reused:
        await shop.purchase("po-1", package="team-200")
    assert reused.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert (await shop.order("po-1")).package_id == PACKAGE


async def test_a_custom_amount_buys_credit_at_the_books_price_rounded_down(shop: Shop) -> None:
    order = await shop.purchase("po-custom", custom=pb.CustomAmount(amount_minor=1234,
                                                                    currency="USD"))
    assert (order.credits_micros, order.bonus_credits_micros, order.package_id) == (
        1234 * CREDIT, 0, "")
    await shop.pay(order)
    assert (await shop.balance()).posted_micros == 1234 * CREDIT


@pytest.mark.parametrize(("fields", "reason", "field"), [
    ({"package": ""}, Reason.INVALID_ARGUMENT, "package_id"),
    ({"package": "no-such-package"}, Reason.NOT_FOUND, "package_id"),
    ({"package": "enterprise-20000"}, Reason.INVALID_ARGUMENT, "package_id"),
    ({"custom": pb.CustomAmount(amount_minor=100, currency="EUR")}, Reason.INVALID_ARGUMENT,
     "custom.currency"),
    ({"custom": pb.CustomAmount(amount_minor=100, currency="usd")}, Reason.INVALID_ARGUMENT,
     "custom.currency"),
    ({"custom": pb.CustomAmount(amount_minor=0, currency="USD")}, Reason.INVALID_ARGUMENT,
     "custom.amount_minor"),
    ({"success_url": "javascript:alert(1)"}, Reason.INVALID_ARGUMENT, "success_url"),
    ({"org": ""}, Reason.INVALID_ARGUMENT, "org_id"),
])
async def test_a_bad_purchase_names_its_field_and_creates_nothing(
        shop: Shop, fields: dict[str, object], reason: Reason, field: str) -> None:
    with pytest.raises(TallyError) as caught:
        await shop.purchase("po-bad", **fields)  # type: ignore[arg-type]
    assert (caught.value.reason, caught.value.field) == (reason, field)
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.payment_orders") == 0
    assert shop.provider.events == []


async def test_a_success_webhook_replayed_100_times_concurrently_credits_once(shop: Shop
                                                                             ) -> None:
    order = await shop.purchase("po-1")
    await shop.pay(order)
    body = shop.event_body(COMPLETED, "po-1")
    duplicates = metrics.sample(WEBHOOKS, {"provider": "local", "outcome": "DUPLICATE"})
    replies = await asyncio.gather(*(shop.post_webhook(body, signed(body))
                                     for _ in range(100)))
    assert {status for status, _ in replies} == {200}
    assert all(reply["duplicate"] for _, reply in replies)  # the provider's delivery was first
    assert metrics.sample(WEBHOOKS, {"provider": "local", "outcome": "DUPLICATE"}) == \
        duplicates + 100
    assert (await shop.balance()).posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
    assert await shop.db.fetchval(
        "SELECT count(*) FROM ledger.transfers WHERE payment_order_id = 'po-1'") == 2


async def test_racing_first_deliveries_credit_once(shop: Shop) -> None:
    # The provider's own delivery is refused (wrong secret), so 100 copies race to be first.
    shop.provider.rotate_secret("whsec_unknown_to_the_ledger")
    order = await shop.purchase("po-1")
    await shop.pay(order)
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.provider_events") == 0
    body = shop.event_body(COMPLETED, "po-1")
    replies = await asyncio.gather(*(shop.post_webhook(body, signed(body))
                                     for _ in range(100)))
    assert {status for status, _ in replies} == {200}
    assert sum(not reply["duplicate"] for _, reply in replies) == 1
    assert (await shop.balance()).posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
    assert (await shop.order("po-1")).state == pb.PAYMENT_ORDER_STATE_SUCCEEDED


async def test_forged_stale_and_future_webhooks_are_refused_and_grant_nothing(shop: Shop
                                                                             ) -> None:
    shop.provider.rotate_secret("whsec_unknown_to_the_ledger")  # keep the real one out
    order = await shop.purchase("po-1")
    await shop.pay(order)
    body = shop.event_body(COMPLETED, "po-1")
    now = int(time.time())
    tampered = body.replace(b'"paid"', b'"paid" ')
    attempts = {
        "forged": (body, signed(body, secret="whsec_made_up_by_a_forger")),
        "stale": (body, signed(body, at=now - 301)),
        "future": (body, signed(body, at=now + 301)),
        "tampered body": (tampered, signed(body)),
        "no signature": (body, ""),
        "malformed": (body, "v1=deadbeef"),
    }
    refused = metrics.sample(WEBHOOKS, {"provider": "local", "outcome": "REFUSED"})
    for what, (payload, header) in attempts.items():
        status, reply = await shop.post_webhook(payload, header)
        assert (status, reply["error"]) == (400, "WEBHOOK_SIGNATURE_INVALID"), what
    assert metrics.sample(WEBHOOKS, {"provider": "local", "outcome": "REFUSED"}) == \
        refused + len(attempts)
    with pytest.raises(TallyError) as caught:
        await shop.tally.ledger.ConfirmPayment(pb.ConfirmPaymentRequest(
            provider="local", payload=body, signature_header=signed(body, at=now - 3600)))
    assert caught.value.reason is Reason.WEBHOOK_SIGNATURE_INVALID
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.provider_events") == 0
    assert (await shop.order("po-1")).state == pb.PAYMENT_ORDER_STATE_PENDING
    with pytest.raises(TallyError):
        await shop.balance()
    # a signature within the tolerance from a current secret is accepted
    status, reply = await shop.post_webhook(body, signed(body, at=now - 290))
    assert (status, reply["duplicate"]) == (200, False)


async def test_both_secrets_are_accepted_during_a_rotation(shop: Shop) -> None:
    for order_id, secret in (("po-old", OLD_SECRET), ("po-new", SECRET)):
        shop.provider.rotate_secret(secret)
        await shop.pay(await shop.purchase(order_id))
        assert (await shop.order(order_id)).state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert (await shop.balance()).posted_micros == 2 * (PACKAGE_CREDITS + PACKAGE_BONUS)


async def test_confirm_payment_over_grpc_is_the_same_exactly_once(shop: Shop) -> None:
    shop.provider.rotate_secret("whsec_unknown_to_the_ledger")
    await shop.pay(await shop.purchase("po-1"))
    body = shop.event_body(COMPLETED, "po-1")
    first, again = [await shop.tally.ledger.ConfirmPayment(pb.ConfirmPaymentRequest(
        provider="local", payload=body, signature_header=signed(body))) for _ in range(2)]
    assert (first.processed_first_time, again.processed_first_time) == (True, False)
    assert again.order.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert (await shop.balance()).posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS


@contextlib.asynccontextmanager
async def paid_while_held(shop: Shop, order: pb.PaymentOrder) -> AsyncIterator[int]:
    """Pays `order` by card while its row is locked; yields the pid of the webhook's
    transaction once it waits on that lock, which is released on leaving."""
    async with shop.db.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM ledger.payment_orders "
                              "WHERE payment_order_id = $1 FOR UPDATE", order.payment_order_id)
        form = {"card_number": "4242424242424242", "expiry": "12/40", "cvc": "123",
                "name": "Ada"}
        async with shop.http.post(f"{order.checkout_url}/pay", data=form,
                                  allow_redirects=False) as reply:
            assert reply.status == 303
        yield await eventually(lambda: shop.db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%payment_orders%FOR UPDATE%'"), "the webhook to wait on the lock")


async def test_a_failure_after_verification_is_retried_by_the_provider_and_credits_once(
        shop: Shop) -> None:
    order = await shop.purchase("po-1")
    # The webhook's transaction waits on the held order row, and is then killed.
    async with paid_while_held(shop, order) as waiting:
        await shop.db.execute("SELECT pg_terminate_backend($1)", waiting)

        async def a_failed_delivery() -> bool:
            return any(not d.delivered for d in shop.provider.deliveries)

        await eventually(a_failed_delivery, "a failed delivery")
    await shop.provider.settled()
    attempts = [d for d in shop.provider.deliveries if d.event_type == COMPLETED]
    assert [d.delivered for d in attempts][-1] and not attempts[0].delivered
    assert attempts[0].status == 500
    assert (await shop.order("po-1")).state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert (await shop.balance()).posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.provider_events") == 1


async def test_a_declined_card_leaves_the_order_open_and_says_why(shop: Shop) -> None:
    order = await shop.purchase("po-1")
    assert await shop.pay(order, DECLINED_CARD) == 402
    declined = await shop.order("po-1")
    assert (declined.state, declined.failure_reason) == (pb.PAYMENT_ORDER_STATE_PENDING,
                                                         "card_declined")
    failed = await shop.outbox("acme", "PAYMENT_FAILED")
    assert [json.loads(e["attributes"])["failure_reason"] for e in failed] == ["card_declined"]
    unpaid = await shop.balance()  # an account, but no credit: throttled like any such org
    assert (unpaid.posted_micros, unpaid.billing_state) == (0, common_pb2.BILLING_STATE_THROTTLED)
    await shop.pay(order)
    assert (await shop.order("po-1")).state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert (await shop.balance()).billing_state == common_pb2.BILLING_STATE_ACTIVE


async def test_reading_an_order_or_top_up_needs_valid_ids(shop: Shop) -> None:
    with pytest.raises(TallyError) as caught:
        await shop.order("", org="acme")
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT,
                                                         "payment_order_id")
    with pytest.raises(TallyError) as unknown:
        await shop.order("po-nobody-made")
    assert unknown.value.reason is Reason.NOT_FOUND
    with pytest.raises(TallyError) as no_org:
        await shop.tally.ledger.GetAutoTopUp(pb.GetAutoTopUpRequest(org_id=""))
    assert (no_org.value.reason, no_org.value.field) == (Reason.INVALID_ARGUMENT, "org_id")


async def test_a_failure_arriving_after_the_success_changes_nothing(shop: Shop) -> None:
    shop.provider.rotate_secret("whsec_unknown_to_the_ledger")  # we deliver, in our order
    order = await shop.purchase("po-1")
    await shop.pay(order, DECLINED_CARD)
    await shop.pay(order)
    success = shop.event_body(COMPLETED, "po-1")
    failure = shop.event_body("payment_intent.payment_failed", "po-1")
    for body in (success, failure):
        status, _ = await shop.post_webhook(body, signed(body))
        assert status == 200
    paid = await shop.order("po-1")
    assert (paid.state, paid.failure_reason) == (pb.PAYMENT_ORDER_STATE_SUCCEEDED, "")
    outcomes = await shop.db.fetch("SELECT type, outcome FROM ledger.provider_events "
                                   "ORDER BY received_at")
    assert [(r["type"], r["outcome"]) for r in outcomes] == [
        ("PAYMENT_SUCCEEDED", "CREDITED"), ("PAYMENT_FAILED", "IGNORED")]


async def test_a_canceled_checkout_cancels_the_order(shop: Shop) -> None:
    order = await shop.purchase("po-1")
    async with shop.http.post(f"{order.checkout_url}/cancel", allow_redirects=False) as reply:
        assert reply.status in (303, 410)
    await shop.provider.settled()
    assert (await shop.order("po-1")).state == pb.PAYMENT_ORDER_STATE_CANCELED


async def test_an_event_whose_amount_is_not_the_orders_credits_nothing(shop: Shop) -> None:
    shop.provider.rotate_secret("whsec_unknown_to_the_ledger")
    await shop.pay(await shop.purchase("po-1"))
    event = json.loads(shop.event_body(COMPLETED, "po-1"))
    event["id"] = "evt_altered"
    event["data"]["object"]["amount_total"] = 1
    body = json.dumps(event).encode()
    status, _ = await shop.post_webhook(body, signed(body))
    assert status == 200  # acknowledged (it will never become right), recorded, not credited
    assert await shop.db.fetchval("SELECT outcome FROM ledger.provider_events") == "MISMATCH"
    assert (await shop.order("po-1")).state == pb.PAYMENT_ORDER_STATE_PENDING


async def test_webhooks_stay_exactly_once_across_a_restart(db_url: str) -> None:
    async with open_shop(db_url) as shop:
        await shop.pay(await shop.purchase("po-1"))
        body = shop.event_body(COMPLETED, "po-1")
    async with open_shop(db_url, LedgerConfig(webhook_port=0, checkout_port=0,
                                              webhook_secrets=(SECRET,))) as again:
        status, reply = await again.post_webhook(body, signed(body))
        assert (status, reply["duplicate"]) == (200, True)
        assert (await again.balance()).posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS


async def test_an_unknown_provider_is_not_found(shop: Shop) -> None:
    body = b"{}"
    url = shop.webhook_url.rsplit("/", 1)[0] + "/stripe"
    async with shop.http.post(url, data=body, headers={"Local-Signature": signed(body)}) as r:
        assert r.status == 404


async def test_a_provider_that_duplicates_and_reorders_every_webhook_credits_each_order_once(
        db_url: str) -> None:
    async with open_shop(db_url, duplicate_rate=1.0, reorder_rate=1.0, seed=7) as shop:
        orders = [await shop.purchase(f"po-{i}") for i in range(10)]
        await asyncio.gather(*(shop.pay(order, DECLINED_CARD) for order in orders[:5]))
        await asyncio.gather(*(shop.pay(order) for order in orders))
        delivered = [d for d in shop.provider.deliveries if d.delivered]
        assert len(delivered) == 2 * len(shop.provider.events)  # every event came twice
        assert {(await shop.order(o.payment_order_id)).state for o in orders} == {
            pb.PAYMENT_ORDER_STATE_SUCCEEDED}
        assert (await shop.balance()).posted_micros == 10 * (PACKAGE_CREDITS + PACKAGE_BONUS)
        assert await shop.db.fetchval("SELECT count(*) FROM ledger.provider_events") == len(
            shop.provider.events)


async def test_an_orgs_orders_are_listed_newest_first_filtered_and_paged(shop: Shop) -> None:
    for i in range(5):
        await shop.purchase(f"po-{i}")
    await shop.pay(await shop.order("po-1"))
    await shop.pay(await shop.order("po-3"), DECLINED_CARD)
    await shop.purchase("po-other", org="globex")

    async def listed(**fields: object) -> tuple[list[str], str]:
        reply = await shop.tally.ledger.ListPaymentOrders(pb.ListPaymentOrdersRequest(
            org_id="acme", **fields))  # type: ignore[arg-type]
        return [o.payment_order_id for o in reply.orders], reply.next_page_token

    everything, _ = await listed()
    assert everything == ["po-4", "po-3", "po-2", "po-1", "po-0"]
    first, token = await listed(page_size=2)
    second, token2 = await listed(page_size=2, page_token=token)
    third, last = await listed(page_size=2, page_token=token2)
    assert (first + second + third, last) == (everything, "")
    assert (await listed(states=[pb.PAYMENT_ORDER_STATE_SUCCEEDED]))[0] == ["po-1"]
    assert (await listed(kinds=[pb.PAYMENT_ORDER_KIND_MANUAL]))[0] == []
    with pytest.raises(TallyError) as caught:
        await listed(page_token="not-ours")
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, "page_token")


async def test_an_orgs_events_arrive_in_the_order_its_balance_changed(shop: Shop) -> None:
    await shop.tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="promo-1", org_id="acme", kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=10 * CREDIT, reason="welcome"))
    order = await shop.purchase("po-1")
    # The webhook's transaction begins, then waits on the order's row; meanwhile a debit of
    # the same org begins after it and commits before it.
    async with paid_while_held(shop, order):
        await shop.tally.ledger.Transfer(pb.TransferRequest(
            transfer_id="usage-1", org_id="acme", kind=pb.TRANSFER_KIND_USAGE,
            amount_micros=1 * CREDIT))
    await shop.provider.settled()

    async def sealed() -> list[int]:
        if await shop.db.fetchval("SELECT count(*) FROM ledger.outbox WHERE sequence IS NULL"):
            return []
        rows = await shop.db.fetch(
            "SELECT available_micros_after FROM ledger.outbox WHERE org_id = 'acme' "
            "AND type = 'BALANCE_CHANGED' ORDER BY sequence")
        return [r["available_micros_after"] // CREDIT for r in rows]
    assert await eventually(sealed, "the events to be sealed") == [
        10, 9, 9 + (PACKAGE_CREDITS + PACKAGE_BONUS) // CREDIT]
    assert (await shop.balance()).available_micros == 9 * CREDIT + PACKAGE_CREDITS + PACKAGE_BONUS
