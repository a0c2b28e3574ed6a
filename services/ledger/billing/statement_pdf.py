"""Renders a monthly statement to PDF (fpdf2), in the invoices' style (billing/pdf.py): the
issuer, the org and period, opening balance, one line per category of movement, closing
balance, the arrears beside it, and the month's usage by meter, model, project and label.
Amounts are credits with six decimals, so every micro-credit of the ledger is on the page.

Pure: a statement in, bytes out.
"""

from __future__ import annotations

from collections.abc import Callable

from fpdf import FPDF

from services.ledger.billing import statements as st
from services.ledger.billing import tax
from services.ledger.billing.pdf import _latin1
from tally.kit.money import format_credits


def file_name(s: st.Statement) -> str:
    """`statement-<org>-<YYYY-MM>.pdf`."""
    return f"statement-{s.org_id}-{st.month_text(s.month)}.pdf"


def _credits(micros: int) -> str:
    return format_credits(micros)


_HEADINGS = {"meter": "Usage by meter", "model": "Usage by model",
             "project": "Usage by project", "label": "Usage by label"}


def _usage_breakdown(s: st.Statement, text: Callable[..., None],
                     row: Callable[..., None]) -> None:
    """Usage by meter, model, project and label (metering's events of the month's usage
    batches); each of the first three adds up to the itemized usage."""
    if s.usage is None:
        text("Usage by meter, model, project and label: not available (metering could not "
             "be asked)", 9, "I")
        return
    row("Usage itemized by metering", s.usage.itemized_micros, "B")
    row("Usage posted without usage events (captures, direct items)",
        s.usage_not_itemized_micros)
    for dimension, heading in _HEADINGS.items():
        rows = [r for r in s.usage.rows if r.dimension == dimension]
        if not rows:
            continue
        text(heading, 10, "B")
        for r in rows:
            shown = r.value or "(none)"
            row(f"  {shown} ({r.event_count} events)", r.credits_micros)
    text("An event counts under every label it carries; the label rows need not add up.",
         8, "I")


def render(s: st.Statement, issuer: tax.Issuer) -> bytes:
    """The statement as an A4 PDF."""
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=20)
    title = f"Statement {st.month_text(s.month)} - {s.org_id}"
    pdf.set_title(_latin1(title))
    pdf.set_author(_latin1(issuer.legal_name))
    pdf.add_page()
    width = pdf.epw
    amount_w = 55

    def text(value: str, size: float = 10, style: str = "", w: float = 0, align: str = "L",
             ln: bool = True) -> None:
        pdf.set_font("Helvetica", style, size)
        pdf.cell(w or width, 6, _latin1(value), align=align,
                 new_x="LMARGIN" if ln else "RIGHT", new_y="NEXT" if ln else "TOP")

    def row(label: str, micros: int, style: str = "", signed: bool = False) -> None:
        text(label, 10, style, width - amount_w, ln=False)
        shown = f"{'+' if signed and micros > 0 else ''}{_credits(micros)}"
        text(shown, 10, style, amount_w, "R")

    text(issuer.legal_name, 14, "B")
    for issuer_line in (issuer.address, f"VAT / tax id: {issuer.tax_id}"):
        if issuer_line:
            text(issuer_line, 9)
    pdf.ln(4)
    text(f"Statement of account {st.month_text(s.month)}", 16, "B")
    text(f"Organization: {s.org_id}", 10)
    end = s.period_end
    text(f"Period: {s.period_start.date().isoformat()} 00:00 UTC to "
         f"{end.date().isoformat()} 00:00 UTC", 10)
    status = "final" if s.is_final else "provisional (the month is not over)"
    text(f"Generated: {s.generated_at.isoformat(timespec='seconds')} ({status})", 10)
    pdf.ln(4)
    text("Credits", 10, "B", width - amount_w, ln=False)
    text("Amount (credits)", 10, "B", amount_w, "R")
    row("Opening balance", s.opening.posted_micros, "B")
    for line in s.movements.lines:
        row(f"{line.description} ({line.entry_count} entries)", line.amount_micros,
            signed=True)
    row("Closing balance", s.closing.posted_micros, "B")
    pdf.ln(4)
    text("Arrears (usage beyond credit, owed)", 10, "B")
    row("Opening arrears", s.opening.arrears_micros)
    row("Usage not covered by credit", s.movements.usage_arrears_micros, signed=True)
    row("Arrears settled", -s.movements.arrears_settled_micros, signed=True)
    row("Closing arrears", s.closing.arrears_micros, "B")
    pdf.ln(4)
    row("Usage of the month (from credit and arrears)", s.movements.usage_total_micros)
    pdf.ln(4)
    _usage_breakdown(s, text, row)
    pdf.set_font("Helvetica", "I", 9)
    pdf.multi_cell(width, 5, _latin1(
        "Opening balance + movements = closing balance, to the micro-credit, from the "
        f"ledger's {s.movements.entry_count} entries of the period. 1 credit = 1,000,000 "
        "micro-credits."))
    return bytes(pdf.output())
