"""The pricing domain: meters, price lines and their tiers, models, provider costs, credit
packages, and effective-dated price books (DESIGN §4).

Everything here is an immutable value. Rates are `Decimal` credits per `per_units` units; money
that reaches a balance is an integer number of micro-credits (`tally.kit.money`). Floats are
refused at construction, so a float can never leak into a price.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Final

from tally.kit.money import MICROS_PER_CREDIT

from .errors import RatingError, RatingReason
from .exact import EXACT


class Meter(enum.StrEnum):
    """What a usage event measures. Values are the wire names (proto `Meter` lower-cased)."""

    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    CACHED_INPUT_TOKENS = "cached_input_tokens"
    REASONING_TOKENS = "reasoning_tokens"
    CALLS = "calls"
    EMBEDDING_WRITES = "embedding_writes"
    EMBEDDING_READS = "embedding_reads"
    STORAGE_GB_HOURS = "storage_gb_hours"
    GPU_MINUTES = "gpu_minutes"
    COMPUTE_VCPU_SECONDS = "compute_vcpu_seconds"
    BANDWIDTH_GB = "bandwidth_gb"
    DATA_OPERATIONS = "data_operations"


class Aggregation(enum.StrEnum):
    """How a meter's events combine over a period."""

    SUM = "sum"


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """A meter's unit of measure and how its quantities aggregate over a billing period."""

    meter: Meter
    unit: str
    aggregation: Aggregation
    description: str


METERS: Final[Mapping[Meter, MeterSpec]] = MappingProxyType(
    {
        spec.meter: spec
        for spec in (
            MeterSpec(Meter.INPUT_TOKENS, "token", Aggregation.SUM, "prompt tokens, uncached"),
            MeterSpec(Meter.OUTPUT_TOKENS, "token", Aggregation.SUM, "completion tokens"),
            MeterSpec(
                Meter.CACHED_INPUT_TOKENS, "token", Aggregation.SUM, "prompt tokens read from cache"
            ),
            MeterSpec(
                Meter.REASONING_TOKENS,
                "token",
                Aggregation.SUM,
                "hidden reasoning tokens of reasoning models",
            ),
            MeterSpec(Meter.CALLS, "call", Aggregation.SUM, "requests (e.g. rerank searches)"),
            MeterSpec(Meter.EMBEDDING_WRITES, "vector", Aggregation.SUM, "vectors written"),
            MeterSpec(Meter.EMBEDDING_READS, "vector", Aggregation.SUM, "vectors read or queried"),
            MeterSpec(
                Meter.STORAGE_GB_HOURS,
                "GB-hour",
                Aggregation.SUM,
                # A gauge integrated over time by the reporter: 10 GB held for 3 hours is
                # reported as 30 GB-hours, so the period total is a plain sum.
                "stored gigabytes times hours held, already time-integrated by the reporter",
            ),
            MeterSpec(Meter.GPU_MINUTES, "GPU-minute", Aggregation.SUM, "accelerator minutes"),
            MeterSpec(
                Meter.COMPUTE_VCPU_SECONDS, "vCPU-second", Aggregation.SUM, "CPU compute time"
            ),
            MeterSpec(Meter.BANDWIDTH_GB, "GB", Aggregation.SUM, "egress gigabytes"),
            MeterSpec(
                Meter.DATA_OPERATIONS, "operation", Aggregation.SUM, "storage API operations"
            ),
        )
    }
)
"""Every meter's unit and aggregation."""


class UsageMode(enum.StrEnum):
    """How a request ran: interactively, or through a provider's discounted batch API."""

    ONLINE = "online"
    BATCH = "batch"


class TierMode(enum.StrEnum):
    """How a price line's tiers apply.

    - `flat`: one tier, one rate for every unit.
    - `graduated`: each unit is priced at the tier its position in the period falls in.
    - `volume`: the units of an event are priced at the tier that the period's cumulative
      quantity reaches (earlier units are not re-rated; see `tally.rating.engine`).
    """

    FLAT = "flat"
    GRADUATED = "graduated"
    VOLUME = "volume"


class ModelKind(enum.StrEnum):
    """What a model does; chat models must price both input and output tokens."""

    CHAT = "chat"
    EMBEDDING = "embedding"
    RERANK = "rerank"


class PackageTier(enum.StrEnum):
    """Who a credit package is for."""

    INDIVIDUAL = "individual"
    TEAM = "team"
    HIGH_VOLUME = "high_volume"
    ENTERPRISE = "enterprise"


def _no_float(value: object, field_name: str) -> None:
    if isinstance(value, float):
        raise RatingError(
            RatingReason.INVALID_ARGUMENT, field_name, "floats are never prices; use Decimal"
        )


@dataclass(frozen=True, slots=True)
class Tier:
    """One band of a price line.

    Covers the units of the period from the previous tier's `up_to` (exclusive) to `up_to`
    (inclusive); `up_to=None` is unbounded. `rate` is credits per the line's `per_units` units.
    """

    up_to: int | None
    rate: Decimal

    def __post_init__(self) -> None:
        _no_float(self.rate, "rate")


@dataclass(frozen=True, slots=True)
class PriceLine:
    """The price of one meter, for one model (or all models), in one mode (or both).

    `included_quantity` units per period are free; above them `overage_rate`, when set,
    replaces the tier rate. `region_multipliers` scale the line's exact cost per region
    (a region not listed costs 1x).
    """

    line_id: str
    meter: Meter
    tiers: tuple[Tier, ...]
    model: str = ""
    mode: UsageMode | None = None
    tier_mode: TierMode = TierMode.FLAT
    per_units: int = 1
    included_quantity: int = 0
    overage_rate: Decimal | None = None
    region_multipliers: Mapping[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(self.tiers))
        object.__setattr__(
            self, "region_multipliers", MappingProxyType(dict(self.region_multipliers))
        )
        _no_float(self.overage_rate, "overage_rate")
        for region, multiplier in self.region_multipliers.items():
            _no_float(multiplier, f"region_multipliers[{region}]")

    @property
    def key(self) -> tuple[str, Meter, UsageMode | None]:
        """The lookup key: (model, meter, mode); "" and None are wildcards."""
        return (self.model, self.meter, self.mode)

    @property
    def counts_period_usage(self) -> bool:
        """Whether rating it needs the units already used this period (`prior`): an allowance,
        or tiers beyond one flat rate. Other lines price every unit alike, whatever came
        before, so callers need not track their usage."""
        return self.included_quantity > 0 or (
            self.tier_mode is not TierMode.FLAT and len(self.tiers) > 1)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A public model name and where requests for it go.

    `fallback_models` are tried in order when the provider is unavailable; `downgrade_to` is
    the cheaper model the spend policy switches to when a budget runs low.
    """

    model: str
    provider: str
    provider_model: str
    kind: ModelKind = ModelKind.CHAT
    aliases: tuple[str, ...] = ()
    routing_priority: int = 0
    fallback_models: tuple[str, ...] = ()
    downgrade_to: str | None = None
    max_context_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "fallback_models", tuple(self.fallback_models))


@dataclass(frozen=True, slots=True)
class ProviderCost:
    """What we pay upstream: `cost_rate` credits per `per_units` units of `meter`.

    `model=""` is an infrastructure cost shared by all models; `mode=None` applies to both
    online and batch usage.
    """

    provider: str
    model: str
    meter: Meter
    cost_rate: Decimal
    per_units: int = 1
    mode: UsageMode | None = None

    def __post_init__(self) -> None:
        _no_float(self.cost_rate, "cost_rate")


# Rounding for cost_per_credit_minor when the exact quotient does not terminate.
_PACKAGE_RATIO_PLACES: Final = Decimal("1e-12")


@dataclass(frozen=True, slots=True)
class CreditPackage:
    """A prepaid bundle of credits sold for `price_minor` units of `currency` (e.g. cents).

    `manual_settlement_only` packages are never sold through checkout: an operator records
    the payment (invoices, wire transfers).
    """

    package_id: str
    name: str
    tier: PackageTier
    price_minor: int
    currency: str
    credits_micros: int
    bonus_credits_micros: int = 0
    manual_settlement_only: bool = False

    @property
    def effective_credits_micros(self) -> int:
        """Credits granted per purchase, bonus included."""
        return self.credits_micros + self.bonus_credits_micros

    @property
    def cost_per_credit_minor(self) -> Decimal:
        """Price of one effective credit in minor currency units.

        Exact when the quotient terminates (it does for every package whose credit count has
        only factors 2 and 5); otherwise rounded half-even at 1e-12 minor units. It is a
        display and comparison figure; no balance is ever derived from it.
        """
        effective = self.effective_credits_micros
        if effective <= 0:
            raise RatingError(
                RatingReason.INVALID_ARGUMENT, "credits_micros", "package grants no credits"
            )
        ratio = Fraction(self.price_minor * MICROS_PER_CREDIT, effective)
        return _fraction_to_decimal(ratio, _PACKAGE_RATIO_PLACES)


def _fraction_to_decimal(value: Fraction, places: Decimal) -> Decimal:
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:  # only factors 2 and 5: a finite decimal, so exact
        scale = 0
        while (10**scale) % value.denominator:
            scale += 1
        return Decimal(value.numerator * (10**scale // value.denominator)).scaleb(-scale, EXACT)
    return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(places)


ModelKey = tuple[str, Meter, UsageMode | None]


@dataclass(frozen=True, slots=True)
class PriceBook:
    """One immutable, effective-dated version of every price.

    Lookups are dictionaries built once at construction. A book is constructed even when it
    is invalid (so `validate` can list every problem); only the first of duplicate names or
    line keys is indexed.
    """

    version: str
    effective_from: datetime
    lines: tuple[PriceLine, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    costs: tuple[ProviderCost, ...] = ()
    packages: tuple[CreditPackage, ...] = ()
    note: str = ""
    _models_by_name: dict[str, ModelEntry] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _lines_by_key: dict[ModelKey, PriceLine] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _lines_by_id: dict[str, PriceLine] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _regions: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())
    # Compiled rating plans, filled lazily by tally.rating.engine: a memo, never state.
    _plans: dict[Any, Any] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("lines", "models", "costs", "packages"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for entry in self.models:
            self._models_by_name.setdefault(entry.model, entry)
        for entry in self.models:
            for alias in entry.aliases:
                self._models_by_name.setdefault(alias, entry)
        for line in self.lines:
            self._lines_by_key.setdefault(line.key, line)
            self._lines_by_id.setdefault(line.line_id, line)
        regions = frozenset(r for line in self.lines for r in line.region_multipliers)
        object.__setattr__(self, "_regions", regions)

    def resolve_model(self, name: str) -> ModelEntry:
        """The model a public name or alias refers to; raises UNKNOWN_MODEL otherwise."""
        entry = self._models_by_name.get(name)
        if entry is None:
            raise RatingError(
                RatingReason.UNKNOWN_MODEL,
                "model",
                f"{name!r} is not a model or alias in price book {self.version}",
            )
        return entry

    def has_model(self, name: str) -> bool:
        """Whether `name` is a model or an alias in this book."""
        return name in self._models_by_name

    def find_line(self, model: str, meter: Meter, mode: UsageMode) -> PriceLine | None:
        """The line pricing `meter` for canonical `model` in `mode`, most specific first:
        (model, meter, mode) > (model, meter, any mode) > (all models, meter, mode) >
        (all models, meter, any mode)."""
        index = self._lines_by_key
        if model:
            line = index.get((model, meter, mode)) or index.get((model, meter, None))
            if line is not None:
                return line
        return index.get(("", meter, mode)) or index.get(("", meter, None))

    def line(self, line_id: str) -> PriceLine:
        """The line with this id; raises PRICE_NOT_FOUND otherwise."""
        found = self._lines_by_id.get(line_id)
        if found is None:
            raise RatingError(
                RatingReason.PRICE_NOT_FOUND, "line_id", f"no line {line_id!r} in {self.version}"
            )
        return found

    @property
    def regions(self) -> frozenset[str]:
        """Every region that some line prices differently."""
        return self._regions

    @property
    def downgrade_map(self) -> Mapping[str, str]:
        """Canonical model -> the cheaper canonical model to downgrade to."""
        result: dict[str, str] = {}
        for entry in self.models:
            if entry.downgrade_to and entry.downgrade_to in self._models_by_name:
                result[entry.model] = self._models_by_name[entry.downgrade_to].model
        return result

    def downgrade_for(self, name: str) -> ModelEntry | None:
        """The model to downgrade `name` (model or alias) to, or None when there is none."""
        entry = self.resolve_model(name)
        if not entry.downgrade_to:
            return None
        return self.resolve_model(entry.downgrade_to)

    def provider_cost(self, model: str, meter: Meter, mode: UsageMode) -> ProviderCost | None:
        """What one unit of `meter` costs us upstream for canonical `model` in `mode`."""
        best: ProviderCost | None = None
        for cost in self.costs:
            if cost.model == model and cost.meter == meter and cost.mode in (mode, None):
                if cost.mode == mode:
                    return cost
                best = best or cost
        return best

    def package(self, package_id: str) -> CreditPackage:
        """The credit package with this id; raises INVALID_ARGUMENT otherwise."""
        for package in self.packages:
            if package.package_id == package_id:
                return package
        raise RatingError(
            RatingReason.INVALID_ARGUMENT, "package_id", f"no credit package {package_id!r}"
        )


class PriceBookHistory:
    """Every published version, ordered by `effective_from`.

    Usage is rated with the book in force when it happened, so an event that arrives late is
    priced by the old book even after a new one took effect.
    """

    __slots__ = ("_books", "_starts")

    def __init__(self, books: Iterable[PriceBook] = ()) -> None:
        ordered = sorted(books, key=lambda book: book.effective_from)
        for book in ordered:
            _require_aware(book.effective_from, "effective_from")
        for earlier, later in itertools.pairwise(ordered):
            if earlier.effective_from == later.effective_from:
                raise RatingError(
                    RatingReason.INVALID_ARGUMENT,
                    "effective_from",
                    f"books {earlier.version} and {later.version} take effect at the same time",
                )
        versions = [book.version for book in ordered]
        if len(set(versions)) != len(versions):
            raise RatingError(RatingReason.INVALID_ARGUMENT, "version", "duplicate version")
        self._books: tuple[PriceBook, ...] = tuple(ordered)
        self._starts: tuple[datetime, ...] = tuple(book.effective_from for book in ordered)

    @property
    def books(self) -> tuple[PriceBook, ...]:
        """Every version, oldest first."""
        return self._books

    @property
    def latest(self) -> PriceBook:
        """The version with the latest `effective_from` (it may still be in the future)."""
        if not self._books:
            raise RatingError(RatingReason.PRICE_NOT_FOUND, "price_book", "no price book")
        return self._books[-1]

    def with_book(self, book: PriceBook) -> PriceBookHistory:
        """A new history with `book` added."""
        return PriceBookHistory((*self._books, book))

    def book_at(self, ts: datetime) -> PriceBook:
        """The book in force at `ts`: the latest whose `effective_from` <= `ts`.

        Raises PRICE_NOT_FOUND when `ts` precedes every book.
        """
        _require_aware(ts, "occurred_at")
        index = bisect.bisect_right(self._starts, ts)
        if index == 0:
            raise RatingError(
                RatingReason.PRICE_NOT_FOUND,
                "occurred_at",
                f"no price book was in force at {ts.isoformat()}",
            )
        return self._books[index - 1]

    def version(self, version: str) -> PriceBook:
        """The book with this version; raises PRICE_NOT_FOUND otherwise."""
        for book in self._books:
            if book.version == version:
                return book
        raise RatingError(
            RatingReason.PRICE_NOT_FOUND, "price_book_version", f"no version {version!r}"
        )

    def __len__(self) -> int:
        return len(self._books)


def _require_aware(ts: datetime, field_name: str) -> None:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise RatingError(
            RatingReason.INVALID_ARGUMENT, field_name, "timestamp must be timezone-aware"
        )
