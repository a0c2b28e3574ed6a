"""Statements, snapshots and reconciliation through the BillingService: a purchase paid through
checkout, a partial refund and usage, then the month's statement equals the ledger's balance,
its PDF says its numbers, and the reconciliation agrees on money, documents, credits and
usage; a planted disagreement is listed with both sides; bad months and days are refused
naming the field."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pypdf import PdfReader

from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.kit.money import format_credits
from tally.ledger.v1 import billing_pb2 as bpb
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import (
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    PACKAGE_PRICE_MINOR,
    Shop,
    open_shop,
)

MONTH = datetime.now(UTC).strftime("%Y-%m")
METERING = common_pb2.RequestContext(actor="svc:metering")


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def bought_refunded_and_used(shop: Shop) -> pb.Balance:
    order = await shop.purchase("po-1")
    assert await shop.pay(order) == 303
    await shop.tally.ledger.Refund(pb.RefundRequest(
        refund_id="r1", payment_order_id="po-1", amount_micros=PACKAGE_CREDITS // 4,
        reason="customer asked", context=common_pb2.RequestContext(actor="user:support")))
    await shop.tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b1", context=METERING, org_debits=[pb.OrgUsageDebit(
            org_id="acme", amount_micros=1_234_567, event_count=3, events_digest="ab" * 32)]))
    return await shop.balance()


async def statement(shop: Shop, month: str = MONTH, org: str = "acme") -> bpb.Statement:
    return (await shop.tally.billing.GetStatement(bpb.GetStatementRequest(
        org_id=org, month=month))).statement


async def test_the_months_statement_is_the_ledgers_balance_line_by_line(shop: Shop) -> None:
    balance = await bought_refunded_and_used(shop)
    s = await statement(shop)
    lines = {x.category: x.amount_micros for x in s.lines}
    order = await shop.order("po-1")
    assert lines["PURCHASES"] == PACKAGE_CREDITS and lines["BONUSES"] == PACKAGE_BONUS
    assert lines["REFUNDS"] == -order.refunded_micros
    forfeited = await shop.db.fetchval(
        "SELECT bonus_forfeited_micros FROM ledger.payment_orders WHERE payment_order_id = 'po-1'")
    assert forfeited > 0 and lines["EXPIRATIONS"] == -forfeited  # the bonus lost with it
    assert lines["USAGE"] == -1_234_567 and s.usage_total_micros == 1_234_567
    assert s.opening_balance_micros == 0 and not s.is_final
    assert s.opening_balance_micros + sum(lines.values()) == s.closing_balance_micros
    assert (s.closing_balance_micros, s.closing_arrears_micros) == (
        balance.posted_micros, balance.arrears_micros)
    listed = (await shop.tally.billing.ListStatements(bpb.ListStatementsRequest(
        org_id="acme"))).statements
    assert [x.month for x in listed] == [MONTH]
    listed[0].ClearField("generated_at")  # a provisional statement is computed per request
    s.ClearField("generated_at")
    assert listed[0] == s


async def test_a_statement_pdf_says_the_opening_lines_and_closing(shop: Shop) -> None:
    await bought_refunded_and_used(shop)
    s = await statement(shop)
    parts = [p async for p in shop.tally.billing.DownloadStatementPdf(
        bpb.DownloadStatementPdfRequest(org_id="acme", month=MONTH))]
    pdf = b"".join(p.chunk for p in parts)
    assert pdf.startswith(b"%PDF-") and parts[0].file_name == f"statement-acme-{MONTH}.pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert f"Statement of account {MONTH}" in text and "Organization: acme" in text
    for x in s.lines:
        assert x.description in text
    for micros in (s.closing_balance_micros, -s.lines[0].amount_micros):
        assert format_credits(abs(micros)) in text, micros


async def test_the_reconciliation_agrees_on_money_documents_credits_and_usage(
    shop: Shop,
) -> None:
    await bought_refunded_and_used(shop)
    r = await shop.tally.billing.Reconcile(bpb.ReconcileRequest(org_id="acme", month=MONTH))
    assert list(r.mismatches) == []
    (usd,) = r.money
    note = (await shop.tally.billing.GetInvoice(bpb.GetInvoiceRequest(
        org_id="acme", invoice_id=f"CN-{MONTH[:4]}-000001"))).invoice
    assert (usd.currency, usd.paid_minor, usd.refunded_minor) == (
        "USD", PACKAGE_PRICE_MINOR, note.gross_minor)
    assert usd.refunded_tax_minor == note.tax_minor
    assert r.credits_purchased_micros == PACKAGE_CREDITS
    assert r.credits_refunded_micros == PACKAGE_CREDITS // 4
    assert r.usage_debited_micros + r.usage_arrears_micros == r.usage_receipts_micros
    assert r.usage_receipts_micros == 1_234_567
    everyone = await shop.tally.billing.Reconcile(bpb.ReconcileRequest(month=MONTH))
    assert list(everyone.mismatches) == [] and everyone.money == r.money


@pytest.mark.ledger_tampered
async def test_a_planted_disagreement_is_listed_with_both_sides(shop: Shop) -> None:
    await bought_refunded_and_used(shop)
    now = datetime.now(UTC)
    await shop.db.execute(
        "INSERT INTO ledger.payment_orders (payment_order_id, org_id, kind, state, "
        "amount_minor, currency, credits_micros, bonus_credits_micros, provider, created_by, "
        "created_at, settled_at) VALUES ('po-ghost', 'acme', 'CHECKOUT', 'SUCCEEDED', 999, "
        "'USD', 5, 0, 'local', 'user:x', $1, $1)", now)
    await shop.db.execute(
        "INSERT INTO ledger.usage_batch_results VALUES ('b-ghost', '{acme}', "
        "'{usage:b-ghost:acme}', '{\"\"}', '{77}', '{0}', '{0}', '{0}', $1)", now)
    r = await shop.tally.billing.Reconcile(bpb.ReconcileRequest(org_id="acme", month=MONTH))
    assert [(x.kind, x.subject, x.expected, x.found) for x in r.mismatches] == [
        ("PAID_ORDER_WITHOUT_INVOICE", "po-ghost", "999", "no invoice"),
        ("USAGE_RESULT_WITHOUT_DEBIT", "b-ghost acme", "77", "no USAGE transfer")]


@pytest.mark.parametrize(("rpc", "request_", "field"), [
    ("GetStatement", bpb.GetStatementRequest(org_id="acme", month="2026-1"), "month"),
    ("GetStatement", bpb.GetStatementRequest(org_id="acme", month="2999-01"), "month"),
    ("GetStatement", bpb.GetStatementRequest(org_id="", month=MONTH), "org_id"),
    ("Reconcile", bpb.ReconcileRequest(month="last month"), "month"),
    ("ListStatements", bpb.ListStatementsRequest(org_id="acme", page_token="nope"),
     "page_token"),
    ("ListStatements", bpb.ListStatementsRequest(org_id="acme", page_size=500), "page_size"),
    ("ListDailySnapshots", bpb.ListDailySnapshotsRequest(
        org_id="acme", from_day="2026-02-30", to_day="2026-03-01"), "from_day"),
])
async def test_bad_statement_requests_are_refused_naming_the_field_and_write_nothing(
    shop: Shop, rpc: str, request_: object, field: str,
) -> None:
    with pytest.raises(TallyError) as caught:
        await getattr(shop.tally.billing, rpc)(request_)
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, field)
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.statements") == 0
