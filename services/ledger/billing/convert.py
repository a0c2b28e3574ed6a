"""Billing protos <-> billing domain (the vocabulary of BillingServicer)."""

from __future__ import annotations

from datetime import datetime

from services.ledger.billing import documents as docs
from services.ledger.billing import domain as b
from services.ledger.billing import tax
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
