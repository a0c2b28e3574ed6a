"""Invoices and credit notes, in plain Python: what a document says, and its number.

A document is made once, in the transaction that records what it documents (a payment's
success, a refund), and never changed. Its number comes from a counter per issuer, kind and
year that the same transaction locks and increments: `INV-2026-000123`, `CN-2026-000045`.
Everything a reader needs is copied into the document when it is issued (issuer, customer,
tax), so a later profile change or rate table never changes an issued document.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from services.ledger.billing import domain as b
from services.ledger.billing import tax
from services.ledger.payments import domain as p
from tally.kit.money import format_credits

NUMBER_DIGITS: Final = 6


class DocumentKind(enum.StrEnum):
    """Invoice or credit note (proto BillingDocumentKind)."""

    INVOICE = "INVOICE"
    CREDIT_NOTE = "CREDIT_NOTE"


PREFIX: Final = {DocumentKind.INVOICE: "INV", DocumentKind.CREDIT_NOTE: "CN"}


def document_number(kind: DocumentKind, year: int, number: int) -> str:
    """`INV-2026-000123`: wider numbers keep their digits (never truncated)."""
    return f"{PREFIX[kind]}-{year}-{number:0{NUMBER_DIGITS}d}"


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a document: what was bought (net) or credited."""

    description: str
    credits_micros: int
    net_minor: int


@dataclass(frozen=True, slots=True)
class Party:
    """Issuer or customer as printed on the document."""

    legal_name: str
    address: list[str]
    country: str
    tax_id: str
    email: str = ""


@dataclass(frozen=True, slots=True)
class Document:
    """An issued invoice or credit note (proto BillingDocument)."""

    document_id: str
    kind: DocumentKind
    number: int
    year: int
    org_id: str
    payment_order_id: str
    issued_at: datetime
    currency: str
    issuer: Party
    customer: Party
    lines: list[Line]
    tax: tax.TaxSnapshot
    net_minor: int
    tax_minor: int
    gross_minor: int
    payment_reference: str
    refund_id: str = ""
    invoice_id: str = ""
    notes: list[str] = field(default_factory=list)


def issuer_party(issuer: tax.Issuer) -> Party:
    return Party(issuer.legal_name, [issuer.address] if issuer.address else [],
                 issuer.country, issuer.tax_id)


def customer_party(org_id: str, profile: b.BillingProfile | None) -> Party:
    """The customer block; an org without a profile is named by its id."""
    if profile is None:
        return Party(f"Organization {org_id}", [], "", "")
    a = profile.address
    lines = [x for x in (a.line1, a.line2, " ".join(y for y in (a.postal_code, a.city) if y),
                         a.region) if x]
    return Party(profile.legal_name or f"Organization {org_id}", lines, profile.country,
                 profile.tax_id, profile.invoice_email)


def invoice_lines(order: p.PaymentOrder, net_minor: int) -> list[Line]:
    """The paid line (the package, or a custom amount of credit) at its net price, and the
    bonus credit it came with at no charge."""
    what = (f"Credit package {order.package_id}" if order.package_id
            else "Credits (custom amount)")
    lines = [Line(f"{what}: {format_credits(order.credits_micros)} credits",
                  order.credits_micros, net_minor)]
    if order.bonus_credits_micros:
        lines.append(Line(f"Bonus: {format_credits(order.bonus_credits_micros)} credits "
                          "(no charge)",
                          order.bonus_credits_micros, 0))
    return lines


def payment_reference(order: p.PaymentOrder) -> str:
    """How the money came: the provider's payment, or the manual payment's reference."""
    if order.reference:
        return f"{order.provider} {order.reference}"
    return f"{order.provider} {order.provider_session_id or order.payment_order_id}"


def invoice(document_id: str, number: int, year: int, order: p.PaymentOrder,
            snapshot: tax.TaxSnapshot, issuer: tax.Issuer, profile: b.BillingProfile | None,
            now: datetime) -> Document:
    """The invoice of a paid order, with the tax its order was made with."""
    return Document(
        document_id, DocumentKind.INVOICE, number, year, order.org_id, order.payment_order_id,
        now, order.currency, issuer_party(issuer), customer_party(order.org_id, profile),
        invoice_lines(order, snapshot.net_minor), snapshot, snapshot.net_minor,
        snapshot.tax_minor, snapshot.gross_minor, payment_reference(order),
        notes=[snapshot.legal_text] if snapshot.legal_text else [])


def credit_note(document_id: str, number: int, year: int, invoice_doc: Document,
                order_before: p.PaymentOrder, refund_id: str, refunded_minor: int,
                reversed_micros: int, now: datetime) -> Document:
    """The credit note of a refund of `refunded_minor` (gross), against its invoice. Its tax
    is taken on running totals, so the credit notes of an order add up to its invoice's tax
    exactly when the order is wholly refunded."""
    rate = invoice_doc.tax.rate_ppm
    _, tax_before = tax.split_gross(order_before.refunded_minor, rate)
    _, tax_after = tax.split_gross(order_before.refunded_minor + refunded_minor, rate)
    tax_minor = tax_after - tax_before
    net_minor = refunded_minor - tax_minor
    return Document(
        document_id, DocumentKind.CREDIT_NOTE, number, year, invoice_doc.org_id,
        invoice_doc.payment_order_id, now, invoice_doc.currency, invoice_doc.issuer,
        invoice_doc.customer,
        [Line(f"Refund {refund_id} of invoice {invoice_doc.document_id}: "
              f"{format_credits(reversed_micros)} credits", reversed_micros, net_minor)],
        invoice_doc.tax, net_minor, tax_minor, refunded_minor, invoice_doc.payment_reference,
        refund_id=refund_id, invoice_id=invoice_doc.document_id, notes=list(invoice_doc.notes))
