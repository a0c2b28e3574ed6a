"""Price books on the wire: `tally.rating.PriceBook` <-> `tally.pricing.v1.PriceBook`.

Pricing sends books (Get/WatchPriceBook) and metering rates with them in process, so both ends
share this one conversion. Rates travel as exact decimal strings; versions are the integers
PricingService assigns at publish (the rating library keeps them as strings).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

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


def meter_to_proto(meter: Meter) -> common_pb2.Meter.ValueType:
    """common.v1.Meter of a rating Meter (METER_ + upper-cased name)."""
    return common_pb2.Meter.Value(f"METER_{meter.value.upper()}")


def meter_from_proto(number: int) -> Meter:
    """The rating Meter of a common.v1.Meter number (ValueError if unspecified/unknown)."""
    name = common_pb2.Meter.Name(common_pb2.Meter.ValueType(number))
    name = name.removeprefix("METER_").lower()
    return Meter(name)


def mode_to_proto(mode: UsageMode | None) -> common_pb2.UsageMode.ValueType:
    """common.v1.UsageMode of a rating mode (None = UNSPECIFIED = any)."""
    if mode is None:
        return common_pb2.USAGE_MODE_UNSPECIFIED
    return common_pb2.UsageMode.Value(f"USAGE_MODE_{mode.value.upper()}")


def mode_from_proto(number: int) -> UsageMode | None:
    """The rating mode of a common.v1.UsageMode (UNSPECIFIED = None)."""
    if number == common_pb2.USAGE_MODE_UNSPECIFIED:
        return None
    name = common_pb2.UsageMode.Name(common_pb2.UsageMode.ValueType(number))
    return UsageMode(name.removeprefix("USAGE_MODE_").lower())


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
            mode=mode_to_proto(line.mode),
            tier_mode=pb.TierMode.Value(f"TIER_MODE_{line.tier_mode.value.upper()}"),
            tiers=[pb.Tier(up_to=t.up_to or 0, rate=str(t.rate)) for t in line.tiers],
            per_units=line.per_units, included_quantity=line.included_quantity,
            overage_rate="" if line.overage_rate is None else str(line.overage_rate),
            region_multipliers={k: str(v) for k, v in line.region_multipliers.items()}))
    for entry in book.models:
        message.models.append(pb.ModelEntry(
            model=entry.model, provider=entry.provider, provider_model=entry.provider_model,
            aliases=list(entry.aliases), routing_priority=entry.routing_priority,
            fallback_models=list(entry.fallback_models), downgrade_to=entry.downgrade_to or "",
            max_context_tokens=entry.max_context_tokens))
        _set_kind(message.models[-1], entry.kind)
    for cost in book.costs:
        message.costs.append(pb.ProviderCost(
            provider=cost.provider, model=cost.model, meter=meter_to_proto(cost.meter),
            cost_rate=str(cost.cost_rate), per_units=cost.per_units))
        _set_cost_mode(message.costs[-1], cost.mode)
    for package in book.packages:
        message.packages.append(pb.CreditPackage(
            package_id=package.package_id, name=package.name,
            tier=pb.PackageTier.Value(f"PACKAGE_TIER_{package.tier.value.upper()}"),
            price_minor=package.price_minor, currency=package.currency,
            credits_micros=package.credits_micros,
            bonus_credits_micros=package.bonus_credits_micros,
            effective_credits_micros=package.effective_credits_micros,
            cost_per_credit_minor=str(package.cost_per_credit_minor),
            manual_settlement_only=package.manual_settlement_only))
    return message


def from_proto(message: pb.PriceBook) -> PriceBook:
    """The rating PriceBook of a wire book (rates parsed as exact decimals)."""
    lines = tuple(
        PriceLine(
            line_id=line.line_id, meter=meter_from_proto(line.meter),
            tiers=tuple(Tier(t.up_to or None, Decimal(t.rate)) for t in line.tiers),
            model=line.model, mode=mode_from_proto(line.mode),
            tier_mode=TierMode(pb.TierMode.Name(line.tier_mode).removeprefix("TIER_MODE_")
                               .lower()),
            per_units=line.per_units or 1, included_quantity=line.included_quantity,
            overage_rate=Decimal(line.overage_rate) if line.overage_rate else None,
            region_multipliers={k: Decimal(v) for k, v in line.region_multipliers.items()})
        for line in message.lines)
    models = tuple(
        ModelEntry(model=m.model, provider=m.provider, provider_model=m.provider_model,
                   kind=_get_kind(m), aliases=tuple(m.aliases),
                   routing_priority=m.routing_priority, fallback_models=tuple(m.fallback_models),
                   downgrade_to=m.downgrade_to or None, max_context_tokens=m.max_context_tokens)
        for m in message.models)
    costs = tuple(
        ProviderCost(provider=c.provider, model=c.model, meter=meter_from_proto(c.meter),
                     cost_rate=Decimal(c.cost_rate), per_units=c.per_units or 1,
                     mode=_get_cost_mode(c))
        for c in message.costs)
    packages = tuple(
        CreditPackage(package_id=p.package_id, name=p.name,
                      tier=PackageTier(pb.PackageTier.Name(p.tier)
                                       .removeprefix("PACKAGE_TIER_").lower()),
                      price_minor=p.price_minor, currency=p.currency,
                      credits_micros=p.credits_micros, bonus_credits_micros=p.bonus_credits_micros,
                      manual_settlement_only=p.manual_settlement_only)
        for p in message.packages)
    return PriceBook(version=str(message.version),
                     effective_from=from_timestamp(message, "effective_from") or _EPOCH,
                     lines=lines, models=models, costs=costs, packages=packages,
                     note=message.note)


# ModelEntry.kind and ProviderCost.mode are being added to the contract; until they are, a
# book travels without them (chat models, costs for any mode). Reached through Any on purpose.
def _set_kind(message: Any, kind: ModelKind) -> None:
    field = pb.ModelEntry.DESCRIPTOR.fields_by_name.get("kind")
    if field is not None and field.enum_type is not None:
        message.kind = field.enum_type.values_by_name[f"MODEL_KIND_{kind.value.upper()}"].number


def _get_kind(message: Any) -> ModelKind:
    field = pb.ModelEntry.DESCRIPTOR.fields_by_name.get("kind")
    if field is None or field.enum_type is None or message.kind == 0:
        return ModelKind.CHAT
    name = field.enum_type.values_by_number[message.kind].name
    return ModelKind(name.removeprefix("MODEL_KIND_").lower())


def _set_cost_mode(message: Any, mode: UsageMode | None) -> None:
    if "mode" in pb.ProviderCost.DESCRIPTOR.fields_by_name:
        message.mode = mode_to_proto(mode)


def _get_cost_mode(message: Any) -> UsageMode | None:
    if "mode" not in pb.ProviderCost.DESCRIPTOR.fields_by_name:
        return None
    return mode_from_proto(message.mode)
