"""`tally profile` against a real ledger (real PostgreSQL): set, show, require, delete, and a
bad tax id refused with its reason and a non-zero exit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.cli.test_payments_cli import tally
from tests.ledger.payments_support import Shop, open_shop


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def test_profile_set_show_require_and_delete(shop: Shop) -> None:
    draft = await tally(shop, "profile", "set", "acme", "--legal-name", "Acme AB",
                        "--country", "se", "--tax-id", "SE 556677889901")
    assert draft.exit_code == 0, draft.err
    assert "SE556677889901" in draft.out and "address.line1, address.city" in draft.out
    required = await tally(shop, "profile", "require", "acme")
    assert required.exit_code == 0 and "yes" in required.out
    refused = await tally(shop, "purchase", "acme", "--package", "individual-20")
    assert refused.exit_code == 1
    assert refused.err.startswith("BILLING_PROFILE_INCOMPLETE: ")
    assert "address.line1, address.city, invoice_email, currency" in refused.err
    full = await tally(shop, "profile", "set", "acme", "--legal-name", "Acme AB",
                       "--line1", "Drottninggatan 1", "--city", "Stockholm", "--country",
                       "SE", "--tax-id", "SE556677889901", "--email", "ap@acme.example",
                       "--currency", "SEK")
    assert full.exit_code == 0 and "nothing (complete)" in full.out
    shown = await tally(shop, "profile", "show", "acme")
    assert "Stockholm" in shown.out and "required        yes" in shown.out
    deleted = await tally(shop, "profile", "delete", "acme")
    assert deleted.exit_code == 0
    gone = await tally(shop, "profile", "show", "acme")
    assert gone.exit_code == 1 and gone.err.startswith("NOT_FOUND: ")


async def test_a_bad_tax_id_prints_the_field_and_why_and_exits_non_zero(shop: Shop) -> None:
    bad = await tally(shop, "profile", "set", "acme", "--country", "AU", "--tax-id",
                      "51824753557")
    assert bad.exit_code == 1
    assert bad.err.startswith("INVALID_ARGUMENT: profile.tax_id: ")
    assert "mod 89" in bad.err
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.billing_profiles") == 0


async def test_invoices_list_get_and_pdf_show_what_a_payment_issued(
        shop: Shop, tmp_path: Path) -> None:
    order = await shop.purchase("po-1")
    assert await shop.pay(order) == 303
    number = f"INV-{datetime.now(UTC).year}-000001"
    listed = await tally(shop, "invoices", "list", "acme")
    assert listed.exit_code == 0 and number in listed.out and "USD 20.00" in listed.out
    shown = await tally(shop, "invoices", "get", "acme", number)
    assert shown.exit_code == 0
    assert "total      USD 20.00" in shown.out and "DOMESTIC, DE" in shown.out
    out = tmp_path / "invoice.pdf"
    written = await tally(shop, "invoices", "pdf", "acme", number, "--out", str(out))
    assert written.exit_code == 0 and written.out.strip() == str(out.resolve())
    assert out.read_bytes().startswith(b"%PDF-")
    missing = await tally(shop, "invoices", "pdf", "intruder", number, "--out",
                          str(tmp_path / "x.pdf"))
    assert missing.exit_code == 1 and missing.err.startswith("NOT_FOUND: invoice_id")
    assert not (tmp_path / "x.pdf").exists()
