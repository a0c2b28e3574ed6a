"""Pricing commands of the `tally` CLI: `quote` (what usage would cost, line by line, under the
price book in force)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Final

import typer

from tally.common.v1 import common_pb2
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.kit.money import format_credits
from tally.kit.protoconv import to_timestamp
from tally.pricing.v1 import pricing_pb2 as pb
from tally.rating import Meter, UsageMode
from tally.sdk.client import TallyClient
from tally.sdk.pricebook import (
    meter_from_proto,
    meter_to_proto,
    mode_to_proto,
    tier_mode_from_proto,
)

MAX_QUANTITIES: Final = 20
"""QuoteRequest.quantities holds at most 20 entries (one per meter)."""


def _client(config: KitConfig) -> TallyClient:
    return TallyClient({"pricing": config.address_of("pricing")}, actor="user:cli")


def _meter_name(number: int) -> str:
    try:
        return str(meter_from_proto(number))
    except ValueError:
        return f"meter {number}"


def _tier_mode_name(number: int) -> str:
    try:
        return str(tier_mode_from_proto(number))
    except ValueError:
        return "-"


async def quote(config: KitConfig, model: str, quantities: Mapping[Meter, int], *,
                mode: UsageMode = UsageMode.ONLINE, region: str = "", org: str = "",
                at: datetime | None = None, is_estimate: bool = False) -> pb.QuoteResponse:
    """Prices `quantities` of `model` with the book in force at `at` (default now), prints the
    total, one line per priced segment and the price-book version, and returns the response.

    A refusal (unknown model or meter, no price for a meter) prints its reason and exits 1.
    """
    request = pb.QuoteRequest(
        context=common_pb2.RequestContext(org_id=org), model=model, mode=mode_to_proto(mode),
        region=region, at=to_timestamp(at), is_estimate=is_estimate,
        quantities=[common_pb2.MeterQuantity(meter=meter_to_proto(m), quantity=q)
                    for m, q in quantities.items()])
    async with _client(config) as tally:
        try:
            reply: pb.QuoteResponse = await tally.pricing.Quote(request)
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc
    kind = "estimate" if reply.is_estimate else "quote"
    priced_as = reply.resolved_model or "usage without a model"
    typer.echo(f"{kind} for {priced_as}"
               + (f" ({reply.provider})" if reply.provider else "")
               + f", {mode.value}" + (f", region {region}" if region else "")
               + f": price book v{reply.price_book_version}")
    for line in reply.lines:
        notes = [f"tier {line.tier_index} {_tier_mode_name(line.tier_mode)}"]
        if line.included_applied:
            notes.append(f"{line.included_applied} included")
        if line.overage_quantity:
            notes.append(f"{line.overage_quantity} overage")
        if line.region_multiplier not in ("", "1"):
            notes.append(f"x{line.region_multiplier} region")
        typer.echo(f"  {_meter_name(line.meter):<22} {line.quantity:>12} x {line.rate:>10} "
                   f"per {line.per_units:<9} = {format_credits(line.cost_micros):>14}  "
                   f"({', '.join(notes)})")
    typer.echo(f"  {'total':<22} {'':>12}   {'':>10}     {'':<9}   "
               f"{format_credits(reply.total_micros):>14}  credits "
               f"({reply.total_micros} micro-credits)")
    return reply


def _parse_meters(specs: list[str]) -> dict[Meter, int]:
    found: dict[Meter, int] = {}
    for spec in specs:
        name, _, amount = spec.partition("=")
        try:
            meter = Meter(name.strip().lower())
            found[meter] = int(amount)
        except ValueError as exc:
            known = ", ".join(m.value for m in Meter)
            raise typer.BadParameter(f"{spec!r}: expected METER=N with METER one of {known}",
                                     param_hint="--meter") from exc
    return found


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally quote` to the CLI (config is read lazily: --help needs none)."""

    @parent.command("quote")
    def quote_command(
        model: Annotated[str, typer.Argument(
            help="Public model name or alias; \"\" for model-independent meters.")] = "",
        input_tokens: Annotated[int, typer.Option("--input", help="Input tokens.")] = 0,
        output_tokens: Annotated[int, typer.Option("--output", help="Output tokens.")] = 0,
        cached: Annotated[int, typer.Option(help="Cached input tokens.")] = 0,
        reasoning: Annotated[int, typer.Option(help="Reasoning tokens.")] = 0,
        meter: Annotated[list[str] | None, typer.Option(
            help="Any other meter as METER=N, e.g. storage_gb_hours=40 (repeatable).")] = None,
        mode: Annotated[UsageMode, typer.Option(help="online or batch.")] = UsageMode.ONLINE,
        region: Annotated[str, typer.Option(help="Region, for its price multiplier.")] = "",
        org: Annotated[str, typer.Option(help="Organization asking (for the audit trail).")]
        = "",
        at: Annotated[datetime | None, typer.Option(
            help="Price with the book in force at this instant (UTC); default now.")] = None,
        estimate: Annotated[bool, typer.Option(
            help="Label the quantities a pre-request estimate.")] = False,
    ) -> None:
        """Price usage of a model: the total, one line per meter (quantity, rate, tier, cost)
        and the price-book version."""
        import asyncio

        quantities = {m: q for m, q in ((Meter.INPUT_TOKENS, input_tokens),
                                        (Meter.OUTPUT_TOKENS, output_tokens),
                                        (Meter.CACHED_INPUT_TOKENS, cached),
                                        (Meter.REASONING_TOKENS, reasoning)) if q}
        quantities.update(_parse_meters(meter or []))
        if not quantities:
            raise typer.BadParameter("give at least one quantity, e.g. --input 1000",
                                     param_hint="--input/--output/--meter")
        if len(quantities) > MAX_QUANTITIES:
            raise typer.BadParameter(f"at most {MAX_QUANTITIES} meters", param_hint="--meter")
        asyncio.run(quote(get_config(), model, quantities, mode=mode, region=region, org=org,
                          at=at.replace(tzinfo=UTC) if at else None, is_estimate=estimate))
