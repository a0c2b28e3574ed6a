"""Tally's rating engine: the pricing domain shared by pricing (`Quote`) and metering (the hot
path). Pure Python: no grpc, no SQL, no I/O beyond reading a JSON catalog.

    book = load_catalog()
    quote = rate(book, "gpt-4.1", UsageMode.ONLINE, "", {Meter.INPUT_TOKENS: 1200})
    cost_micros, carry_attos = rate_total(book, "gpt-4.1", UsageMode.ONLINE, "", usage,
                                          prior, carry_attos)

The rounding rule and tier semantics are documented in `tally.rating.engine`.
"""

from .catalog import DEFAULT_CATALOG, dump_price_book, load_catalog, parse_price_book
from .engine import (
    CarryRounder,
    Quote,
    QuoteLine,
    rate,
    rate_lines,
    rate_total,
    rate_with_carry,
    rate_with_carry_attos,
)
from .errors import RatingError, RatingReason
from .exact import ATTOS_PER_MICRO, attos_to_micros_decimal, micros_decimal_to_attos
from .model import (
    METERS,
    Aggregation,
    CreditPackage,
    Meter,
    MeterSpec,
    ModelEntry,
    ModelKind,
    PackageTier,
    PriceBook,
    PriceBookHistory,
    PriceLine,
    ProviderCost,
    Tier,
    TierMode,
    UsageMode,
)
from .simulate import OrgDelta, SimulationRecord, simulate
from .validation import BelowCostWarning, Problem, below_cost, validate

__all__ = [
    "ATTOS_PER_MICRO",
    "DEFAULT_CATALOG",
    "METERS",
    "Aggregation",
    "BelowCostWarning",
    "CarryRounder",
    "CreditPackage",
    "Meter",
    "MeterSpec",
    "ModelEntry",
    "ModelKind",
    "OrgDelta",
    "PackageTier",
    "PriceBook",
    "PriceBookHistory",
    "PriceLine",
    "Problem",
    "ProviderCost",
    "Quote",
    "QuoteLine",
    "RatingError",
    "RatingReason",
    "SimulationRecord",
    "Tier",
    "TierMode",
    "UsageMode",
    "attos_to_micros_decimal",
    "below_cost",
    "dump_price_book",
    "load_catalog",
    "micros_decimal_to_attos",
    "parse_price_book",
    "rate",
    "rate_lines",
    "rate_total",
    "rate_with_carry",
    "rate_with_carry_attos",
    "simulate",
    "validate",
]
