"""Renders an invoice or credit note to PDF (fpdf2): issuer and customer blocks, lines, the tax
line, totals, the payment reference and the legal notes of its tax rule.

Pure: a document in, bytes out. The core fonts are Latin-1, so text outside it is replaced
(names keep their letters where Latin-1 has them: ä, é, ß, ...).
"""

from __future__ import annotations

from fpdf import FPDF

from services.ledger.billing import documents as docs
from tally.kit.money import format_money

TITLE = {docs.DocumentKind.INVOICE: "Invoice", docs.DocumentKind.CREDIT_NOTE: "Credit note"}


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _money(minor: int, currency: str) -> str:
    return format_money(minor, currency)


def _rate(ppm: int) -> str:
    whole, rest = divmod(ppm, 10_000)
    return f"{whole}.{rest:04d}".rstrip("0").rstrip(".") + " %"


def render(doc: docs.Document) -> bytes:
    """The document as a one-page (or longer) A4 PDF."""
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.set_title(_latin1(f"{TITLE[doc.kind]} {doc.document_id}"))
    pdf.set_author(_latin1(doc.issuer.legal_name))
    pdf.add_page()
    width = pdf.epw

    def text(value: str, size: float = 10, style: str = "", w: float = 0, align: str = "L",
             ln: bool = True) -> None:
        pdf.set_font("Helvetica", style, size)
        pdf.cell(w or width, 6, _latin1(value), align=align,
                 new_x="LMARGIN" if ln else "RIGHT", new_y="NEXT" if ln else "TOP")

    text(doc.issuer.legal_name, 14, "B")
    for issuer_line in [*doc.issuer.address, f"VAT / tax id: {doc.issuer.tax_id}"]:
        text(issuer_line, 9)
    pdf.ln(4)
    text(f"{TITLE[doc.kind]} {doc.document_id}", 16, "B")
    text(f"Issued: {doc.issued_at.date().isoformat()}", 10)
    if doc.invoice_id:
        text(f"Corrects invoice: {doc.invoice_id}", 10)
    text(f"Payment order: {doc.payment_order_id}", 10)
    text(f"Payment reference: {doc.payment_reference}", 10)
    pdf.ln(4)
    text("Bill to", 10, "B")
    customer = doc.customer
    for customer_line in [customer.legal_name, *customer.address, customer.country,
                          f"Tax id: {customer.tax_id}" if customer.tax_id else "",
                          customer.email]:
        if customer_line:
            text(customer_line, 10)
    pdf.ln(4)
    amount_w = 45
    text("Description", 10, "B", width - amount_w, ln=False)
    text("Net", 10, "B", amount_w, "R")
    for line in doc.lines:
        text(line.description, 10, "", width - amount_w, ln=False)
        text(_money(line.net_minor, doc.currency), 10, "", amount_w, "R")
    pdf.ln(2)
    t = doc.tax
    for label, value, style in (
            ("Total net", doc.net_minor, ""),
            (f"Tax {_rate(t.rate_ppm)} ({t.rule.value}, {t.jurisdiction})", doc.tax_minor, ""),
            ("Total" if doc.kind is docs.DocumentKind.INVOICE else "Total credited",
             doc.gross_minor, "B")):
        text(label, 10, style, width - amount_w, ln=False)
        text(_money(value, doc.currency), 10, style, amount_w, "R")
    pdf.ln(4)
    for note in doc.notes:
        pdf.set_font("Helvetica", "I", 9)
        pdf.multi_cell(width, 5, _latin1(note))
    return bytes(pdf.output())
