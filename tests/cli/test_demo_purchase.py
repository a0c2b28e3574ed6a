"""The purchase step of `tally demo` against real pricing and ledger servers: it pays the
checkout page through its form, waits for the webhook's credit and prints the balance rise,
and a webhook that never arrives ends the wait with an error that says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from pypdf import PdfReader

from services.ledger.server import LedgerConfig
from tally.cli import demo
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import PACKAGE_BONUS, PACKAGE_CREDITS, open_shop


async def test_the_demo_buys_the_starter_package_and_prints_the_balance_rise(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with open_shop(db_url) as shop:
        await demo._purchase(shop.tally, "org-demo-1", "run1")
        order = await shop.order("demo-purchase-run1", "org-demo-1")
        balance = await shop.balance("org-demo-1")
    printed = capsys.readouterr().out
    assert order.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert balance.available_micros == PACKAGE_CREDITS + PACKAGE_BONUS
    assert "individual-20: USD 20.00 for 2000 + 100 bonus credits, PENDING" in printed
    assert "card 4242 accepted at http" in printed
    assert "order SUCCEEDED after " in printed and "(purchase:demo-purchase-run1)" in printed
    assert "available 0 -> 2100" in printed


async def test_the_demo_writes_the_purchases_invoice_and_the_months_statement_as_pdf(
        db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with open_shop(db_url) as shop:
        await demo._purchase(shop.tally, "org-demo-3", "run3")
        await demo._documents(shop.tally, "org-demo-3", "run3", tmp_path / "demo")
    printed = capsys.readouterr().out
    written = {}
    for line in printed.splitlines():
        label, _, value = line.strip().partition("  ")
        if label in ("invoice PDF", "statement PDF"):
            written[label] = Path(value.strip())
    assert set(written) == {"invoice PDF", "statement PDF"}
    invoice_text = PdfReader(written["invoice PDF"]).pages[0].extract_text()
    assert "Invoice INV-" in invoice_text and "USD 20.00" in invoice_text
    statement_text = PdfReader(written["statement PDF"]).pages[0].extract_text()
    assert "Statement of account" in statement_text and "org-demo-3" in statement_text
    assert "2100" in statement_text  # closing balance: 2000 credits + 100 bonus


async def test_the_demo_stops_waiting_for_a_webhook_the_ledger_never_accepts(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "PAYMENT_CONFIRM_TIMEOUT_S", 1.0)
    # The ledger verifies with a secret the provider does not sign with: every delivery fails.
    settings = LedgerConfig(webhook_port=0, checkout_port=0,
                            webhook_secrets=("whsec_not_the_providers_secret",))
    async with open_shop(db_url, settings) as shop:
        with pytest.raises(TallyError) as waited:
            await demo._purchase(shop.tally, "org-demo-2", "run2")
        order = await shop.order("demo-purchase-run2", "org-demo-2")
    assert waited.value.reason is Reason.UNAVAILABLE
    assert waited.value.message.startswith("order demo-purchase-run2 still PENDING 1s after "
                                           "payment: the provider's webhook did not reach")
    assert order.state == pb.PAYMENT_ORDER_STATE_PENDING
