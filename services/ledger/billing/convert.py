"""Billing protos <-> billing domain (the vocabulary of BillingServicer)."""

from __future__ import annotations

from datetime import datetime

from services.ledger.billing import documents as docs
from services.ledger.billing import domain as b
from services.ledger.billing import reconcile, tax
from services.ledger.billing import statements as st
from tally.kit.protoconv import enum_out, from_timestamp, to_timestamp
from tally.ledger.v1 import billing_pb2 as pb


def profile_in(message: pb.BillingProfile) -> b.BillingProfile:
    a = message.address
    return b.normalized(b.BillingProfile(
        message.org_id, message.legal_name,
        b.Address(a.line1, a.line2, a.city, a.postal_code, a.region), message.country,
        message.tax_id, message.invoice_email, message.currency))


def profile_out(profile: b.BillingProfile) -> pb.BillingProfile:
    a = profile.address
    return pb.BillingProfile(
        org_id=profile.org_id, legal_name=profile.legal_name,
        address=pb.BillingAddress(line1=a.line1, line2=a.line2, city=a.city,
                                  postal_code=a.postal_code, region=a.region),
        country=profile.country, tax_id=profile.tax_id, invoice_email=profile.invoice_email,
        currency=profile.currency, updated_at=to_timestamp(profile.updated_at),
        updated_by=profile.updated_by, missing_fields=b.missing_fields(profile))


def settings_in(message: pb.BillingSettings) -> b.BillingSettings:
    return b.BillingSettings(message.org_id, message.profile_required)


def settings_out(settings: b.BillingSettings) -> pb.BillingSettings:
    return pb.BillingSettings(org_id=settings.org_id,
                              profile_required=settings.profile_required,
                              updated_at=to_timestamp(settings.updated_at),
                              updated_by=settings.updated_by)


def tax_out(order_id: str, t: tax.TaxSnapshot) -> pb.TaxSnapshot:
    return pb.TaxSnapshot(
        payment_order_id=order_id, rule=enum_out(pb.TaxRule, "TAX_RULE_", t.rule),
        jurisdiction=t.jurisdiction, rate_ppm=t.rate_ppm,
        rate_table_version=t.rate_table_version, gross_minor=t.gross_minor,
        tax_minor=t.tax_minor, net_minor=t.net_minor, currency=t.currency,
        issuer_country=t.issuer_country, issuer_tax_id=t.issuer_tax_id,
        customer_country=t.customer_country, customer_tax_id=t.customer_tax_id,
        legal_text=t.legal_text)


def table_out(table: tax.TaxRateTable) -> pb.TaxRateTable:
    return pb.TaxRateTable(version=table.version, rates_ppm=table.rates_ppm,
                           effective_from=to_timestamp(table.effective_from))


def effective_from(message: pb.TaxRateTable) -> datetime | None:
    return from_timestamp(message, "effective_from")


def _party(party: docs.Party) -> pb.BillingParty:
    return pb.BillingParty(legal_name=party.legal_name, address=party.address,
                           country=party.country, tax_id=party.tax_id, email=party.email)


def document_out(doc: docs.Document) -> pb.BillingDocument:
    return pb.BillingDocument(
        invoice_id=doc.document_id,
        kind=enum_out(pb.BillingDocumentKind, "BILLING_DOCUMENT_KIND_", doc.kind),
        number=doc.number, year=doc.year, org_id=doc.org_id,
        payment_order_id=doc.payment_order_id, issued_at=to_timestamp(doc.issued_at),
        currency=doc.currency, issuer=_party(doc.issuer), customer=_party(doc.customer),
        lines=[pb.BillingDocumentLine(description=x.description,
                                      credits_micros=x.credits_micros, net_minor=x.net_minor)
               for x in doc.lines],
        tax=tax_out(doc.payment_order_id, doc.tax), net_minor=doc.net_minor,
        tax_minor=doc.tax_minor, gross_minor=doc.gross_minor,
        payment_reference=doc.payment_reference, refund_id=doc.refund_id,
        corrects_invoice_id=doc.invoice_id, notes=doc.notes)


def statement_out(s: st.Statement) -> pb.Statement:
    m = s.movements
    return pb.Statement(
        org_id=s.org_id, month=st.month_text(s.month),
        period_start=to_timestamp(s.period_start), period_end=to_timestamp(s.period_end),
        is_final=s.is_final, generated_at=to_timestamp(s.generated_at),
        opening_balance_micros=s.opening.posted_micros,
        lines=[pb.StatementLine(category=x.category.value, description=x.description,
                                amount_micros=x.amount_micros, entry_count=x.entry_count)
               for x in m.lines],
        closing_balance_micros=s.closing.posted_micros,
        opening_arrears_micros=s.opening.arrears_micros,
        usage_arrears_micros=m.usage_arrears_micros,
        arrears_settled_micros=m.arrears_settled_micros,
        closing_arrears_micros=s.closing.arrears_micros,
        usage_total_micros=m.usage_total_micros, entry_count=m.entry_count,
        usage_breakdown=[pb.StatementUsageRow(dimension=r.dimension, value=r.value,
                                              credits_micros=r.credits_micros,
                                              event_count=r.event_count)
                         for r in (s.usage.rows if s.usage else [])],
        usage_itemized_micros=s.usage.itemized_micros if s.usage else 0,
        usage_breakdown_available=s.usage is not None)


def snapshot_out(s: st.DailySnapshot) -> pb.DailySnapshot:
    return pb.DailySnapshot(
        org_id=s.org_id, day=s.day.isoformat(), posted_micros=s.posted_micros,
        held_micros=s.held_micros, available_micros=s.available_micros,
        arrears_micros=s.arrears_micros, billing_state=s.billing_state,
        credits_bought_micros=s.credits_bought_micros, usage_micros=s.usage_micros,
        net_change_micros=s.net_change_micros,
        grants_by_expiry_micros=s.grants_by_expiry_micros,
        written_at=to_timestamp(s.written_at))


def reconciliation_out(month: str, r: reconcile.Reconciliation) -> pb.ReconcileResponse:
    return pb.ReconcileResponse(
        month=month,
        mismatches=[pb.ReconciliationMismatch(kind=x.kind, subject=x.subject,
                                              expected=x.expected, found=x.found)
                    for x in r.mismatches],
        money=[pb.ReconciliationMoney(currency=x.currency, paid_minor=x.paid_minor,
                                      paid_tax_minor=x.paid_tax_minor,
                                      refunded_minor=x.refunded_minor,
                                      refunded_tax_minor=x.refunded_tax_minor)
               for x in r.money],
        credits_purchased_micros=r.credits_purchased_micros,
        credits_refunded_micros=r.credits_refunded_micros,
        usage_debited_micros=r.usage_debited_micros,
        usage_arrears_micros=r.usage_arrears_micros,
        usage_receipts_micros=r.usage_receipts_micros,
        usage_events_micros=r.usage_events_micros,
        usage_events_checked=r.usage_events_checked)
