"""Price books on the wire: `tally.rating.PriceBook` <-> `tally.pricing.v1.PriceBook`.

Pricing sends books (Get/WatchPriceBook) and metering rates with them in process, so both ends
share this one conversion, and the enum conversions under it (meters, usage modes, tier modes,
model kinds, package tiers), which every pricing and metering message uses. Rates travel as
exact decimal strings; versions are the integers PricingService assigns at publish (the rating
library keeps them as strings).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, TypeVar

from tally.common.v1 import common_pb2
from tally.kit.protoconv import from_timestamp, to_timestamp
from tally.pricing.v1 import pricing_pb2 as pb
from tally.rating import (
    CreditPackage,
    Meter,
    ModelEntry,
    ModelKind,
    PackageTier,
    PriceBook,
    PriceLine,
    ProviderCost,
    Tier,
    TierMode,
    UsageMode,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_E = TypeVar("_E")

# Rating enums <-> wire enums, by table: the wire name is the prefix plus the member's name
# (Meter.INPUT_TOKENS <-> METER_INPUT_TOKENS). Built once; these run per line of every quote.
_METER_OUT: Final[Mapping[Meter, common_pb2.Meter.ValueType]] = {
    m: common_pb2.Meter.Value(f"METER_{m.name}") for m in Meter}
_METER_IN: Final[Mapping[int, Meter]] = {n: m for m, n in _METER_OUT.items()}
_MODE_OUT: Final[Mapping[UsageMode, common_pb2.UsageMode.ValueType]] = {
    m: common_pb2.UsageMode.Value(f"USAGE_MODE_{m.name}") for m in UsageMode}
_MODE_IN: Final[Mapping[int, UsageMode]] = {n: m for m, n in _MODE_OUT.items()}
_TIER_MODE_OUT: Final[Mapping[TierMode, pb.TierMode.ValueType]] = {
    m: pb.TierMode.Value(f"TIER_MODE_{m.name}") for m in TierMode}
_TIER_MODE_IN: Final[Mapping[int, TierMode]] = {n: m for m, n in _TIER_MODE_OUT.items()}
_KIND_OUT: Final[Mapping[ModelKind, pb.ModelKind.ValueType]] = {
    k: pb.ModelKind.Value(f"MODEL_KIND_{k.name}") for k in ModelKind}
_KIND_IN: Final[Mapping[int, ModelKind]] = {
    pb.MODEL_KIND_UNSPECIFIED: ModelKind.CHAT, **{n: k for k, n in _KIND_OUT.items()}}
_PACKAGE_TIER_OUT: Final[Mapping[PackageTier, pb.PackageTier.ValueType]] = {
    t: pb.PackageTier.Value(f"PACKAGE_TIER_{t.name}") for t in PackageTier}
_PACKAGE_TIER_IN: Final[Mapping[int, PackageTier]] = {
    n: t for t, n in _PACKAGE_TIER_OUT.items()}


def _lookup(table: Mapping[int, _E], number: int, what: str) -> _E:
    found = table.get(number)
    if found is None:
        raise ValueError(f"{number} is not a known {what}")
    return found


def meter_to_proto(meter: Meter) -> common_pb2.Meter.ValueType:
    """common.v1.Meter of a rating Meter (METER_ + upper-cased name)."""
    return _METER_OUT[meter]


def meter_from_proto(number: int) -> Meter:
    """The rating Meter of a common.v1.Meter number (ValueError if unspecified/unknown)."""
    return _lookup(_METER_IN, number, "meter")


def mode_to_proto(mode: UsageMode | None) -> common_pb2.UsageMode.ValueType:
    """common.v1.UsageMode of a rating mode (None = UNSPECIFIED = any)."""
    return common_pb2.USAGE_MODE_UNSPECIFIED if mode is None else _MODE_OUT[mode]


def mode_from_proto(number: int) -> UsageMode | None:
    """The rating mode of a common.v1.UsageMode (UNSPECIFIED = None; ValueError if unknown)."""
    if number == common_pb2.USAGE_MODE_UNSPECIFIED:
        return None
    return _lookup(_MODE_IN, number, "usage mode")


def tier_mode_to_proto(mode: TierMode) -> pb.TierMode.ValueType:
    """pricing.v1.TierMode of a rating tier mode."""
    return _TIER_MODE_OUT[mode]


def tier_mode_from_proto(number: int) -> TierMode:
    """The rating tier mode of a pricing.v1.TierMode (ValueError if unspecified/unknown)."""
    return _lookup(_TIER_MODE_IN, number, "tier mode")


def kind_to_proto(kind: ModelKind) -> pb.ModelKind.ValueType:
    """pricing.v1.ModelKind of a rating model kind."""
    return _KIND_OUT[kind]


def kind_from_proto(number: int) -> ModelKind:
    """The rating model kind of a pricing.v1.ModelKind (UNSPECIFIED = CHAT, the proto's
    default; ValueError if unknown)."""
    return _lookup(_KIND_IN, number, "model kind")


def package_tier_to_proto(tier: PackageTier) -> pb.PackageTier.ValueType:
    """pricing.v1.PackageTier of a rating package tier."""
    return _PACKAGE_TIER_OUT[tier]


def package_tier_from_proto(number: int) -> PackageTier:
    """The rating package tier of a pricing.v1.PackageTier (ValueError if unspecified/
    unknown)."""
    return _lookup(_PACKAGE_TIER_IN, number, "package tier")


def _version(book: PriceBook) -> int:
    return int(book.version) if book.version.isdigit() else 0


def to_proto(book: PriceBook) -> pb.PriceBook:
    """The wire form of a rating PriceBook."""
    message = pb.PriceBook(version=_version(book), note=book.note)
    stamp = to_timestamp(book.effective_from)
    if stamp is not None:
        message.effective_from.CopyFrom(stamp)
    for line in book.lines:
        message.lines.append(pb.PriceLine(
            line_id=line.line_id, model=line.model, meter=meter_to_proto(line.meter),
            mode=mode_to_proto(line.mode), tier_mode=tier_mode_to_proto(line.tier_mode),
            tiers=[pb.Tier(up_to=t.up_to or 0, rate=str(t.rate)) for t in line.tiers],
            per_units=line.per_units, included_quantity=line.included_quantity,
            overage_rate="" if line.overage_rate is None else str(line.overage_rate),
            region_multipliers={k: str(v) for k, v in line.region_multipliers.items()}))
    for entry in book.models:
        message.models.append(pb.ModelEntry(
            model=entry.model, provider=entry.provider, provider_model=entry.provider_model,
            kind=kind_to_proto(entry.kind), aliases=list(entry.aliases),
            routing_priority=entry.routing_priority,
            fallback_models=list(entry.fallback_models), downgrade_to=entry.downgrade_to or "",
            max_context_tokens=entry.max_context_tokens))
    for cost in book.costs:
        message.costs.append(pb.ProviderCost(
            provider=cost.provider, model=cost.model, meter=meter_to_proto(cost.meter),
            cost_rate=str(cost.cost_rate), per_units=cost.per_units,
            mode=mode_to_proto(cost.mode)))
    message.packages.extend(package_to_proto(package) for package in book.packages)
    return message


def package_to_proto(package: CreditPackage) -> pb.CreditPackage:
    """A credit package as the wire message, with its derived (output-only) figures."""
    return pb.CreditPackage(
        package_id=package.package_id, name=package.name,
        tier=package_tier_to_proto(package.tier), price_minor=package.price_minor,
        currency=package.currency, credits_micros=package.credits_micros,
        bonus_credits_micros=package.bonus_credits_micros,
        effective_credits_micros=package.effective_credits_micros,
        cost_per_credit_minor=str(package.cost_per_credit_minor),
        manual_settlement_only=package.manual_settlement_only)


def from_proto(message: pb.PriceBook) -> PriceBook:
    """The rating PriceBook of a wire book (rates parsed as exact decimals)."""
    lines = tuple(
        PriceLine(
            line_id=line.line_id, meter=meter_from_proto(line.meter),
            tiers=tuple(Tier(t.up_to or None, Decimal(t.rate)) for t in line.tiers),
            model=line.model, mode=mode_from_proto(line.mode),
            tier_mode=tier_mode_from_proto(line.tier_mode),
            per_units=line.per_units or 1, included_quantity=line.included_quantity,
            overage_rate=Decimal(line.overage_rate) if line.overage_rate else None,
            region_multipliers={k: Decimal(v) for k, v in line.region_multipliers.items()})
        for line in message.lines)
    models = tuple(
        ModelEntry(model=m.model, provider=m.provider, provider_model=m.provider_model,
                   kind=kind_from_proto(m.kind), aliases=tuple(m.aliases),
                   routing_priority=m.routing_priority, fallback_models=tuple(m.fallback_models),
                   downgrade_to=m.downgrade_to or None, max_context_tokens=m.max_context_tokens)
        for m in message.models)
    costs = tuple(
        ProviderCost(provider=c.provider, model=c.model, meter=meter_from_proto(c.meter),
                     cost_rate=Decimal(c.cost_rate), per_units=c.per_units or 1,
                     mode=mode_from_proto(c.mode))
        for c in message.costs)
    packages = tuple(
        CreditPackage(package_id=p.package_id, name=p.name,
                      tier=package_tier_from_proto(p.tier), price_minor=p.price_minor,
                      currency=p.currency, credits_micros=p.credits_micros,
                      bonus_credits_micros=p.bonus_credits_micros,
                      manual_settlement_only=p.manual_settlement_only)
        for p in message.packages)
    return PriceBook(version=str(message.version),
                     effective_from=from_timestamp(message, "effective_from") or _EPOCH,
                     lines=lines, models=models, costs=costs, packages=packages,
                     note=message.note)
