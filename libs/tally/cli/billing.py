"""Billing commands of the `tally` CLI: `tally profile show|set|delete|require` and
`tally invoices list|get|pdf`.

A profile may be set in parts (a draft): `show` lists what a purchase still needs. When an
org requires a profile (`tally profile require ORG`), Purchase is refused until it is complete.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from tally.cli import calls
from tally.cli.payments import Actor, OrgArgument, RequestId
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.kit.money import format_money
from tally.ledger.v1 import billing_pb2 as pb
from tally.sdk.client import TallyClient

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from tally.ledger.v1.billing_pb2_grpc import BillingServiceAsyncStub as BillingStub

T = TypeVar("T")

InvoiceArgument = Annotated[str, typer.Argument(help="Invoice or credit note number.")]
invoices_app = typer.Typer(help="Invoices and credit notes: list, show, download as PDF.",
                           no_args_is_help=True)
profile_app = typer.Typer(help="Billing profiles: who an org is on its invoices.",
                          no_args_is_help=True)


async def _call(config: KitConfig, rpc: Callable[[BillingStub], Awaitable[T]],
                actor: str = calls.DEFAULT_ACTOR) -> T:
    """BillingService is served by the ledger: one client, refusals printed, exit 1."""
    async with TallyClient({"ledger": config.address_of("ledger")}, actor=actor) as tally:
        try:
            return await rpc(tally.billing)
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc


def show_profile(profile: pb.BillingProfile, settings: pb.BillingSettings | None = None
                 ) -> None:
    a = profile.address
    rows: list[tuple[str, Any]] = [
        ("org", profile.org_id), ("legal name", profile.legal_name),
        ("address", ", ".join(x for x in (a.line1, a.line2, a.postal_code, a.city, a.region)
                              if x)),
        ("country", profile.country), ("tax id", profile.tax_id or "-"),
        ("invoice e-mail", profile.invoice_email), ("currency", profile.currency),
        ("missing", ", ".join(profile.missing_fields) or "nothing (complete)"),
        ("updated by", profile.updated_by)]
    if settings is not None:
        rows.append(("required", "yes" if settings.profile_required else "no"))
    for label, value in rows:
        typer.echo(f"  {label:<15} {value}")


async def get_profile(config: KitConfig, org: str) -> pb.BillingProfile:
    """Prints an org's profile and whether its purchases require it."""
    async def both(billing: BillingStub) -> tuple[pb.BillingProfile, pb.BillingSettings]:
        settings = await billing.GetBillingSettings(pb.GetBillingSettingsRequest(org_id=org))
        profile = await billing.GetBillingProfile(pb.GetBillingProfileRequest(org_id=org))
        return profile.profile, settings.settings
    profile, settings = await _call(config, both)
    show_profile(profile, settings)
    return profile


async def set_profile(config: KitConfig, profile: pb.BillingProfile, request_id: str = "",
                      actor: str = calls.DEFAULT_ACTOR) -> pb.BillingProfile:
    """Replaces an org's profile and prints what is stored."""
    reply = await _call(config, lambda billing: billing.SetBillingProfile(
        pb.SetBillingProfileRequest(request_id=calls.request_id(request_id),
                                    context=calls.context(profile.org_id), profile=profile)),
        actor)
    show_profile(reply.profile)
    return reply.profile


def show_document(doc: pb.BillingDocument) -> None:
    kind = "invoice" if doc.kind == pb.BILLING_DOCUMENT_KIND_INVOICE else "credit note"
    rows: list[tuple[str, Any]] = [
        ("number", doc.invoice_id), ("kind", kind),
        ("issued", doc.issued_at.ToDatetime().date().isoformat()),
        ("order", doc.payment_order_id), ("customer", doc.customer.legal_name)]
    if doc.corrects_invoice_id:
        rows.append(("corrects", doc.corrects_invoice_id))
    rows += [("net", format_money(doc.net_minor, doc.currency)),
             ("tax", f"{format_money(doc.tax_minor, doc.currency)} "
                     f"({pb.TaxRule.Name(doc.tax.rule).removeprefix('TAX_RULE_')}, "
                     f"{doc.tax.jurisdiction})"),
             ("total", format_money(doc.gross_minor, doc.currency)),
             ("reference", doc.payment_reference)]
    for label, value in rows:
        typer.echo(f"  {label:<10} {value}")


async def list_invoices(config: KitConfig, org: str) -> list[pb.BillingDocument]:
    """Prints an org's invoices and credit notes, newest first, one a line."""
    async def every_page(billing: BillingStub) -> list[pb.BillingDocument]:
        pages: list[pb.BillingDocument] = []
        token = ""
        while True:
            reply = await billing.ListInvoices(pb.ListInvoicesRequest(org_id=org,
                                                                      page_token=token))
            pages += reply.invoices
            token = reply.next_page_token
            if not token:
                return pages
    found = await _call(config, every_page)
    for doc in found:
        typer.echo(f"{doc.invoice_id:<18} {doc.issued_at.ToDatetime().date().isoformat()}  "
                   f"{doc.payment_order_id:<24} {format_money(doc.gross_minor, doc.currency):>16}")
    if not found:
        typer.echo(f"  no invoices for {org}")
    return found


async def fetch_pdf(config: KitConfig, org: str, invoice_id: str) -> tuple[str, bytes]:
    """A document's PDF (streamed in chunks) and its file name."""
    async def fetch(billing: BillingStub) -> tuple[str, bytes]:
        name, data = "", bytearray()
        async for part in billing.DownloadInvoicePdf(pb.DownloadInvoicePdfRequest(
                org_id=org, invoice_id=invoice_id)):
            name = name or part.file_name
            data += part.chunk
        return name, bytes(data)
    return await _call(config, fetch)


def download_pdf(config: KitConfig, org: str, invoice_id: str, out: str) -> Path:
    """Writes a document's PDF and prints its path."""
    import asyncio

    name, data = asyncio.run(fetch_pdf(config, org, invoice_id))
    path = Path(out or name or f"{invoice_id}.pdf")
    path.write_bytes(data)
    typer.echo(str(path.resolve()))
    return path


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally profile` to the CLI (config is read lazily)."""
    import asyncio

    @profile_app.command("show")
    def show_command(org: OrgArgument) -> None:
        """Print an org's billing profile and what a purchase still needs."""
        asyncio.run(get_profile(get_config(), org))

    @profile_app.command("set")
    def set_command(
        org: OrgArgument,
        legal_name: Annotated[str, typer.Option(help="Registered legal name.")] = "",
        line1: Annotated[str, typer.Option(help="Street and number.")] = "",
        line2: Annotated[str, typer.Option(help="Building, suite.")] = "",
        city: Annotated[str, typer.Option()] = "",
        postal_code: Annotated[str, typer.Option()] = "",
        region: Annotated[str, typer.Option(help="State, province or region.")] = "",
        country: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2, e.g. DE.")] = "",
        tax_id: Annotated[str, typer.Option(
            help="Tax id in the country's format (EU VAT with prefix, GB VAT, US EIN, "
                 "CHE-..., NO org number, AU ABN).")] = "",
        email: Annotated[str, typer.Option(help="Where invoices are sent.")] = "",
        currency: Annotated[str, typer.Option(help="ISO 4217, e.g. EUR.")] = "",
        request_id: RequestId = "",
        actor: Actor = calls.DEFAULT_ACTOR,
    ) -> None:
        """Replace an org's billing profile (the whole profile; empty fields stay empty)."""
        profile = pb.BillingProfile(
            org_id=org, legal_name=legal_name,
            address=pb.BillingAddress(line1=line1, line2=line2, city=city,
                                      postal_code=postal_code, region=region),
            country=country, tax_id=tax_id, invoice_email=email, currency=currency)
        asyncio.run(set_profile(get_config(), profile, request_id, actor))

    @profile_app.command("delete")
    def delete_command(org: OrgArgument, request_id: RequestId = "",
                       actor: Actor = calls.DEFAULT_ACTOR) -> None:
        """Remove an org's billing profile (issued documents keep their copy)."""
        asyncio.run(_call(get_config(), lambda billing: billing.DeleteBillingProfile(
            pb.DeleteBillingProfileRequest(request_id=calls.request_id(request_id),
                                           context=calls.context(org), org_id=org)), actor))
        typer.echo(f"  deleted the billing profile of {org}")

    @profile_app.command("require")
    def require_command(
        org: OrgArgument,
        off: Annotated[bool, typer.Option("--off", help="Let purchases go without one.")]
        = False,
        request_id: RequestId = "", actor: Actor = calls.DEFAULT_ACTOR,
    ) -> None:
        """Refuse an org's purchases until its billing profile is complete (or, with --off,
        no longer)."""
        reply = asyncio.run(_call(get_config(), lambda billing: billing.SetBillingSettings(
            pb.SetBillingSettingsRequest(
                request_id=calls.request_id(request_id), context=calls.context(org),
                settings=pb.BillingSettings(org_id=org, profile_required=not off))), actor))
        typer.echo(f"  profile required  {'yes' if reply.settings.profile_required else 'no'}")

    @invoices_app.command("list")
    def invoices_list(org: OrgArgument) -> None:
        """List an org's invoices and credit notes, newest first."""
        asyncio.run(list_invoices(get_config(), org))

    @invoices_app.command("get")
    def invoices_get(org: OrgArgument, invoice_id: InvoiceArgument) -> None:
        """Print one invoice or credit note: totals, tax rule, reference."""
        reply = asyncio.run(_call(get_config(), lambda billing: billing.GetInvoice(
            pb.GetInvoiceRequest(org_id=org, invoice_id=invoice_id))))
        show_document(reply.invoice)

    @invoices_app.command("pdf")
    def invoices_pdf(org: OrgArgument, invoice_id: InvoiceArgument,
                     out: Annotated[str, typer.Option(
                         help="Where to write it (default: ./<number>.pdf).")] = "") -> None:
        """Download an invoice or credit note as PDF and print where it was written."""
        download_pdf(get_config(), org, invoice_id, out)

    parent.add_typer(profile_app, name="profile")
    parent.add_typer(invoices_app, name="invoices")
