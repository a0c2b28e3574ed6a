"""tally.pricing.v1 messages <-> pricing domain objects.

Published books go out through `tally.sdk.pricebook.to_proto`, the conversion metering uses to
read them back, so both ends agree. Drafts come in through `draft_from_proto`, which is
tolerant on purpose: PublishPriceBook must list every problem of a draft, so a bad decimal or
an unset enum becomes a field violation instead of stopping at the first one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Final

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
    PackageTier,
    PriceBook,
    PriceLine,
    ProviderCost,
    Quote,
    Tier,
    TierMode,
    UsageMode,
)
from tally.sdk.pricebook import to_proto

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

METER_IN: Final[Mapping[int, Meter]] = {
    common_pb2.Meter.Value(f"METER_{m.name}"): m for m in Meter}
METER_OUT: Final[Mapping[Meter, int]] = {m: n for n, m in METER_IN.items()}
MODE_IN: Final[Mapping[int, UsageMode]] = {
    common_pb2.UsageMode.Value(f"USAGE_MODE_{m.name}"): m for m in UsageMode}
MODE_OUT: Final[Mapping[UsageMode | None, int]] = {
    None: common_pb2.USAGE_MODE_UNSPECIFIED, **{m: n for n, m in MODE_IN.items()}}
TIER_MODE_IN: Final[Mapping[int, TierMode]] = {
    pb.TierMode.Value(f"TIER_MODE_{m.name}"): m for m in TierMode}
TIER_MODE_OUT: Final[Mapping[TierMode, int]] = {m: n for n, m in TIER_MODE_IN.items()}
KIND_IN: Final[Mapping[int, ModelKind]] = {
    pb.MODEL_KIND_UNSPECIFIED: ModelKind.CHAT,
    **{pb.ModelKind.Value(f"MODEL_KIND_{k.name}"): k for k in ModelKind}}
PACKAGE_TIER_IN: Final[Mapping[int, PackageTier]] = {
    pb.PackageTier.Value(f"PACKAGE_TIER_{t.name}"): t for t in PackageTier}
_ONE: Final = "1"


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
        line_id=warning.line_id, model=warning.model, meter=METER_OUT[warning.meter],  # type: ignore[arg-type]
        price_rate=fraction_text(warning.price_per_unit * per_units),
        cost_rate=fraction_text(warning.cost_per_unit * per_units),
        message=warning.message, mode=MODE_OUT[warning.mode],  # type: ignore[arg-type]
        tier_index=warning.tier_index, region=warning.region)


def publish_to_proto(result: PublishResult) -> pb.PublishPriceBookResponse:
    """The PublishPriceBook response."""
    return pb.PublishPriceBookResponse(
        book=book_to_proto(result.published),
        below_cost_warnings=[warning_to_proto(w, result.published.book)
                             for w in result.warnings],
        is_replay=result.is_replay)


def package_to_proto(package: CreditPackage) -> pb.CreditPackage:
    """A catalog package as the wire message, with its derived (output-only) figures."""
    return pb.CreditPackage(
        package_id=package.package_id,
        name=package.name,
        tier=pb.PackageTier.Value(f"PACKAGE_TIER_{package.tier.name}"),
        price_minor=package.price_minor,
        currency=package.currency,
        credits_micros=package.credits_micros,
        bonus_credits_micros=package.bonus_credits_micros,
        effective_credits_micros=package.effective_credits_micros,
        cost_per_credit_minor=str(package.cost_per_credit_minor),
        manual_settlement_only=package.manual_settlement_only,
    )


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


def _quantities(items: Iterable[common_pb2.MeterQuantity], name: str, *, required: bool
                ) -> dict[Meter, int]:
    found: dict[Meter, int] = {}
    problems: list[FieldViolation] = []
    unknown: FieldViolation | None = None
    entries = list(items)
    if required and not entries:
        problems.append(FieldViolation(name, "at least one quantity is required"))
    if len(entries) > MAX_QUOTE_QUANTITIES:
        problems.append(FieldViolation(name, f"at most {MAX_QUOTE_QUANTITIES} entries"))
    for index, entry in enumerate(entries):
        meter = METER_IN.get(entry.meter)
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
    if number == common_pb2.USAGE_MODE_UNSPECIFIED:
        return UsageMode.ONLINE
    mode = MODE_IN.get(number)
    if mode is None:
        raise invalid_fields([FieldViolation("mode", f"unknown usage mode {number}")])
    return mode


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
    version = published.version
    lines = [
        pb.QuoteLine(
            meter=METER_OUT[line.meter],  # type: ignore[arg-type]
            quantity=line.quantity, rate=str(line.rate), per_units=line.per_units,
            tier_index=line.tier_index,
            tier_mode=TIER_MODE_OUT[line.tier_mode],  # type: ignore[arg-type]
            included_applied=line.included_applied, cost_micros=line.cost_micros,
            exact_cost_micros=str(line.exact_cost), line_id=line.line_id,
            region_multiplier=str(line.region_multiplier),
            overage_quantity=line.overage_quantity)
        for line in quote.lines
    ]
    return pb.QuoteResponse(total_micros=quote.total_micros, lines=lines,
                            price_book_version=version, resolved_model=quote.resolved_model,
                            provider=quote.provider, is_estimate=is_estimate)


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
            meter = METER_IN.get(line.meter)
            if meter is None:
                self.bad(f"{where}.meter", "is required (a known meter)")
            mode = None if line.mode == 0 else MODE_IN.get(line.mode)
            if line.mode and mode is None:
                self.bad(f"{where}.mode", f"unknown usage mode {line.mode}")
            tier_mode = TIER_MODE_IN.get(line.tier_mode)
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
            kind = KIND_IN.get(entry.kind)
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
            meter = METER_IN.get(cost.meter)
            if meter is None:
                self.bad(f"{where}.meter", "is required (a known meter)")
            mode = None if cost.mode == 0 else MODE_IN.get(cost.mode)
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
            tier = PACKAGE_TIER_IN.get(package.tier)
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
    canonical = pb.PublishPriceBookRequest(draft=request.draft)
    if request.HasField("effective_from"):
        canonical.effective_from.CopyFrom(request.effective_from)
    return PublishCommand(
        request_id=request.request_id,
        request_hash=request_fingerprint(canonical.SerializeToString(deterministic=True)),
        draft=draft_from_proto(request.draft, effective_from),
        effective_from=effective_from,
        published_by=request.context.actor or actor)
