"""tally.pricing.v1 messages <-> pricing domain objects.

Published books go out through `tally.sdk.pricebook.to_proto`, the conversion metering uses to
read them back, so both ends agree; every enum (meter, mode, tier mode, kind, package tier) and
credit package crosses the wire through the same module. Drafts come in through
`draft_from_proto`, which is tolerant on purpose: PublishPriceBook must list every problem of a
draft, so a bad decimal or an unset enum becomes a field violation instead of stopping at the
first one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from tally.common.v1 import common_pb2
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid_fields
from tally.kit.protoconv import from_timestamp, to_timestamp
from tally.pricing.v1 import pricing_pb2 as pb
from tally.rating import (
    BelowCostWarning,
    CreditPackage,
    Meter,
    ModelEntry,
    ModelKind,
    PriceBook,
    PriceLine,
    ProviderCost,
    Quote,
    Tier,
    UsageMode,
)
from tally.sdk.pricebook import (
    kind_from_proto,
    meter_from_proto,
    meter_to_proto,
    mode_from_proto,
    mode_to_proto,
    package_tier_from_proto,
    package_to_proto,
    tier_mode_from_proto,
    tier_mode_to_proto,
    to_proto,
)

from .domain import (
    EPOCH,
    MAX_QUOTE_QUANTITIES,
    Draft,
    MarginPage,
    PackagePage,
    PublishCommand,
    PublishedBook,
    PublishResult,
    QuoteCommand,
    SimulationPage,
    VersionHeader,
    VersionPage,
    fraction_text,
    parse_decimal,
    request_fingerprint,
)

_T = TypeVar("_T")


def or_none(convert: Callable[[int], _T], number: int) -> _T | None:
    """`convert(number)`, or None where it refuses the number (unset or unknown enum value):
    the tolerant reading of wire enums, for callers that report every problem at once."""
    try:
        return convert(number)
    except ValueError:
        return None


# --- books out -------------------------------------------------------------------------------


def book_to_proto(published: PublishedBook) -> pb.PriceBook:
    """A published book as the wire message (version, publisher and credit prices included)."""
    message = to_proto(published.book)
    message.version = published.version
    message.published_by = published.published_by
    stamp = to_timestamp(published.published_at)
    if stamp is not None:
        message.published_at.CopyFrom(stamp)
    for currency, price in published.custom_credit_price_minor.items():
        message.custom_credit_price_minor[currency] = str(price)
    return message


def version_to_proto(header: VersionHeader) -> pb.PriceBookVersion:
    """A version header."""
    return pb.PriceBookVersion(
        version=header.version, effective_from=to_timestamp(header.effective_from),
        published_at=to_timestamp(header.published_at), published_by=header.published_by,
        note=header.note)


def version_page_to_proto(page: VersionPage) -> pb.ListPriceBookVersionsResponse:
    """A page of version headers."""
    return pb.ListPriceBookVersionsResponse(
        versions=[version_to_proto(v) for v in page.versions],
        next_page_token=page.next_page_token)


def warning_to_proto(warning: BelowCostWarning, book: PriceBook) -> pb.PriceWarning:
    """A below-cost warning with both rates per the line's per_units."""
    per_units = book.line(warning.line_id).per_units
    return pb.PriceWarning(
        line_id=warning.line_id, model=warning.model, meter=meter_to_proto(warning.meter),
        price_rate=fraction_text(warning.price_per_unit * per_units),
        cost_rate=fraction_text(warning.cost_per_unit * per_units),
        message=warning.message, mode=mode_to_proto(warning.mode),
        tier_index=warning.tier_index, region=warning.region)


def publish_to_proto(result: PublishResult) -> pb.PublishPriceBookResponse:
    """The PublishPriceBook response."""
    return pb.PublishPriceBookResponse(
        book=book_to_proto(result.published),
        below_cost_warnings=[warning_to_proto(w, result.published.book)
                             for w in result.warnings],
        is_replay=result.is_replay)


def package_page_to_proto(page: PackagePage) -> pb.ListCreditPackagesResponse:
    """A page of packages as the ListCreditPackages response."""
    return pb.ListCreditPackagesResponse(
        packages=[package_to_proto(p) for p in page.packages],
        next_page_token=page.next_page_token,
        price_book_version=page.price_book_version,
    )


def simulation_to_proto(page: SimulationPage) -> pb.SimulatePriceChangeResponse:
    """The SimulatePriceChange response."""
    return pb.SimulatePriceChangeResponse(
        deltas=[pb.OrgDelta(org_id=d.org_id, current_micros=d.current_micros,
                            simulated_micros=d.simulated_micros, delta_micros=d.delta_micros,
                            events=d.events, unrated_events=d.unrated_events)
                for d in page.deltas],
        next_page_token=page.next_page_token)


def margin_to_proto(page: MarginPage) -> pb.MarginReportResponse:
    """The MarginReport response."""
    return pb.MarginReportResponse(
        rows=[pb.MarginRow(model=r.model, provider=r.provider, revenue_micros=r.revenue_micros,
                           cost_micros=r.cost_micros, margin_micros=r.margin_micros,
                           margin_bps=r.margin_bps) for r in page.rows],
        next_page_token=page.next_page_token)


# --- quotes ----------------------------------------------------------------------------------


def _quantities(items: Sequence[common_pb2.MeterQuantity], name: str, *, required: bool
                ) -> dict[Meter, int]:
    # The common case in one pass; anything odd goes to the full check, which names every
    # problem (Quote runs this twice per call, so the fast path matters).
    found: dict[Meter, int] = {}
    if len(items) <= MAX_QUOTE_QUANTITIES:
        for entry in items:
            meter = or_none(meter_from_proto, entry.meter)
            quantity = entry.quantity
            if meter is None or quantity < 0 or meter in found:
                break
            found[meter] = quantity
        else:
            if found or not required:
                return found
    return _checked_quantities(items, name, required=required)


def _checked_quantities(items: Iterable[common_pb2.MeterQuantity], name: str, *,
                        required: bool) -> dict[Meter, int]:
    found: dict[Meter, int] = {}
    problems: list[FieldViolation] = []
    unknown: FieldViolation | None = None
    entries = list(items)
    if required and not entries:
        problems.append(FieldViolation(name, "at least one quantity is required"))
    if len(entries) > MAX_QUOTE_QUANTITIES:
        problems.append(FieldViolation(name, f"at most {MAX_QUOTE_QUANTITIES} entries"))
    for index, entry in enumerate(entries):
        meter = or_none(meter_from_proto, entry.meter)
        if meter is None:
            unknown = unknown or FieldViolation(f"{name}[{index}].meter",
                                                f"unknown meter {entry.meter}")
            continue
        if meter in found:
            problems.append(FieldViolation(f"{name}[{index}].meter",
                                           f"{meter} is listed more than once"))
        if entry.quantity < 0:
            problems.append(FieldViolation(f"{name}[{index}].quantity", "must be >= 0"))
        found[meter] = entry.quantity
    if unknown is not None and not problems:
        raise TallyError(Reason.UNKNOWN_METER, f"{unknown.field}: {unknown.description}",
                         field=unknown.field)
    if unknown is not None:
        problems.insert(0, unknown)
    if problems:
        raise invalid_fields(problems)
    return found


def _mode(number: int) -> UsageMode:
    try:
        mode = mode_from_proto(number)
    except ValueError:
        raise invalid_fields([FieldViolation("mode", f"unknown usage mode {number}")]) from None
    return UsageMode.ONLINE if mode is None else mode


def quote_command(request: pb.QuoteRequest) -> QuoteCommand:
    """The domain form of a Quote request; INVALID_ARGUMENT / UNKNOWN_METER naming the field."""
    return QuoteCommand(
        model=request.model, mode=_mode(request.mode), region=request.region,
        quantities=_quantities(request.quantities, "quantities", required=True),
        period_quantities=_quantities(request.period_quantities, "period_quantities",
                                      required=False),
        at=from_timestamp(request, "at"), is_estimate=request.is_estimate)


def quote_to_proto(quote: Quote, published: PublishedBook, is_estimate: bool
                   ) -> pb.QuoteResponse:
    """The Quote response: one line per meter, the version that priced it."""
    response = pb.QuoteResponse(total_micros=quote.total_micros,
                                price_book_version=published.version,
                                resolved_model=quote.resolved_model, provider=quote.provider,
                                is_estimate=is_estimate)
    add = response.lines.add  # built in place: no message built and then copied in
    for line in quote.lines:
        add(meter=meter_to_proto(line.meter), quantity=line.quantity, rate=str(line.rate),
            per_units=line.per_units, tier_index=line.tier_index,
            tier_mode=tier_mode_to_proto(line.tier_mode),
            included_applied=line.included_applied, cost_micros=line.cost_micros,
            exact_cost_micros=str(line.exact_cost), line_id=line.line_id,
            region_multiplier=str(line.region_multiplier),
            overage_quantity=line.overage_quantity)
    return response


# --- drafts in -------------------------------------------------------------------------------


class _Reader:
    """Collects every wire-level problem of a draft while building its domain form."""

    def __init__(self) -> None:
        self.problems: list[FieldViolation] = []

    def bad(self, where: str, message: str) -> None:
        self.problems.append(FieldViolation(where, message))

    def decimal(self, text: str, where: str) -> Decimal:
        value = parse_decimal(text)
        if value is None:
            self.bad(where, f"{text!r} is not an exact decimal number")
            return Decimal(0)
        return value

    def lines(self, message: pb.PriceBook) -> list[PriceLine]:
        out: list[PriceLine] = []
        for index, line in enumerate(message.lines):
            where = f"draft.lines[{index}]"
            meter = or_none(meter_from_proto, line.meter)
            if meter is None:
                self.bad(f"{where}.meter", "is required (a known meter)")
            mode = or_none(mode_from_proto, line.mode)
            if line.mode and mode is None:
                self.bad(f"{where}.mode", f"unknown usage mode {line.mode}")
            tier_mode = or_none(tier_mode_from_proto, line.tier_mode)
            if tier_mode is None:
                self.bad(f"{where}.tier_mode", "is required: FLAT, GRADUATED or VOLUME")
            tiers = tuple(Tier(t.up_to or None, self.decimal(t.rate, f"{where}.tiers[{i}].rate"))
                          for i, t in enumerate(line.tiers))
            overage = (self.decimal(line.overage_rate, f"{where}.overage_rate")
                       if line.overage_rate else None)
            multipliers = {r: self.decimal(v, f"{where}.region_multipliers[{r}]")
                           for r, v in line.region_multipliers.items()}
            if meter is None or tier_mode is None:
                continue  # left out of the book: it cannot be keyed or priced
            out.append(PriceLine(
                line_id=line.line_id, meter=meter, tiers=tiers, model=line.model, mode=mode,
                tier_mode=tier_mode, per_units=line.per_units,
                included_quantity=line.included_quantity, overage_rate=overage,
                region_multipliers=multipliers))
        return out

    def models(self, message: pb.PriceBook) -> list[ModelEntry]:
        out: list[ModelEntry] = []
        for index, entry in enumerate(message.models):
            kind = or_none(kind_from_proto, entry.kind)
            if kind is None:
                self.bad(f"draft.models[{index}].kind", f"unknown model kind {entry.kind}")
                kind = ModelKind.CHAT
            out.append(ModelEntry(
                model=entry.model, provider=entry.provider, provider_model=entry.provider_model,
                kind=kind, aliases=tuple(entry.aliases), routing_priority=entry.routing_priority,
                fallback_models=tuple(entry.fallback_models),
                downgrade_to=entry.downgrade_to or None,
                max_context_tokens=entry.max_context_tokens))
        return out

    def costs(self, message: pb.PriceBook) -> list[ProviderCost]:
        out: list[ProviderCost] = []
        for index, cost in enumerate(message.costs):
            where = f"draft.costs[{index}]"
            meter = or_none(meter_from_proto, cost.meter)
            if meter is None:
                self.bad(f"{where}.meter", "is required (a known meter)")
            mode = or_none(mode_from_proto, cost.mode)
            if cost.mode and mode is None:
                self.bad(f"{where}.mode", f"unknown usage mode {cost.mode}")
            rate = self.decimal(cost.cost_rate, f"{where}.cost_rate")
            if meter is not None:
                out.append(ProviderCost(provider=cost.provider, model=cost.model, meter=meter,
                                        cost_rate=rate, per_units=cost.per_units, mode=mode))
        return out

    def packages(self, message: pb.PriceBook) -> list[CreditPackage]:
        out: list[CreditPackage] = []
        for index, package in enumerate(message.packages):
            tier = or_none(package_tier_from_proto, package.tier)
            if tier is None:
                self.bad(f"draft.packages[{index}].tier", "is required (a package tier)")
                continue
            out.append(CreditPackage(
                package_id=package.package_id, name=package.name, tier=tier,
                price_minor=package.price_minor, currency=package.currency,
                credits_micros=package.credits_micros,
                bonus_credits_micros=package.bonus_credits_micros,
                manual_settlement_only=package.manual_settlement_only))
        return out


def draft_from_proto(message: pb.PriceBook, effective_from: datetime | None = None) -> Draft:
    """A draft book and every wire-level problem found reading it."""
    reader = _Reader()
    book = PriceBook(
        version="draft", effective_from=effective_from or EPOCH,
        lines=tuple(reader.lines(message)), models=tuple(reader.models(message)),
        costs=tuple(reader.costs(message)), packages=tuple(reader.packages(message)),
        note=message.note)
    custom = {currency: reader.decimal(price, f"draft.custom_credit_price_minor[{currency}]")
              for currency, price in message.custom_credit_price_minor.items()}
    return Draft(book, custom, tuple(reader.problems))


def publish_command(request: pb.PublishPriceBookRequest, actor: str) -> PublishCommand:
    """The domain form of a publish; the fingerprint covers the draft and effective_from."""
    effective_from = from_timestamp(request, "effective_from")
    canonical = pb.PublishPriceBookRequest(draft=request.draft,
                                           removed_models=sorted(request.removed_models),
                                           removed_meters=sorted(request.removed_meters))
    if request.HasField("effective_from"):
        canonical.effective_from.CopyFrom(request.effective_from)
    return PublishCommand(
        request_id=request.request_id,
        request_hash=request_fingerprint(canonical.SerializeToString(deterministic=True)),
        draft=draft_from_proto(request.draft, effective_from),
        effective_from=effective_from,
        published_by=request.context.actor or actor,
        removed_models=frozenset(request.removed_models),
        removed_meters=frozenset(m for m in (or_none(meter_from_proto, n)
                                             for n in request.removed_meters) if m is not None))
