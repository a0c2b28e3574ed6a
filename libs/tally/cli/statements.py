"""Statement commands of the `tally` CLI: `tally statements list|get|pdf`, `tally snapshots
export`, `tally reconcile`.

CSV output opens in a spreadsheet: RFC 4180 quoting (the csv module's), UTF-8, a header row,
ISO 8601 dates, and every amount twice: as credits with six decimals and as micro-credits.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console

from tally.cli import billing as billing_cli
from tally.cli import progress
from tally.cli.payments import OrgArgument
from tally.common.v1 import common_pb2
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.kit.money import MICROS_PER_CREDIT, format_money
from tally.ledger.v1 import billing_pb2 as pb
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from tally.ledger.v1.billing_pb2_grpc import BillingServiceAsyncStub as BillingStub

MonthArgument = Annotated[str, typer.Argument(help="Month as YYYY-MM (UTC).")]
statements_app = typer.Typer(help="Monthly statements: what was bought, spent and left.",
                             no_args_is_help=True)
snapshots_app = typer.Typer(help="Daily balance snapshots.", no_args_is_help=True)


def credits6(micros: int) -> str:
    """Micro-credits as credits with exactly six decimals: -1_500_000 -> "-1.500000"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def _amount(micros: int) -> list[str]:
    return [credits6(micros), str(micros)]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """RFC 4180 CSV (CRLF line ends, quoting where needed) with a header row (none when
    `header` is empty: rows appended to another table)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def statement_csv(s: pb.Statement) -> str:
    """A statement as CSV: one row per line between the opening and closing balances."""
    rows: list[list[Any]] = [[s.month, "OPENING_BALANCE", "Opening balance",
                              *_amount(s.opening_balance_micros), ""]]
    rows += [[s.month, x.category, x.description, *_amount(x.amount_micros), x.entry_count]
             for x in s.lines]
    rows += [[s.month, "CLOSING_BALANCE", "Closing balance",
              *_amount(s.closing_balance_micros), s.entry_count],
             [s.month, "OPENING_ARREARS", "Owed at the start",
              *_amount(s.opening_arrears_micros), ""],
             [s.month, "USAGE_ARREARS", "Usage not covered by credit",
              *_amount(s.usage_arrears_micros), ""],
             [s.month, "ARREARS_SETTLED", "Arrears paid from new credit",
              *_amount(-s.arrears_settled_micros), ""],
             [s.month, "CLOSING_ARREARS", "Owed at the end",
              *_amount(s.closing_arrears_micros), ""],
             [s.month, "USAGE_TOTAL", "Usage of the month", *_amount(s.usage_total_micros),
              ""]]
    rows += breakdown_rows(s)
    return csv_text(["month", "line", "description", "credits", "micros", "entries"], rows)


def breakdown_rows(s: pb.Statement) -> list[list[Any]]:
    """The statement's usage by meter, model, project and label as CSV rows
    (USAGE_BY_METER ...; entries = events), after the itemized total; none when metering
    could not itemize it."""
    if not s.usage_breakdown_available:
        return []
    rows: list[list[Any]] = [[s.month, "USAGE_ITEMIZED", "Usage itemized by metering",
                              *_amount(s.usage_itemized_micros), ""]]
    rows += [[s.month, f"USAGE_BY_{r.dimension.upper()}", r.value or "(none)",
              *_amount(r.credits_micros), r.event_count] for r in s.usage_breakdown]
    return rows


def snapshots_csv(snapshots: Sequence[pb.DailySnapshot]) -> str:
    header = ["day", "org_id", "posted_credits", "posted_micros", "held_credits",
              "held_micros", "available_credits", "available_micros", "arrears_credits",
              "arrears_micros", "billing_state", "credits_bought_credits",
              "credits_bought_micros", "usage_credits", "usage_micros", "net_change_credits",
              "net_change_micros", "written_at"]
    return csv_text(header, ([
        x.day, x.org_id, *_amount(x.posted_micros), *_amount(x.held_micros),
        *_amount(x.available_micros), *_amount(x.arrears_micros), x.billing_state,
        *_amount(x.credits_bought_micros), *_amount(x.usage_micros),
        *_amount(x.net_change_micros),
        x.written_at.ToDatetime().isoformat(timespec="seconds") + "Z"] for x in snapshots))


def _mismatch_rows(r: pb.ReconcileResponse) -> list[list[str]]:
    return [[r.month, x.kind, x.subject, x.expected, x.found] for x in r.mismatches]


def reconciliation_csv(r: pb.ReconcileResponse) -> str:
    """Every mismatch with both sides (only the header when everything agrees)."""
    return csv_text(["month", "kind", "subject", "expected", "found"], _mismatch_rows(r))


def usage_rows(month: str, summary: mpb.GetUsageSummaryResponse) -> list[list[Any]]:
    """Metering's usage of the month by model and meter, as statement CSV rows."""
    return [[month, "USAGE_BY_MODEL_METER",
             f"{row.key.get('model', '') or '-'} / "
             f"{common_pb2.Meter.Name(row.meter).removeprefix('METER_').lower()} "
             f"({row.quantity} units)", *_amount(row.credits_micros), row.event_count]
            for row in summary.rows]


async def usage_summary(config: KitConfig, org: str, month: str
                        ) -> mpb.GetUsageSummaryResponse:
    """Metering's roll-up of an org's month by model and meter (metering owns meters and
    models; the ledger debits usage per org per batch)."""
    year, _, number = month.partition("-")
    async with TallyClient({"metering": config.address_of("metering")}) as tally:
        return await tally.metering.GetUsageSummary(mpb.GetUsageSummaryRequest(
            org_id=org, year=int(year), month=int(number),
            group_by=[mpb.USAGE_GROUP_BY_MODEL, mpb.USAGE_GROUP_BY_METER]))


SNAPSHOT_WINDOW_DAYS = 31
"""Days of snapshots one ListDailySnapshots call of an export asks for."""


def day_windows(first: date, last: date, days: int = SNAPSHOT_WINDOW_DAYS
                ) -> list[tuple[date, date]]:
    """[first, last] cut into consecutive windows of at most `days` days."""
    windows = []
    while first <= last:
        end = min(last, first + timedelta(days=days - 1))
        windows.append((first, end))
        first = end + timedelta(days=1)
    return windows


def months_between(first: str, last: str) -> list[str]:
    """The months first..last (YYYY-MM), in order; typer.BadParameter when malformed."""
    try:
        start, end = (date.fromisoformat(f"{m}-01") for m in (first, last or first))
    except ValueError:
        raise typer.BadParameter(f"months are YYYY-MM: {first!r}, {last!r}") from None
    found = []
    while start <= end:
        found.append(start.strftime("%Y-%m"))
        start = (start + timedelta(days=32)).replace(day=1)
    return found


async def snapshots_between(config: KitConfig, org: str, first: date, last: date,
                            console: Console | None = None) -> list[pb.DailySnapshot]:
    """An org's snapshots of [first, last], one window of days per call, with a progress
    bar of the windows on standard error."""
    found: list[pb.DailySnapshot] = []
    windows = day_windows(first, last)
    async with TallyClient({"ledger": config.address_of("ledger")}) as tally:
        with progress.steps("snapshots", len(windows), console) as advance:
            for start, end in windows:
                reply = await tally.billing.ListDailySnapshots(pb.ListDailySnapshotsRequest(
                    org_id=org, from_day=start.isoformat(), to_day=end.isoformat()))
                found += reply.snapshots
                advance(f"to {end.isoformat()}")
    return found


async def reconcile_months(config: KitConfig, org: str, months: Sequence[str],
                           console: Console | None = None) -> list[pb.ReconcileResponse]:
    """Each month reconciled, one Reconcile call per month, with a progress bar of the
    months on standard error."""
    found = []
    async with TallyClient({"ledger": config.address_of("ledger")}) as tally:
        with progress.steps("reconciling", len(months), console) as advance:
            for month in months:
                found.append(await tally.billing.Reconcile(pb.ReconcileRequest(
                    org_id=org, month=month)))
                advance(month)
    return found


def _write(text: str, out: str) -> None:
    if out:
        Path(out).write_text(text, encoding="utf-8", newline="")
        typer.echo(str(Path(out).resolve()))
    else:
        sys.stdout.write(text)


def show_statement(s: pb.Statement) -> None:
    state = "final" if s.is_final else "provisional"
    typer.echo(f"  statement {s.org_id} {s.month} ({state}, {s.entry_count} entries)")
    typer.echo(f"  {'opening balance':<34} {credits6(s.opening_balance_micros):>20}")
    for x in s.lines:
        typer.echo(f"  {x.description:<34} {credits6(x.amount_micros):>20}")
    typer.echo(f"  {'closing balance':<34} {credits6(s.closing_balance_micros):>20}")
    typer.echo(f"  {'arrears: opening -> closing':<34} "
               f"{credits6(s.opening_arrears_micros)} -> {credits6(s.closing_arrears_micros)}")
    typer.echo(f"  {'usage of the month':<34} {credits6(s.usage_total_micros):>20}")
    if not s.usage_breakdown_available:
        typer.echo("  usage by meter, model, project, label: not available (metering)")
    for row in breakdown_rows(s):
        typer.echo(f"  {row[1].removeprefix('USAGE_').lower():<10} {row[2]:<23} "
                   f"{row[3]:>20}" + (f"  ({row[5]} events)" if row[5] != "" else ""))


async def fetch_statement_pdf(config: KitConfig, org: str, month: str) -> tuple[str, bytes]:
    """A statement's PDF (streamed in chunks) and its file name."""
    async def fetch(billing: BillingStub) -> tuple[str, bytes]:
        name, data = "", bytearray()
        async for part in billing.DownloadStatementPdf(pb.DownloadStatementPdfRequest(
                org_id=org, month=month)):
            name = name or part.file_name
            data += part.chunk
        return name, bytes(data)
    return await billing_cli._call(config, fetch)


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally statements`, `tally snapshots` and `tally reconcile`."""
    import asyncio

    @statements_app.command("list")
    def statements_list(org: OrgArgument) -> None:
        """An org's statements, newest month first: opening, closing, usage."""
        reply = asyncio.run(billing_cli._call(get_config(), lambda billing: billing
                                              .ListStatements(pb.ListStatementsRequest(
                                                  org_id=org, page_size=24))))
        for s in reply.statements:
            typer.echo(f"{s.month}  {'final' if s.is_final else 'open '}  opening "
                       f"{credits6(s.opening_balance_micros):>18}  closing "
                       f"{credits6(s.closing_balance_micros):>18}  usage "
                       f"{credits6(s.usage_total_micros):>18}")
        if not reply.statements:
            typer.echo(f"  no entries for {org}")

    @statements_app.command("get")
    def statements_get(
        org: OrgArgument, month: MonthArgument,
        as_csv: Annotated[bool, typer.Option("--csv", help="Print it as CSV.")] = False,
        out: Annotated[str, typer.Option(help="Write the CSV to this file.")] = "",
        usage: Annotated[bool, typer.Option(
            "--usage", help="Add metering's usage of the month by model and meter.")] = False,
    ) -> None:
        """One month's statement: opening balance, movements by category, closing balance."""
        reply = asyncio.run(billing_cli._call(get_config(), lambda billing: billing
                                              .GetStatement(pb.GetStatementRequest(
                                                  org_id=org, month=month))))
        extra = (usage_rows(month, asyncio.run(usage_summary(get_config(), org, month)))
                 if usage else [])
        if as_csv or out:
            text = statement_csv(reply.statement)
            _write(text + csv_text([], extra), out)
            return
        show_statement(reply.statement)
        for row in extra:
            typer.echo(f"  {row[2]:<34} {row[3]:>20}  ({row[5]} events)")

    @statements_app.command("pdf")
    def statements_pdf(org: OrgArgument, month: MonthArgument,
                       out: Annotated[str, typer.Option(
                           help="Where to write it (default: ./statement-ORG-MONTH.pdf)."
                       )] = "") -> None:
        """Download a month's statement as PDF and print where it was written."""
        name, data = asyncio.run(fetch_statement_pdf(get_config(), org, month))
        path = Path(out or name)
        path.write_bytes(data)
        typer.echo(str(path.resolve()))

    @snapshots_app.command("export")
    def snapshots_export(
        org: Annotated[str, typer.Option("--org", help="Org id.")],
        first: Annotated[str, typer.Option("--from", help="First day, YYYY-MM-DD.")],
        last: Annotated[str, typer.Option("--to", help="Last day, YYYY-MM-DD.")],
        out: Annotated[str, typer.Option(help="CSV file to write (default: stdout).")] = "",
    ) -> None:
        """An org's daily snapshots of a range of days as CSV (any number of days, read a
        month at a time, with a progress bar on standard error)."""
        try:
            start, end = date.fromisoformat(first), date.fromisoformat(last)
        except ValueError:
            raise typer.BadParameter(f"days are YYYY-MM-DD: {first!r}, {last!r}") from None
        if end < start:
            raise typer.BadParameter("--to is before --from")
        try:
            found = asyncio.run(snapshots_between(get_config(), org, start, end))
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc
        _write(snapshots_csv(found), out)

    @parent.command("reconcile")
    def reconcile_command(
        month: Annotated[str, typer.Option("--month", help="Month as YYYY-MM (UTC).")],
        org: Annotated[str, typer.Option("--org", help="One org (default: every org).")] = "",
        to_month: Annotated[str, typer.Option(
            "--to", help="Last month of a range starting at --month (one call per month, "
            "with a progress bar).")] = "",
        as_json: Annotated[bool, typer.Option("--json", help="JSON instead of CSV.")] = False,
        out: Annotated[str, typer.Option(help="File to write (default: stdout).")] = "",
    ) -> None:
        """Reconcile a month (or a range of months): money <-> invoices <-> ledger credits,
        usage receipts and metering's usage events <-> usage debits. Prints every mismatch
        (CSV or JSON, with the totals); exit 1 if any."""
        months = months_between(month, to_month)
        try:
            replies = asyncio.run(reconcile_months(get_config(), org, months))
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc
        if as_json:
            found = [MessageToDict(r, always_print_fields_with_no_presence=True)
                     for r in replies]
            _write(json.dumps(found[0] if len(found) == 1 else found, indent=2) + "\n", out)
        else:
            _write(reconciliation_csv(replies[0]) + "".join(
                csv_text([], _mismatch_rows(r)) for r in replies[1:]), out)
        for reply in replies:
            _print_totals(reply)
        if any(r.mismatches for r in replies):
            raise typer.Exit(1)

    def _print_totals(reply: pb.ReconcileResponse) -> None:
        for money in reply.money:
            typer.echo(f"  paid {format_money(money.paid_minor, money.currency)} (tax "
                       f"{format_money(money.paid_tax_minor, money.currency)}), refunded "
                       f"{format_money(money.refunded_minor, money.currency)}", err=True)
        typer.echo(f"  credits bought {credits6(reply.credits_purchased_micros)}, refunded "
                   f"{credits6(reply.credits_refunded_micros)}; usage debited "
                   f"{credits6(reply.usage_debited_micros)} + arrears "
                   f"{credits6(reply.usage_arrears_micros)} = receipts "
                   f"{credits6(reply.usage_receipts_micros)}; metering's events "
                   + (credits6(reply.usage_events_micros) if reply.usage_events_checked
                      else "not compared (metering not reached)")
                   + f"; {reply.month}: {len(reply.mismatches)} mismatches", err=True)

    parent.add_typer(statements_app, name="statements")
    parent.add_typer(snapshots_app, name="snapshots")
