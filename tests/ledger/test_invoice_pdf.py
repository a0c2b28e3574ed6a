"""Invoice PDFs: rendered from the stored document, streamed in chunks, and saying (as text a
reader extracts) the numbers the invoice holds: number, parties, lines, tax, totals, payment
reference and the reverse-charge statement."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pypdf import PdfReader

from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.kit.money import format_money
from tally.ledger.v1 import billing_pb2 as bpb
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import PACKAGE_CREDITS, Shop, open_shop

YEAR = datetime.now(UTC).year
CONTEXT = common_pb2.RequestContext(actor="user:finance")


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def download(shop: Shop, invoice_id: str, org: str = "acme"
                   ) -> tuple[list[bpb.DownloadInvoicePdfResponse], bytes]:
    parts = [part async for part in shop.tally.billing.DownloadInvoicePdf(
        bpb.DownloadInvoicePdfRequest(org_id=org, invoice_id=invoice_id))]
    return parts, b"".join(p.chunk for p in parts)


def text_of(pdf: bytes) -> str:
    reader = PdfReader(io.BytesIO(pdf))
    return "\n".join(page.extract_text() for page in reader.pages)


async def test_a_reverse_charge_invoice_pdf_says_its_numbers_and_the_legal_text(shop: Shop
                                                                               ) -> None:
    await shop.tally.billing.SetBillingProfile(bpb.SetBillingProfileRequest(
        request_id="p1", context=CONTEXT, profile=bpb.BillingProfile(
            org_id="acme", legal_name="Acme SAS",
            address=bpb.BillingAddress(line1="1 rue de Rivoli", city="Paris",
                                       postal_code="75001"),
            country="FR", tax_id="FRXX123456789", invoice_email="ap@acme.example",
            currency="USD")))
    order = await shop.purchase("po-1")
    assert await shop.pay(order) == 303
    invoice_id = f"INV-{YEAR}-000001"
    invoice = (await shop.tally.billing.GetInvoice(bpb.GetInvoiceRequest(
        org_id="acme", invoice_id=invoice_id))).invoice
    parts, pdf = await download(shop, invoice_id)
    assert pdf.startswith(b"%PDF-") and parts[0].file_name == f"{invoice_id}.pdf"
    assert all(len(p.chunk) <= 64 * 1024 for p in parts)
    text = text_of(pdf)
    for expected in (f"Invoice {invoice_id}", "Acme SAS", "1 rue de Rivoli",
                     "Tax id: FRXX123456789", invoice.issuer.legal_name,
                     invoice.lines[0].description,
                     invoice.issuer.tax_id, "2000 credits",
                     format_money(invoice.net_minor, "USD"),
                     format_money(invoice.tax_minor, "USD"),
                     format_money(invoice.gross_minor, "USD"), "REVERSE_CHARGE",
                     "Reverse charge", invoice.payment_reference):
        assert expected in text, expected
    assert (invoice.tax_minor, invoice.net_minor) == (0, invoice.gross_minor)


async def test_a_credit_note_pdf_names_the_invoice_it_corrects(shop: Shop) -> None:
    order = await shop.purchase("po-1")
    assert await shop.pay(order) == 303
    await shop.tally.ledger.Refund(pb.RefundRequest(
        refund_id="r1", payment_order_id="po-1", amount_micros=PACKAGE_CREDITS // 2,
        reason="customer asked", context=common_pb2.RequestContext(actor="user:support")))
    note = (await shop.tally.billing.GetInvoice(bpb.GetInvoiceRequest(
        org_id="acme", invoice_id=f"CN-{YEAR}-000001"))).invoice
    _, pdf = await download(shop, note.invoice_id)
    text = text_of(pdf)
    assert f"Credit note CN-{YEAR}-000001" in text
    assert f"Corrects invoice: INV-{YEAR}-000001" in text
    assert format_money(note.gross_minor, "USD") in text
    assert format_money(note.tax_minor, "USD") in text


async def test_a_pdf_of_a_missing_or_another_orgs_invoice_is_not_found(shop: Shop) -> None:
    order = await shop.purchase("po-1")
    assert await shop.pay(order) == 303
    for org, invoice_id in (("intruder", f"INV-{YEAR}-000001"), ("acme", "INV-1999-000009")):
        with pytest.raises(TallyError) as caught:
            await download(shop, invoice_id, org)
        assert (caught.value.reason, caught.value.field) == (Reason.NOT_FOUND, "invoice_id")
