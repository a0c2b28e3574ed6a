"""Usage commands of the `tally` CLI: `usage show` (a receipt for people) and `usage export`
(raw events or hourly/daily roll-ups, to CSV)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn

from tally.common.v1 import common_pb2
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.kit.money import format_credits
from tally.kit.protoconv import to_timestamp
from tally.metering.v1 import metering_pb2 as pb
from tally.sdk.client import TallyClient

app = typer.Typer(help="Usage events: receipts and exports.", no_args_is_help=True)

_EXPORT_COLUMNS = ("event_id", "occurred_at", "org_id", "project_id", "environment", "user_id",
                   "model", "resolved_model", "operation", "mode", "meter", "quantity",
                   "rate", "cost_micros", "event_cost_micros", "price_book_version",
                   "ledger_transfer_id")


def _client(config: KitConfig) -> TallyClient:
    return TallyClient({"metering": config.address_of("metering")}, actor="user:cli")


def _meter(number: int) -> str:
    return common_pb2.Meter.Name(common_pb2.Meter.ValueType(number)).removeprefix("METER_").lower()


async def show(config: KitConfig, org: str, event_id: str) -> None:
    """Prints what one event cost, line by line, and where its debit landed."""
    async with _client(config) as tally:
        try:
            found = await tally.metering.GetUsageEvent(
                pb.GetUsageEventRequest(org_id=org, event_id=event_id))
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc
    event, receipt = found.event, found.receipt
    when = event.occurred_at.ToDatetime(tzinfo=UTC).isoformat()
    typer.echo(f"event {event.event_id}  org {event.context.org_id}  at {when}")
    typer.echo(f"model {event.model} (rated as {receipt.resolved_model})  "
               f"price book v{receipt.price_book_version}")
    for line in receipt.lines:
        typer.echo(f"  {_meter(line.meter):<22} {line.quantity:>12} x {line.rate:>10} "
                   f"per {line.per_units:<9} = {format_credits(line.cost_micros):>12}")
    typer.echo(f"  {'total':<22} {'':>12}   {'':>10}     {'':<9}   "
               f"{format_credits(receipt.cost_micros):>12}")
    typer.echo(f"ledger transfer {receipt.ledger_transfer_id}; available after "
               f"{format_credits(receipt.balance_after_micros)}"
               + (f"; arrears {format_credits(receipt.arrears_micros)}"
                  if receipt.arrears_micros else ""))


_SUMMARY_COLUMNS = ("bucket_start", "model", "operation", "meter", "quantity",
                    "credits_micros", "event_count")
_SUMMARY_KINDS = {"hourly": pb.EXPORT_KIND_HOURLY_SUMMARY, "daily": pb.EXPORT_KIND_DAILY_SUMMARY}


async def export(config: KitConfig, org: str, start: datetime | None, end: datetime | None,
                 out: Path, summary: str = "") -> int:
    """Writes the period's raw events (one row per meter) or, with `summary` = hourly|daily,
    its roll-up rows by model and operation to CSV; returns the rows or events written."""
    kind = _SUMMARY_KINDS[summary] if summary else pb.EXPORT_KIND_RAW_EVENTS
    what = f"{summary} rows" if summary else "events"
    written = 0
    token = ""
    with out.open("w", newline="") as handle, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), transient=True) as progress:
        task = progress.add_task("exporting…", total=None)
        writer = csv.writer(handle)
        writer.writerow(_SUMMARY_COLUMNS if summary else _EXPORT_COLUMNS)
        async with _client(config) as tally:
            while True:
                request = pb.ExportUsageRequest(org_id=org, kind=kind,
                                                page_size=1000, page_token=token,
                                                start_time=to_timestamp(start),
                                                end_time=to_timestamp(end))
                token = ""
                async for message in tally.metering.ExportUsage(request):
                    if message.HasField("event"):
                        _write(writer, message.event)
                        written += 1
                    elif message.HasField("summary"):
                        _write_summary(writer, message.summary)
                        written += 1
                    token = message.next_page_token or token
                progress.update(task, description=f"exported {written} {what}")
                if not token:
                    break
    return written


def _write_summary(writer: Any, row: pb.UsageSummaryRow) -> None:
    writer.writerow((row.bucket_start.ToDatetime(tzinfo=UTC).isoformat(), row.key["model"],
                     row.key["operation"].removeprefix("OPERATION_").lower(), _meter(row.meter),
                     row.quantity, row.credits_micros, row.event_count))


def _write(writer: Any, recorded: pb.RecordedUsageEvent) -> None:
    event, receipt = recorded.event, recorded.receipt
    when = event.occurred_at.ToDatetime(tzinfo=UTC).isoformat()
    mode = common_pb2.UsageMode.Name(event.mode).removeprefix("USAGE_MODE_").lower()
    operation = pb.Operation.Name(event.operation).removeprefix("OPERATION_").lower()
    for line in receipt.lines:
        writer.writerow((
            event.event_id, when, event.context.org_id, event.context.project_id,
            event.context.environment, event.context.user_id, event.model,
            receipt.resolved_model, operation, mode, _meter(line.meter), line.quantity,
            line.rate, line.cost_micros, receipt.cost_micros, receipt.price_book_version,
            receipt.ledger_transfer_id))


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally usage show|export` to the CLI (config is read lazily: --help needs none)."""

    @app.command("show")
    def show_command(
        event_id: Annotated[str, typer.Argument(help="The event's id.")],
        org: Annotated[str, typer.Option(help="Organization id.")],
    ) -> None:
        """Print what an event cost, line by line, the price-book version and its ledger entry."""
        import asyncio

        asyncio.run(show(get_config(), org, event_id))

    @app.command("export")
    def export_command(
        org: Annotated[str, typer.Option(help="Organization id.")],
        out: Annotated[Path, typer.Option(help="CSV file to write.")] = Path("usage.csv"),
        start: Annotated[datetime | None, typer.Option(help="From (UTC), e.g. 2026-11-01.")]
        = None,
        end: Annotated[datetime | None, typer.Option(help="Until (UTC, exclusive).")] = None,
        summary: Annotated[str, typer.Option(
            help="hourly or daily: export roll-up rows by model and operation instead of "
                 "raw events.")] = "",
    ) -> None:
        """Write a period's raw usage events (one row per meter) or roll-ups to CSV."""
        import asyncio

        if summary and summary not in _SUMMARY_KINDS:
            raise typer.BadParameter("must be hourly or daily", param_hint="--summary")
        count = asyncio.run(export(get_config(), org,
                                   start.replace(tzinfo=UTC) if start else None,
                                   end.replace(tzinfo=UTC) if end else None, out, summary))
        typer.echo(f"wrote {count} {f'{summary} rows' if summary else 'events'} to {out}")

    parent.add_typer(app, name="usage")
