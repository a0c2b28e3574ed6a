"""Reconciliation of money and documents: every paid order has one invoice for its amount and
one PURCHASE credit for its credits, every refund that returned money has one credit note for
that money, and no document stands without what it documents. An empty list is the normal
state; each mismatch names both sides."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from services.ledger.store import Connection


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One disagreement: what it is about, and what each side says."""

    kind: str
    subject: str
    expected: str
    found: str


# ($1, $2) = the period, $3 = the org ('' = all), $4 = the states of a paid order
_CHECKS: Final = (
    ("PAID_ORDER_WITHOUT_INVOICE",
     "SELECT o.payment_order_id AS subject, o.amount_minor::text AS expected, "
     "'no invoice' AS found FROM ledger.payment_orders o WHERE o.state = ANY($4::text[]) "
     "AND o.settled_at >= $1 AND o.settled_at < $2 AND ($3 = '' OR o.org_id = $3) "
     "AND NOT EXISTS (SELECT 1 FROM ledger.billing_documents b WHERE b.kind = 'INVOICE' "
     "AND b.payment_order_id = o.payment_order_id)"),
    ("INVOICE_AMOUNT",
     "SELECT b.document_id AS subject, o.amount_minor || ' ' || o.currency AS expected, "
     "b.gross_minor || ' ' || b.currency AS found FROM ledger.billing_documents b "
     "JOIN ledger.payment_orders o USING (payment_order_id) WHERE b.kind = 'INVOICE' "
     "AND b.issued_at >= $1 AND b.issued_at < $2 AND ($3 = '' OR b.org_id = $3) "
     "AND ((b.gross_minor, b.currency) <> (o.amount_minor, o.currency) "
     "OR o.state <> ALL($4::text[]))"),
    ("INVOICE_WITHOUT_CREDIT",
     "SELECT b.document_id AS subject, o.credits_micros::text AS expected, "
     "coalesce(t.amount_micros::text, 'no PURCHASE transfer') AS found "
     "FROM ledger.billing_documents b JOIN ledger.payment_orders o USING (payment_order_id) "
     "LEFT JOIN ledger.transfers t ON t.transfer_id = 'purchase:' || o.payment_order_id "
     "WHERE b.kind = 'INVOICE' AND b.issued_at >= $1 AND b.issued_at < $2 "
     "AND ($3 = '' OR b.org_id = $3) "
     "AND (t.amount_micros IS NULL OR t.amount_micros <> o.credits_micros)"),
    ("REFUND_WITHOUT_CREDIT_NOTE",
     "SELECT r.refund_id AS subject, r.provider_refund_minor::text AS expected, "
     "coalesce(b.gross_minor::text, 'no credit note') AS found FROM ledger.refunds r "
     "LEFT JOIN ledger.billing_documents b ON b.kind = 'CREDIT_NOTE' "
     "AND b.refund_id = r.refund_id WHERE r.provider_refund_minor > 0 "
     "AND r.created_at >= $1 AND r.created_at < $2 AND ($3 = '' OR r.org_id = $3) "
     "AND (b.gross_minor IS NULL OR b.gross_minor <> r.provider_refund_minor)"),
)


async def mismatches(conn: Connection, start: datetime, end: datetime, org_id: str = ""
                     ) -> list[Mismatch]:
    """Every mismatch of [start, end) (of one org, or all), ordered by kind and subject."""
    paid = ["SUCCEEDED", "PARTIALLY_REFUNDED", "REFUNDED"]
    found: list[Mismatch] = []
    for kind, query in _CHECKS:
        args = (start, end, org_id, paid) if "$4::" in query else (start, end, org_id)
        rows = await conn.fetch(query + " ORDER BY subject", *args)
        found += [Mismatch(kind, r["subject"], r["expected"], r["found"]) for r in rows]
    return found
