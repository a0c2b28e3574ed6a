"""The local provider's hosted checkout in a real (headless) browser: a customer types a card
into the form and clicks Pay, exactly as on the hosted page of a real provider, and the signed
webhooks that reach a receiver are the proof of what happened.

Selenium blocks, and the provider answers the browser from this test's event loop, so every
browser step runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from services.ledger.payments.local_provider import LocalProvider
from services.ledger.payments.provider import CheckoutRequest
from tally.kit import signing

SECRET = "whsec_browser_test"
EXPIRY = f"12/{(datetime.now(UTC).year + 3) % 100:02d}"
WAIT_S = 20


@dataclass
class Shop:
    """A LocalProvider and the webhook receiver it signs for."""

    provider: LocalProvider
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            signing.verify(request.headers.get(LocalProvider.SIGNATURE_HEADER, ""), body,
                           [SECRET], int(time.time()))
        except signing.SignatureError:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.events.append(json.loads(body))
        return web.Response(status=200)

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    shop = Shop(LocalProvider(secrets=[SECRET], retry_first_s=0.01, max_attempts=3))
    app = web.Application()
    app.router.add_post("/webhooks/local", shop.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    shop.provider.set_webhook_url(f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/local")
    await shop.provider.start()
    yield shop
    await shop.provider.stop()
    await runner.cleanup()


def checkout(order: str) -> CheckoutRequest:
    return CheckoutRequest(payment_order_id=order, org_id="org_acme", amount_minor=2500,
                           currency="USD", description="1,000 credits + 100 bonus")


# ---- blocking browser steps (run in a worker thread) ----------------------------------------

def wait_for(driver: webdriver.Chrome, element_id: str) -> str:
    """Waits until the page shows the element, and returns its text."""
    found = WebDriverWait(driver, WAIT_S).until(
        expected_conditions.visibility_of_element_located((By.ID, element_id)))
    return str(found.text)


def unlabelled_inputs(driver: webdriver.Chrome) -> list[str]:
    """Ids of the page's visible inputs that no <label for=...> names."""
    labelled = {label.get_attribute("for") for label in driver.find_elements(By.TAG_NAME, "label")}
    return [str(i.get_attribute("id")) for i in driver.find_elements(By.TAG_NAME, "input")
            if i.get_attribute("id") not in labelled]


def type_card_and_pay(driver: webdriver.Chrome, url: str, card: str) -> None:
    driver.get(url)
    wait_for(driver, "pay")
    for element_id, text in (("card-number", card), ("expiry", EXPIRY), ("cvc", "123"),
                             ("name", "Ada Lovelace")):
        driver.find_element(By.ID, element_id).send_keys(text)
    driver.find_element(By.ID, "pay").click()


def click(driver: webdriver.Chrome, element_id: str) -> None:
    WebDriverWait(driver, WAIT_S).until(
        expected_conditions.element_to_be_clickable((By.ID, element_id))).click()


# ---- tests ----------------------------------------------------------------------------------

async def test_a_customer_pays_with_the_4242_card_and_sees_payment_received(
        shop: Shop, browser: webdriver.Chrome) -> None:
    session = await shop.provider.create_checkout(checkout("po_browser_ok"))

    await asyncio.to_thread(browser.get, session.url)
    button = await asyncio.to_thread(wait_for, browser, "pay")
    assert button == "Pay USD 25.00"
    assert await asyncio.to_thread(unlabelled_inputs, browser) == []
    await asyncio.to_thread(type_card_and_pay, browser, session.url, "4242 4242 4242 4242")
    paid = await asyncio.to_thread(wait_for, browser, "paid")
    await shop.provider.settled()

    assert "Payment received" in paid and "USD 25.00" in paid
    assert shop.types() == ["checkout.session.completed"]
    assert shop.events[0]["data"]["object"]["client_reference_id"] == "po_browser_ok"
    assert shop.bad_signatures == 0


async def test_a_declined_card_shows_the_error_and_completes_nothing(
        shop: Shop, browser: webdriver.Chrome) -> None:
    session = await shop.provider.create_checkout(checkout("po_browser_declined"))

    await asyncio.to_thread(type_card_and_pay, browser, session.url, "4000 0000 0000 0002")
    error = await asyncio.to_thread(wait_for, browser, "error")
    await shop.provider.settled()

    assert "declined" in error and "card_declined" in error
    assert shop.types() == ["payment_intent.payment_failed"]
    assert "checkout.session.completed" not in shop.types()


async def test_the_3ds_card_pays_after_the_authenticate_page_approves(
        shop: Shop, browser: webdriver.Chrome) -> None:
    session = await shop.provider.create_checkout(checkout("po_browser_3ds"))

    await asyncio.to_thread(type_card_and_pay, browser, session.url, "4000 0025 0000 3155")
    await asyncio.to_thread(wait_for, browser, "authenticate-fail")
    current_url = await asyncio.to_thread(lambda: browser.current_url)
    assert current_url.endswith(f"/checkout/{session.session_id}/authenticate")
    await shop.provider.settled()
    assert shop.events == []  # nothing decided until the customer answers the bank
    await asyncio.to_thread(click, browser, "authenticate-approve")
    paid = await asyncio.to_thread(wait_for, browser, "paid")
    await shop.provider.settled()

    assert "Payment received" in paid
    assert shop.types() == ["checkout.session.completed"]
