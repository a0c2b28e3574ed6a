"""Buying credit end to end in a real (headless) browser: an app calls Purchase over gRPC, the
customer pays the hosted checkout page with a test card, the provider's signed webhook reaches
the ledger, and only then does the org's balance rise.

Selenium blocks, and the provider and the ledger answer from this test's event loop, so every
browser step runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from selenium import webdriver

from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tests.browser.test_checkout_page import type_card_and_pay, wait_for
from tests.ledger.payments_support import (
    DECLINED_CARD,
    GOOD_CARD,
    PACKAGE,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    Shop,
    eventually,
    open_shop,
)

ORG = "org_browser"


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def purchase(shop: Shop, order_id: str) -> pb.PaymentOrder:
    """Purchase over gRPC, as an app's backend does before redirecting its customer."""
    reply = await shop.tally.ledger.Purchase(pb.PurchaseRequest(
        payment_order_id=order_id, org_id=ORG, package_id=PACKAGE,
        context=common_pb2.RequestContext(org_id=ORG, actor="user:customer")))
    return reply.order


async def available(shop: Shop) -> int:
    """The org's available credit; 0 before its first credit opens an account."""
    try:
        return (await shop.balance(ORG)).available_micros
    except TallyError as exc:
        assert exc.reason is Reason.NOT_FOUND
        return 0


async def test_a_customer_pays_in_the_browser_and_the_balance_rises_by_the_package(
        shop: Shop, browser: webdriver.Chrome) -> None:
    order = await purchase(shop, "po-browser-flow")
    assert order.state == pb.PAYMENT_ORDER_STATE_PENDING
    assert await available(shop) == 0

    await asyncio.to_thread(type_card_and_pay, browser, order.checkout_url, GOOD_CARD)
    paid = await asyncio.to_thread(wait_for, browser, "paid")
    assert "Payment received" in paid and "USD 20.00" in paid

    async def credited() -> int | None:
        found = await available(shop)
        return found if found > 0 else None

    assert await eventually(credited, "the webhook's credit") == PACKAGE_CREDITS + PACKAGE_BONUS
    balance = await shop.balance(ORG)
    assert sorted((g.grant_kind, g.remaining_micros) for g in balance.grants) == sorted(
        [(pb.GRANT_KIND_PURCHASED, PACKAGE_CREDITS), (pb.GRANT_KIND_BONUS, PACKAGE_BONUS)])
    settled = await shop.order("po-browser-flow", ORG)
    assert settled.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert settled.credit_transfer_id == "purchase:po-browser-flow"


async def test_a_declined_card_in_the_browser_shows_the_error_and_credits_nothing(
        shop: Shop, browser: webdriver.Chrome) -> None:
    order = await purchase(shop, "po-browser-declined")

    await asyncio.to_thread(type_card_and_pay, browser, order.checkout_url, DECLINED_CARD)
    error = await asyncio.to_thread(wait_for, browser, "error")
    assert "declined" in error and "card_declined" in error

    async def failure_recorded() -> pb.PaymentOrder | None:
        found = await shop.order("po-browser-declined", ORG)
        return found if found.failure_reason else None

    failed = await eventually(failure_recorded, "the webhook of the failed attempt")
    await shop.provider.settled()  # every webhook the provider sent has been answered
    assert failed.failure_reason == "card_declined"
    assert failed.state != pb.PAYMENT_ORDER_STATE_SUCCEEDED and not failed.credit_transfer_id
    assert await available(shop) == 0
