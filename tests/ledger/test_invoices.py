"""Invoices and credit notes: issued in the transaction that records a payment or refund,
numbered gaplessly per issuer and year (also under 64 concurrent payments and a crash between
allocation and commit), immutable, and visible to their own org only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.ledger.billing import documents as docs
from services.ledger.billing import reconcile
from services.ledger.billing.store import DEFAULT_ISSUER, BillingStore
from services.ledger.store import LedgerStore
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import billing_pb2 as bpb
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import (
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    PACKAGE_PRICE_MINOR,
    Shop,
    eventually,
    open_shop,
)

YEAR = datetime.now(UTC).year
CONCURRENT_PAYMENTS = 64


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def invoices(shop: Shop, org: str = "acme") -> list[bpb.BillingDocument]:
    return list((await shop.tally.billing.ListInvoices(
        bpb.ListInvoicesRequest(org_id=org, page_size=1000))).invoices)


async def get_invoice(shop: Shop, invoice_id: str, org: str = "acme") -> bpb.BillingDocument:
    return (await shop.tally.billing.GetInvoice(
        bpb.GetInvoiceRequest(org_id=org, invoice_id=invoice_id))).invoice


async def paid(shop: Shop, order_id: str, org: str = "acme") -> None:
    order = await shop.purchase(order_id, org)
    assert await shop.pay(order) == 303


async def refund(shop: Shop, refund_id: str, order_id: str, micros: int) -> None:
    await shop.tally.ledger.Refund(pb.RefundRequest(
        refund_id=refund_id, payment_order_id=order_id, amount_micros=micros,
        reason="customer asked", context=common_pb2.RequestContext(actor="user:support")))


async def test_a_paid_purchase_gets_an_invoice_with_its_lines_tax_and_totals(shop: Shop
                                                                             ) -> None:
    order = await shop.purchase("po-1")
    assert await invoices(shop) == []  # nothing before the money arrives
    assert await shop.pay(order) == 303
    (listed,) = await invoices(shop)
    assert listed.invoice_id == f"INV-{YEAR}-000001" and listed.number == 1
    got = await get_invoice(shop, listed.invoice_id)
    assert got == listed
    assert got.kind == bpb.BILLING_DOCUMENT_KIND_INVOICE
    assert (got.gross_minor, got.net_minor + got.tax_minor) == (PACKAGE_PRICE_MINOR,
                                                                PACKAGE_PRICE_MINOR)
    assert (got.tax.rule, got.tax.rate_ppm) == (bpb.TAX_RULE_DOMESTIC, 190000)
    assert (got.net_minor, got.tax_minor) == (1681, 319)
    assert [(x.credits_micros, x.net_minor) for x in got.lines] == [
        (PACKAGE_CREDITS, 1681), (PACKAGE_BONUS, 0)]
    assert got.issuer.tax_id == DEFAULT_ISSUER.tax_id
    assert got.customer.legal_name == "Organization acme"
    assert got.payment_reference.startswith("local ")


async def test_refunds_get_credit_notes_that_add_up_to_the_invoice(shop: Shop) -> None:
    await paid(shop, "po-1")
    await refund(shop, "r1", "po-1", PACKAGE_CREDITS // 3)
    await refund(shop, "r2", "po-1", PACKAGE_CREDITS - PACKAGE_CREDITS // 3)
    found = {x.invoice_id: x for x in await invoices(shop)}
    invoice = found.pop(f"INV-{YEAR}-000001")
    assert sorted(found) == [f"CN-{YEAR}-000001", f"CN-{YEAR}-000002"]
    notes = list(found.values())
    assert {n.corrects_invoice_id for n in notes} == {invoice.invoice_id}
    assert {n.refund_id for n in notes} == {"r1", "r2"}
    assert all(n.kind == bpb.BILLING_DOCUMENT_KIND_CREDIT_NOTE for n in notes)
    assert sum(n.gross_minor for n in notes) == invoice.gross_minor
    assert sum(n.tax_minor for n in notes) == invoice.tax_minor
    assert all(n.net_minor + n.tax_minor == n.gross_minor for n in notes)


async def test_a_manual_payment_gets_its_invoice_when_approved(shop: Shop) -> None:
    await shop.tally.ledger.RecordManualPayment(pb.RecordManualPaymentRequest(
        payment_order_id="wire-1", org_id="acme", amount_minor=50_000, currency="EUR",
        credits_micros=5_000 * 1_000_000, reference="SEPA 2026-0042",
        method=pb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER,
        context=common_pb2.RequestContext(actor="user:clerk")))
    assert await invoices(shop) == []
    await shop.tally.ledger.ApproveManualPayment(pb.ApproveManualPaymentRequest(
        payment_order_id="wire-1", context=common_pb2.RequestContext(actor="user:cfo")))
    (invoice,) = await invoices(shop)
    assert invoice.payment_order_id == "wire-1" and invoice.gross_minor == 50_000
    assert invoice.payment_reference == "manual SEPA 2026-0042"
    assert invoice.lines[0].description.startswith("Credits (custom amount)")


async def test_an_issued_document_cannot_be_changed_or_deleted(shop: Shop) -> None:
    await paid(shop, "po-1")
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await shop.db.execute("UPDATE ledger.billing_documents SET gross_minor = 1")
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await shop.db.execute("DELETE FROM ledger.billing_documents")


async def test_another_orgs_or_a_missing_invoice_is_not_found(shop: Shop) -> None:
    await paid(shop, "po-1")
    for org, invoice_id in (("intruder", f"INV-{YEAR}-000001"), ("acme", "INV-1999-000001")):
        with pytest.raises(TallyError) as caught:
            await get_invoice(shop, invoice_id, org)
        assert (caught.value.reason, caught.value.field) == (Reason.NOT_FOUND, "invoice_id")
    with pytest.raises(TallyError) as caught:
        await get_invoice(shop, "", "acme")
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT,
                                                          "invoice_id")


async def test_64_concurrent_payments_and_a_crash_leave_numbers_1_to_n_without_gaps(
        shop: Shop, db_url: str) -> None:
    orders = [await shop.purchase(f"po-{i}", f"org-{i % 8}")
              for i in range(CONCURRENT_PAYMENTS)]
    # A transaction takes a number and then dies before committing (its backend is killed
    # while it holds the counter): the number must go to the next payment, not be lost.
    billing = BillingStore(LedgerStore(shop.db))
    crashing = await asyncpg.connect(db.asyncpg_url(db_url))
    victim_pid = crashing.get_server_pid()
    crash_tx = crashing.transaction()
    await crash_tx.start()
    assert await billing.allocate_number(crashing, docs.DocumentKind.INVOICE, YEAR) == 1
    payments = asyncio.gather(*(shop.pay(order) for order in orders))

    async def someone_waits_for_the_counter() -> bool:
        return bool(await shop.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%document_counters%'"))

    await eventually(someone_waits_for_the_counter, "a payment waiting for the counter")
    assert await shop.db.fetchval("SELECT pg_terminate_backend($1)", victim_pid)
    assert set(await payments) == {303}
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await crashing.execute("SELECT 1")
    crashing.terminate()
    rows = await shop.db.fetch(
        "SELECT number, document_id, payment_order_id FROM ledger.billing_documents "
        "WHERE kind = 'INVOICE' ORDER BY number")
    assert [r["number"] for r in rows] == list(range(1, CONCURRENT_PAYMENTS + 1))
    assert sorted(r["payment_order_id"] for r in rows) == sorted(o.payment_order_id
                                                                 for o in orders)
    assert [r["document_id"] for r in rows] == [
        f"INV-{YEAR}-{n:06d}" for n in range(1, CONCURRENT_PAYMENTS + 1)]


@pytest.mark.ledger_tampered
async def test_payments_invoices_credits_and_refunds_reconcile_and_a_gap_is_listed(
        shop: Shop) -> None:
    await paid(shop, "po-1")
    await paid(shop, "po-2", "other")
    await refund(shop, "r1", "po-1", PACKAGE_CREDITS // 4)
    start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC)
    async with shop.db.acquire() as conn:
        assert await reconcile.mismatches(conn, start, end) == []
        # a paid order whose invoice is missing (as if issued elsewhere) is named, both sides
        await conn.execute("ALTER TABLE ledger.billing_documents "
                           "DISABLE TRIGGER billing_documents_immutable")
        await conn.execute("DELETE FROM ledger.billing_documents "
                           "WHERE payment_order_id = 'po-2'")
        assert await reconcile.mismatches(conn, start, end) == [reconcile.Mismatch(
            "PAID_ORDER_WITHOUT_INVOICE", "po-2", str(PACKAGE_PRICE_MINOR), "no invoice")]
        assert await reconcile.mismatches(conn, start, end, "acme") == []


async def test_a_refund_beyond_what_was_paid_is_refused_and_issues_no_credit_note(
        shop: Shop) -> None:
    await paid(shop, "po-1")
    for micros in (PACKAGE_CREDITS + 1, PACKAGE_CREDITS * 2):
        with pytest.raises(TallyError) as caught:
            await refund(shop, f"r-{micros}", "po-1", micros)
        assert caught.value.reason is Reason.REFUND_EXCEEDS_UNSPENT  # FAILED_PRECONDITION
        assert "amount_micros" in caught.value.message
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.refunds") == 0
    assert await shop.db.fetchval(
        "SELECT count(*) FROM ledger.billing_documents WHERE kind = 'CREDIT_NOTE'") == 0
    assert await shop.db.fetchval(
        "SELECT count(*) FROM ledger.document_counters WHERE kind = 'CREDIT_NOTE'") == 0
    await refund(shop, "r-ok", "po-1", PACKAGE_CREDITS)  # the whole of it still can be
    (note,) = [x for x in await invoices(shop) if x.invoice_id.startswith("CN-")]
    assert note.invoice_id == f"CN-{YEAR}-000001"  # the refusals took no number
