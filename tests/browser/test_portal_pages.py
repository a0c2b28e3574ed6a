"""The portal in a real (headless) Chromium: sign-in through the local OIDC provider, the
main pages with real data (screenshots kept under docs/portal/), a purchase on the portal
whose credit appears on an open overview without reloading it, a 375 px wide page, and
keyboard entry.

Selenium blocks and every server runs on this test's event loop, so browser steps run in a
worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from services.portal.domain import credits
from tests.browser.test_checkout_page import type_card_and_pay, wait_for
from tests.ledger.payments_support import GOOD_CARD, PACKAGE_BONUS, PACKAGE_CREDITS
from tests.portal.support import ORG, PEOPLE, Suite, open_suite


@pytest.fixture(scope="module")
async def suite(module_db_url: str) -> AsyncIterator[Suite]:
    async with open_suite(module_db_url) as opened:
        yield opened


# The committed screenshots (docs/portal/) are refreshed on purpose, with
# TALLY_UPDATE_SCREENSHOTS=1; an ordinary run leaves the work tree as it was.
SHOTS = (Path(__file__).resolve().parents[2] / "docs" / "portal"
         if os.environ.get("TALLY_UPDATE_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "tally-portal-screenshots")
WAIT_S = 20


def sign_in(driver: webdriver.Chrome, url: str, subject: str) -> None:
    """Opens a portal page signed out, signs in at the provider, lands back on it."""
    driver.get(url)
    wait_for(driver, "username").strip()
    driver.find_element(By.ID, "username").send_keys(subject)
    driver.find_element(By.ID, "sign-in").click()
    WebDriverWait(driver, WAIT_S).until(expected_conditions.url_to_be(url))


def shoot(driver: webdriver.Chrome, name: str, path: str, ready_id: str) -> str:
    driver.get(path)
    text = wait_for(driver, ready_id)
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    return text


def text_becomes(driver: webdriver.Chrome, element_id: str, expected: str) -> str:
    WebDriverWait(driver, WAIT_S).until(
        expected_conditions.text_to_be_present_in_element((By.ID, element_id), expected))
    return str(driver.find_element(By.ID, element_id).text)


async def test_an_owner_signs_in_and_the_main_pages_show_real_data(
        suite: Suite, browser: webdriver.Chrome) -> None:
    base = f"{suite.url}/orgs/{ORG}"
    await asyncio.to_thread(sign_in, browser, f"{base}/overview", PEOPLE["owner"])
    balance = await suite.balance()
    available = await asyncio.to_thread(
        shoot, browser, "overview", f"{base}/overview", "available")
    assert available == credits(balance.available_micros)
    assert await asyncio.to_thread(text_becomes, browser, "live-state", "on") == "on"
    table = await asyncio.to_thread(shoot, browser, "usage", f"{base}/usage?by=model",
                                    "table-groups")
    assert "claude-sonnet" in table
    drawn = await asyncio.to_thread(browser.execute_script, (
        "const c = document.getElementById('chart-time');"
        "return c.width > 0 && window.Chart && !!window.Chart.getChart(c);"))
    assert drawn is True
    listed = await asyncio.to_thread(shoot, browser, "transactions", f"{base}/transactions",
                                     "transactions")
    assert "welcome credit" in listed
    await asyncio.to_thread(shoot, browser, "receipt", f"{base}/receipts/portal-evt-0",
                            "receipt-lines")
    await asyncio.to_thread(shoot, browser, "budgets", f"{base}/budgets", "quotas")
    await asyncio.to_thread(shoot, browser, "credit", f"{base}/credit", "buy-individual-20")
    await asyncio.to_thread(shoot, browser, "keys", f"{base}/keys", "create-key")
    await asyncio.to_thread(shoot, browser, "members", f"{base}/members", "invite-member")
    await asyncio.to_thread(shoot, browser, "alerts", f"{base}/alerts", "new-alert")
    statements = await asyncio.to_thread(shoot, browser, "statements", f"{base}/statements",
                                         "statements")
    assert "so far" in statements


async def test_a_purchase_on_the_portal_shows_on_the_open_overview_without_reload(
        suite: Suite, browser: webdriver.Chrome) -> None:
    base = f"{suite.url}/orgs/{ORG}"
    await asyncio.to_thread(sign_in, browser, f"{base}/overview", PEOPLE["billing"])
    before = await suite.balance()
    await asyncio.to_thread(text_becomes, browser, "live-state", "on")
    # a marker that a reload would wipe
    await asyncio.to_thread(browser.execute_script, "window.notReloaded = true;")
    overview = browser.current_window_handle

    def buy_in_a_new_tab() -> str:
        browser.switch_to.new_window("tab")
        browser.get(f"{base}/credit")
        wait_for(browser, "buy-individual-20")
        browser.find_element(By.ID, "buy-individual-20").click()
        WebDriverWait(browser, WAIT_S).until(lambda d: "/checkout/" in d.current_url)
        type_card_and_pay(browser, browser.current_url, GOOD_CARD)
        return wait_for(browser, "order-state")

    state = await asyncio.to_thread(buy_in_a_new_tab)
    assert state in ("PENDING", "SUCCEEDED")
    await suite.provider.settled()
    expected = credits(before.available_micros + PACKAGE_CREDITS + PACKAGE_BONUS)

    def back_to_overview() -> tuple[str, object]:
        browser.switch_to.window(overview)
        shown = text_becomes(browser, "available", expected)
        return shown, browser.execute_script("return window.notReloaded === true;")

    shown, not_reloaded = await asyncio.to_thread(back_to_overview)
    assert shown == expected and not_reloaded is True
    assert (await suite.balance()).available_micros == (
        before.available_micros + PACKAGE_CREDITS + PACKAGE_BONUS)


async def test_the_usage_page_is_usable_375_px_wide_by_keyboard_with_aa_contrast(
        suite: Suite, browser: webdriver.Chrome) -> None:
    base = f"{suite.url}/orgs/{ORG}"
    await asyncio.to_thread(sign_in, browser, f"{base}/overview", PEOPLE["viewer"])

    def narrow() -> tuple[int, str, str]:
        browser.set_window_size(375, 812)
        browser.get(f"{base}/usage")
        wait_for(browser, "table-time")
        width = int(browser.execute_script(
            "return document.documentElement.scrollWidth;"))
        browser.save_screenshot(str(SHOTS / "usage-375px.png"))
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.TAB)
        first = browser.switch_to.active_element
        first_text = str(first.text)
        first.send_keys(Keys.ENTER)
        return width, first_text, str(browser.switch_to.active_element.get_attribute("id"))

    width, first, focused = await asyncio.to_thread(narrow)
    assert width <= 375 + 1
    assert first == "Skip to content" and focused == "main"
    unlabelled = await asyncio.to_thread(browser.execute_script, (
        "return [...document.querySelectorAll('input:not([type=hidden]), select')]"
        ".filter(e => !document.querySelector(`label[for='${e.id}']`)).map(e => e.name);"))
    assert unlabelled == []
    pairs = await asyncio.to_thread(browser.execute_script, CONTRAST_PAIRS)
    assert len(pairs) > 10
    for what, foreground, background in pairs:
        ratio = contrast(foreground, background)
        assert ratio >= 4.5, f"{what}: {foreground} on {background} is {ratio:.2f}:1"


# Text colours of the portal's kinds of text, each with the background it sits on.
CONTRAST_PAIRS = """
const bg = e => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
  if (c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c; } return 'rgb(255, 255, 255)'; };
const pick = sel => [...document.querySelectorAll(sel)].slice(0, 3);
return ['body', 'main a', 'nav a', '.top a', '.top .who', '.muted', 'button', 'th', 'td',
        'label', 'caption'].flatMap(sel => pick(sel).map(
  e => [sel, getComputedStyle(e).color, bg(e)]));
"""


def contrast(foreground: str, background: str) -> float:
    """WCAG 2 contrast ratio of two `rgb(r, g, b)` colours."""
    def luminance(colour: str) -> float:
        channels = [int(v) / 255 for v in colour[colour.index("(") + 1:-1].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
                  for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)
