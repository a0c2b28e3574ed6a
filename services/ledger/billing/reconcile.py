"""Reconciliation of money and documents: every paid order has one invoice for its amount and
one PURCHASE credit for its credits, every refund that returned money has one credit note for
that money, and no document stands without what it documents. An empty list is the normal
state; each mismatch names both sides. Metering's usage events are compared with the ledger's
usage debits batch by batch through metering's GetBatchUsage (`usage_event_mismatches`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from services.ledger.billing import statements as st
from services.ledger.billing.statement_store import metering_usage

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


# Credits and usage: every refund's REFUND entry reverses what the refund says; every usage
# result the ledger answered (per org batch, per event) is the amount of the entries carrying
# it. ($1, $2) = the period, $3 = the org ('' = all)
_LEDGER_CHECKS: Final = (
    ("REFUND_CREDIT",
     "SELECT r.refund_id AS subject, r.reversed_micros::text AS expected, "
     "coalesce(t.amount_micros::text, 'no REFUND transfer') AS found FROM ledger.refunds r "
     "LEFT JOIN ledger.transfers t ON t.transfer_id = r.transfer_id "
     "WHERE r.created_at >= $1 AND r.created_at < $2 AND ($3 = '' OR r.org_id = $3) "
     "AND r.reversed_micros > 0 AND (t.amount_micros IS DISTINCT FROM r.reversed_micros "
     "OR t.kind <> 'REFUND')"),
    ("USAGE_RESULT_WITHOUT_DEBIT",
     "SELECT u.batch_id || ' ' || u.org_id || coalesce(' ' || u.leg, '') AS subject, "
     "u.micros::text AS expected, coalesce(t.amount_micros::text, 'no USAGE transfer') "
     "AS found FROM (SELECT b.batch_id, b.created_at, x.org_id, NULL AS leg, x.transfer_id, "
     "x.debited AS micros FROM ledger.usage_batch_results b, unnest(b.org_ids, "
     "b.transfer_ids, b.debited_micros) AS x(org_id, transfer_id, debited) "
     "UNION ALL SELECT b.batch_id, b.created_at, x.org_id, 'arrears', x.transfer_id, x.owed "
     "FROM ledger.usage_batch_results b, unnest(b.org_ids, b.arrears_transfer_ids, "
     "b.arrears_micros) AS x(org_id, transfer_id, owed)) u "
     "LEFT JOIN ledger.transfers t ON t.transfer_id = u.transfer_id "
     "WHERE u.created_at >= $1 AND u.created_at < $2 AND ($3 = '' OR u.org_id = $3) "
     "AND u.micros > 0 AND (t.amount_micros IS DISTINCT FROM u.micros OR t.kind <> 'USAGE')"),
    ("USAGE_RECEIPT",
     "SELECT r.base || coalesce(' ' || r.leg, '') AS subject, r.micros::text AS expected, "
     "coalesce(t.amount_micros::text, 'no USAGE transfer') AS found FROM ("
     "SELECT base, NULL AS leg, base AS transfer_id, sum(debited_micros) AS micros, "
     "min(org_id) AS org_id FROM (SELECT *, regexp_replace(transfer_id, ':arrears$', '') "
     "AS base FROM ledger.usage_receipts WHERE transfer_id <> '') x GROUP BY base "
     "UNION ALL SELECT base, 'arrears', base || ':arrears', sum(arrears_micros), min(org_id) "
     "FROM (SELECT *, regexp_replace(transfer_id, ':arrears$', '') AS base "
     "FROM ledger.usage_receipts WHERE transfer_id <> '') y GROUP BY base) r "
     "LEFT JOIN ledger.transfers t ON t.transfer_id = r.transfer_id "
     "WHERE r.micros > 0 AND ($3 = '' OR r.org_id = $3) AND (t.transfer_id IS NULL "
     "OR (t.created_at >= $1 AND t.created_at < $2)) "
     "AND (t.amount_micros IS DISTINCT FROM r.micros OR t.kind <> 'USAGE')"),
)


async def ledger_mismatches(conn: Connection, start: datetime, end: datetime,
                            org_id: str = "") -> list[Mismatch]:
    """Mismatches between refunds and usage receipts and the ledger's entries."""
    found: list[Mismatch] = []
    for kind, query in _LEDGER_CHECKS:
        rows = await conn.fetch(query + " ORDER BY subject", start, end, org_id)
        found += [Mismatch(kind, r["subject"], r["expected"], r["found"]) for r in rows]
    return found


@dataclass(frozen=True, slots=True)
class Money:
    """Money of one currency in a period, minor units."""

    currency: str
    paid_minor: int
    paid_tax_minor: int
    refunded_minor: int
    refunded_tax_minor: int


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """A period reconciled: every mismatch, and the totals of each side."""

    mismatches: list[Mismatch]
    money: list[Money]
    credits_purchased_micros: int
    credits_refunded_micros: int
    usage_debited_micros: int
    usage_arrears_micros: int
    usage_receipts_micros: int
    usage_events_micros: int = 0
    usage_events_checked: bool = False


# ($1, $2) = the period, $3 = the org ('' = all): every org's usage batches and their debits
_ORG_BATCHES: Final = (
    "SELECT x.org_id, b.batch_id, x.debited + x.owed AS micros "
    "FROM ledger.usage_batch_results b, "
    "unnest(b.org_ids, b.debited_micros, b.arrears_micros) AS x(org_id, debited, owed) "
    "WHERE b.created_at >= $1 AND b.created_at < $2 AND ($3 = '' OR x.org_id = $3) "
    "ORDER BY x.org_id, b.created_at, b.batch_id")


async def usage_event_mismatches(conn: Connection, start: datetime, end: datetime,
                                 org_id: str, itemizer: st.UsageItemizer
                                 ) -> tuple[list[Mismatch], int]:
    """Metering's events <-> the ledger's usage debits, per org and batch: for every usage
    batch the ledger posted in [start, end), the debit (credit + arrears) of each org equals
    the sum of the charges of that org's events metering recorded in the batch. Mismatches
    (USAGE_EVENTS, subject "<batch> <org>") and metering's total. UsageUnavailable when
    metering cannot be asked."""
    by_org: dict[str, list[st.BatchCharge]] = {}
    for r in await conn.fetch(_ORG_BATCHES, start, end, org_id):
        by_org.setdefault(r["org_id"], []).append(st.BatchCharge(r["batch_id"],
                                                                 int(r["micros"])))
    found: list[Mismatch] = []
    events_total = 0
    for org, batches in by_org.items():
        usage = await metering_usage(itemizer, org, batches)
        events_total += sum(b.credits_micros for b in usage.batches)
        found += [Mismatch("USAGE_EVENTS", f"{batch} {org}", str(debit),
                           "no events" if charged is None else str(charged))
                  for batch, debit, charged in st.batch_mismatches(batches, usage.batches)]
    return sorted(found, key=lambda m: m.subject), events_total


async def reconcile(conn: Connection, start: datetime, end: datetime, org_id: str = "",
                    itemizer: st.UsageItemizer | None = None) -> Reconciliation:
    """Every mismatch of [start, end) and the totals of money, credits and usage. Without
    an itemizer (or when metering cannot be asked) metering's events are not compared
    (`usage_events_checked` false)."""
    found = await mismatches(conn, start, end, org_id)
    found += await ledger_mismatches(conn, start, end, org_id)
    events_micros, events_checked = 0, False
    try:
        events, events_micros = await usage_event_mismatches(
            conn, start, end, org_id, itemizer or st.NoItemizer())
        found += events
        events_checked = True
    except st.UsageUnavailable:
        pass
    money = await conn.fetch(
        "SELECT currency, sum(gross_minor) FILTER (WHERE kind = 'INVOICE') AS paid, "
        "sum(tax_minor) FILTER (WHERE kind = 'INVOICE') AS paid_tax, "
        "sum(gross_minor) FILTER (WHERE kind = 'CREDIT_NOTE') AS refunded, "
        "sum(tax_minor) FILTER (WHERE kind = 'CREDIT_NOTE') AS refunded_tax "
        "FROM ledger.billing_documents WHERE issued_at >= $1 AND issued_at < $2 "
        "AND ($3 = '' OR org_id = $3) GROUP BY currency ORDER BY currency",
        start, end, org_id)
    credits = await conn.fetchrow(
        "SELECT coalesce(sum(amount_micros) FILTER (WHERE kind = 'PURCHASE'), 0) AS bought, "
        "coalesce(sum(amount_micros) FILTER (WHERE kind = 'REFUND'), 0) AS refunded, "
        "coalesce(sum(amount_micros) FILTER (WHERE kind = 'USAGE' AND debit_account_id LIKE "
        "'org:%' AND credit_account_id NOT LIKE 'arrears:%'), 0) AS debited, "
        "coalesce(sum(amount_micros) FILTER (WHERE kind = 'USAGE' AND debit_account_id LIKE "
        "'arrears:%'), 0) AS owed FROM ledger.transfers "
        "WHERE created_at >= $1 AND created_at < $2 AND ($3 = '' OR org_id = $3)",
        start, end, org_id)
    receipts = await conn.fetchval(
        "SELECT coalesce(sum(x.micros), 0) FROM (SELECT b.created_at, u.org_id, "
        "u.debited + u.owed AS micros FROM ledger.usage_batch_results b, "
        "unnest(b.org_ids, b.debited_micros, b.arrears_micros) AS u(org_id, debited, owed) "
        "UNION ALL SELECT t.created_at, r.org_id, r.debited_micros + r.arrears_micros "
        "FROM ledger.usage_receipts r JOIN ledger.transfers t ON t.transfer_id = "
        "r.transfer_id) x WHERE x.created_at >= $1 AND x.created_at < $2 "
        "AND ($3 = '' OR x.org_id = $3)", start, end, org_id)
    assert credits is not None
    return Reconciliation(
        found, [Money(r["currency"], int(r["paid"] or 0), int(r["paid_tax"] or 0),
                      int(r["refunded"] or 0), int(r["refunded_tax"] or 0)) for r in money],
        int(credits["bought"]), int(credits["refunded"]), int(credits["debited"]),
        int(credits["owed"]), int(receipts), events_micros, events_checked)
