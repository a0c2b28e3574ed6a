"""Small hand-built price books for the rating tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from tally.rating import (
    Meter,
    ModelEntry,
    PriceBook,
    PriceLine,
    ProviderCost,
    Tier,
    TierMode,
    UsageMode,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
M = 1_000_000


def flat(rate: str) -> tuple[Tier, ...]:
    return (Tier(None, Decimal(rate)),)


# graduated/volume tiers shared by the tests: units 1-100 at 10, 101-1000 at 5, beyond at 2
# (credits per unit).
TIERS = (Tier(100, Decimal(10)), Tier(1000, Decimal(5)), Tier(None, Decimal(2)))


def book(version: str = "v1", effective_from: datetime = T0, **overrides: object) -> PriceBook:
    """A book with one chat model ("chat-1", alias "chat"), shared lines for every other
    meter shape, and a batch price."""
    lines = [
        PriceLine("chat-1/in", Meter.INPUT_TOKENS, flat("3"), model="chat-1", per_units=M),
        PriceLine("chat-1/out", Meter.OUTPUT_TOKENS, flat("15"), model="chat-1", per_units=M),
        PriceLine(
            "chat-1/in/batch",
            Meter.INPUT_TOKENS,
            flat("1.5"),
            model="chat-1",
            mode=UsageMode.BATCH,
            per_units=M,
        ),
        PriceLine("any/cached", Meter.CACHED_INPUT_TOKENS, flat("0.3"), per_units=M),
        PriceLine(
            "any/cached/batch",
            Meter.CACHED_INPUT_TOKENS,
            flat("0.1"),
            mode=UsageMode.BATCH,
            per_units=M,
        ),
        PriceLine("storage", Meter.STORAGE_GB_HOURS, TIERS, tier_mode=TierMode.GRADUATED),
        PriceLine("bandwidth", Meter.BANDWIDTH_GB, TIERS, tier_mode=TierMode.VOLUME),
        PriceLine(
            "reads",
            Meter.EMBEDDING_READS,
            flat("4"),
            included_quantity=1000,
        ),
        PriceLine(
            "ops",
            Meter.DATA_OPERATIONS,
            flat("4"),
            included_quantity=1000,
            overage_rate=Decimal(7),
        ),
        PriceLine(
            "gpu",
            Meter.GPU_MINUTES,
            flat("2"),
            region_multipliers={"eu": Decimal("1.5"), "us": Decimal("0.5")},
        ),
        PriceLine("calls", Meter.CALLS, flat("0.000001"), per_units=1),
    ]
    fields: dict[str, object] = {
        "version": version,
        "effective_from": effective_from,
        "lines": tuple(lines),
        "models": (
            ModelEntry(
                "chat-1",
                "acme",
                "acme-chat-1-2025",
                aliases=("chat", "chat-latest"),
                downgrade_to="chat-mini",
                fallback_models=("chat-mini",),
            ),
            ModelEntry(
                "chat-mini",
                "acme",
                "acme-chat-mini",
                aliases=(),
            ),
        ),
        "costs": (
            ProviderCost("acme", "chat-1", Meter.INPUT_TOKENS, Decimal(2), M, UsageMode.ONLINE),
        ),
    }
    fields.update(overrides)
    mini_lines = (
        PriceLine("mini/in", Meter.INPUT_TOKENS, flat("1"), model="chat-mini", per_units=M),
        PriceLine("mini/out", Meter.OUTPUT_TOKENS, flat("2"), model="chat-mini", per_units=M),
    )
    if "lines" not in overrides:
        fields["lines"] = (*lines, *mini_lines)
    return PriceBook(**fields)  # type: ignore[arg-type]
