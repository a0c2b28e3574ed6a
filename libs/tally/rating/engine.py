"""Rating: turn usage quantities into an exact cost under a price book.

Pure functions over immutable books; the caller keeps the period state (`prior`: units
already consumed this period per line) and the rounding carry.

The rounding rule (DESIGN §3) — one rule, everywhere:

    Exact costs are integers of attocredits (1e-18 credit; 10**12 per micro-credit). Along
    one accumulator key (whatever the caller chooses: an org, an (org, line) pair, ...) a
    running carry of 0 <= carry < 1 micro-credit is kept. Each cost charged is
    floor(carry + exact) micro-credits and the new carry is (carry + exact) - charged.
    Within one event the carry threads through its lines in `Meter` declaration order.

So for any sequence of events on one key, sum(charged) == floor(carry_0 + sum(exact)) and the
final carry is the sub-micro remainder: no credit is created or lost, however the events are
batched, as long as the carry is persisted with the key. `rate()` is the same rule starting
from a zero carry and discarding the final one (a quote, not a debit).

Tier semantics, with `p` = units of the line already consumed this period and `q` = this
event's units (positions p .. p+q-1):

- the first `included_quantity` positions of the period are free;
- above them `overage_rate`, when set, prices every unit instead of the tiers;
- flat: one rate; graduated: each unit at the tier its position falls in (tier i covers
  positions from the previous `up_to` to its own `up_to`, exclusive), so rating q1 then q2
  with prior equals rating q1+q2 at once;
- volume: this event's chargeable units are all priced at the tier the cumulative quantity
  p+q reaches. Units already charged by earlier events are *not* re-rated when a later event
  crosses into a cheaper tier: a prepaid debit is final and never turns into a refund. The
  period total therefore depends on how usage was split into events (a bill-at-period-end
  system would re-rate; real-time prepaid debiting cannot).

Exactness: a line's unit price after its region multiplier must be a whole number of
attocredits (`validate` checks; e.g. 0.15 credits per 1,000,000 tokens is 150,000 attocredits
per token). Then every cost is an int and no step rounds except the floor above.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Generic, TypeVar

from tally.kit.money import INT64_MAX, Micros

from .errors import RatingError, RatingReason
from .exact import ATTOS_PER_MICRO, attos_to_micros_decimal, micros_decimal_to_attos, unit_attos
from .model import Meter, ModelEntry, PriceBook, PriceLine, TierMode, UsageMode

_METER_ORDER: Final[Mapping[str, int]] = {meter: i for i, meter in enumerate(Meter)}
_ONE: Final = Decimal(1)
# Namespaces compiled lines in the book's memo, apart from (model, mode, region) plans.
_COMPILED_LINE: Final = object()


@dataclass(frozen=True, slots=True)
class QuoteLine:
    """How one meter of one event was priced.

    `rate` is the rate (credits per `per_units`) of the last unit charged: the overage rate
    when `overage_quantity` > 0, else the rate of tier `tier_index` (for a graduated line
    spanning tiers, the highest tier reached). `exact_cost` is in micro-credits, unrounded;
    `cost_micros` is what the rounding rule charged for this line.
    """

    meter: Meter
    quantity: int
    line_id: str
    rate: Decimal
    per_units: int
    tier_index: int
    tier_mode: TierMode
    included_applied: int
    overage_quantity: int
    region_multiplier: Decimal
    exact_cost: Decimal
    cost_micros: int


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of one event (or estimate): `total_micros` == sum of the lines' `cost_micros`."""

    total_micros: int
    lines: tuple[QuoteLine, ...]
    price_book_version: str
    resolved_model: str
    provider: str


class _CompiledLine:
    """One price line in one region, with every rate turned into integer attocredits/unit."""

    __slots__ = (
        "bounds",
        "included",
        "line",
        "line_id",
        "meter",
        "multiplier",
        "overage_attos",
        "simple_attos",
        "tier_attos",
        "tier_mode",
    )

    def __init__(self, line: PriceLine, region: str) -> None:
        self.line = line
        self.line_id = line.line_id
        self.meter = line.meter
        self.tier_mode = line.tier_mode
        self.multiplier = line.region_multipliers.get(region, _ONE)
        self.included = line.included_quantity
        if not line.tiers:
            raise _invalid(line, "tiers", "a line needs at least one tier")
        self.bounds = tuple(tier.up_to for tier in line.tiers)
        self.tier_attos = tuple(self._attos(tier.rate, "tiers") for tier in line.tiers)
        self.overage_attos = (
            None if line.overage_rate is None else self._attos(line.overage_rate, "overage_rate")
        )
        # Fast path: every unit of every event costs the same.
        self.simple_attos: int | None = None
        if self.included == 0:
            if self.overage_attos is not None:
                self.simple_attos = self.overage_attos
            elif self.tier_mode is TierMode.FLAT or len(self.tier_attos) == 1:
                self.simple_attos = self.tier_attos[0]

    def _attos(self, rate: Decimal, field_name: str) -> int:
        attos = unit_attos(rate, self.line.per_units, self.multiplier)
        if attos is None or attos < 0:
            raise _invalid(
                self.line,
                field_name,
                "unit price must be a non-negative whole number of attocredits (1e-18 credit)",
            )
        return attos

    def price(self, quantity: int, prior: int) -> tuple[int, int, int, int]:
        """(exact attocredits, tier index, included units, overage units) for `quantity`
        units after `prior` units this period."""
        end = prior + quantity
        start = prior
        free = 0
        if self.included > prior:
            free = min(end, self.included) - prior
            start = prior + free
        chargeable = end - start
        bounds = self.bounds
        if self.overage_attos is not None:
            return (chargeable * self.overage_attos, self._tier_of(end), free, chargeable)
        if self.tier_mode is TierMode.GRADUATED and len(bounds) > 1:
            attos = 0
            lower = 0
            index = 0
            for index, upper in enumerate(bounds):
                if upper is None or upper > start:
                    top = end if upper is None or upper > end else upper
                    bottom = start if start > lower else lower
                    if top > bottom:
                        attos += (top - bottom) * self.tier_attos[index]
                if upper is None or upper >= end:
                    break
                lower = upper
            return (attos, index if chargeable else self._tier_of(end), free, 0)
        index = self._tier_of(end) if self.tier_mode is not TierMode.FLAT else 0
        return (chargeable * self.tier_attos[index], index, free, 0)

    def _tier_of(self, cumulative: int) -> int:
        """The tier that the `cumulative`-th unit of the period falls in."""
        for index, upper in enumerate(self.bounds):
            if upper is None or cumulative <= upper:
                return index
        return len(self.bounds) - 1


class _Plan:
    """Everything needed to rate one (model, mode, region): the compiled line per meter."""

    __slots__ = ("entry", "lines", "model", "provider")

    def __init__(self, book: PriceBook, model: str, mode: UsageMode, region: str) -> None:
        self.entry: ModelEntry | None = book.resolve_model(model) if model else None
        self.model = self.entry.model if self.entry else ""
        self.provider = self.entry.provider if self.entry else ""
        self.lines: dict[str, _CompiledLine] = {}
        for meter in Meter:
            line = book.find_line(self.model, meter, mode)
            if line is not None:
                self.lines[meter] = _compiled_line(book, line, region)


def _compiled_line(book: PriceBook, line: PriceLine, region: str) -> _CompiledLine:
    key = (_COMPILED_LINE, line.line_id, region)
    compiled = book._plans.get(key)
    if compiled is None or compiled.line is not line:
        compiled = _CompiledLine(line, region)
        book._plans[key] = compiled
    return compiled


def _plan_of(book: PriceBook, model: str, mode: UsageMode, region: str) -> _Plan:
    """The compiled plan for (model, mode, region), compiled once per book; a region not
    priced specially is the default one."""
    if region not in book._regions:
        region = ""
    plan: _Plan | None = book._plans.get((model, mode, region))
    return plan if plan is not None else _plan(book, model, mode, region)


def _plan(book: PriceBook, model: str, mode: UsageMode, region: str) -> _Plan:
    try:
        mode = UsageMode(mode)
    except ValueError:
        raise RatingError(
            RatingReason.INVALID_ARGUMENT, "mode", f"{mode!r} is not a usage mode"
        ) from None
    plan = _Plan(book, model, mode, region)
    book._plans[(model, mode, region)] = plan
    return plan


def _first(item: tuple[int, int, _CompiledLine]) -> int:
    return item[0]


def _invalid(line: PriceLine, field_name: str, message: str) -> RatingError:
    return RatingError(
        RatingReason.INVALID_ARGUMENT, f"lines[{line.line_id}].{field_name}", message
    )


def _bad_entry(book: PriceBook, plan: _Plan, mode: str, meter: object, quantity: object) -> None:
    """Raises the right error for a quantity the hot loop refused."""
    if meter not in _METER_ORDER:
        raise RatingError(RatingReason.UNKNOWN_METER, "quantities", f"unknown meter {meter!r}")
    if quantity.__class__ is not int or quantity < 0:
        raise RatingError(
            RatingReason.INVALID_ARGUMENT,
            f"quantities[{meter}]",
            f"quantity must be a non-negative integer, got {quantity!r}",
        )
    raise RatingError(
        RatingReason.PRICE_NOT_FOUND,
        f"quantities[{meter}]",
        f"price book {book.version} has no {mode} price for {meter} on "
        f"{plan.model or 'usage without a model'}",
    )


def _check_carry(carry_attos: int) -> None:
    if not 0 <= carry_attos < ATTOS_PER_MICRO:
        raise RatingError(
            RatingReason.INVALID_ARGUMENT, "carry", "carry must be in [0, 1) micro-credit"
        )


def _too_large(total_micros: int) -> RatingError:
    return RatingError(
        RatingReason.INVALID_ARGUMENT, "quantities", f"cost {total_micros} exceeds int64 micros"
    )


def rate_total(
    book: PriceBook,
    model: str,
    mode: UsageMode,
    region: str,
    quantities: Mapping[Meter, int],
    prior: Mapping[str, int] | None = None,
    carry_attos: int = 0,
) -> tuple[int, int]:
    """The hot path: (charged micro-credits, new carry in attocredits) for one event.

    Same rule and same total as `rate_with_carry`, without building a `Quote`. `model` is a
    model or alias ("" for usage that belongs to no model, e.g. storage); `region` not
    priced specially costs 1x.
    """
    plan = _plan_of(book, model, mode, region)
    if not 0 <= carry_attos < ATTOS_PER_MICRO:
        _check_carry(carry_attos)
    lines = plan.lines
    total = carry_attos
    for meter, quantity in quantities.items():
        compiled = lines.get(meter)
        if compiled is None or quantity.__class__ is not int or quantity < 0:
            _bad_entry(book, plan, mode, meter, quantity)
            continue  # unreachable: _bad_entry raises
        unit = compiled.simple_attos
        if unit is not None:
            total += quantity * unit
        else:
            total += compiled.price(quantity, prior.get(compiled.line_id, 0) if prior else 0)[0]
    cost, carry = divmod(total, ATTOS_PER_MICRO)
    if cost > INT64_MAX:
        raise _too_large(cost)
    return cost, carry


def rate_with_carry_attos(
    book: PriceBook,
    model: str,
    mode: UsageMode,
    region: str,
    quantities: Mapping[Meter, int],
    prior: Mapping[str, int] | None = None,
    carry_attos: int = 0,
) -> tuple[Quote, int]:
    """`rate_with_carry` with the carry as an integer of attocredits (0 <= carry < 10**12)."""
    plan = _plan_of(book, model, mode, region)
    _check_carry(carry_attos)
    priced: list[tuple[int, int, _CompiledLine]] = []
    for meter, quantity in quantities.items():
        compiled = plan.lines.get(meter)
        if compiled is None or quantity.__class__ is not int or quantity < 0:
            _bad_entry(book, plan, mode, meter, quantity)
            continue
        priced.append((_METER_ORDER[meter], quantity, compiled))
    priced.sort(key=_first)
    carry = carry_attos
    total_micros = 0
    quote_lines: list[QuoteLine] = []
    for _, quantity, compiled in priced:
        prior_units = prior.get(compiled.line_id, 0) if prior else 0
        if prior_units.__class__ is not int or prior_units < 0:
            raise RatingError(
                RatingReason.INVALID_ARGUMENT,
                f"prior[{compiled.line_id}]",
                "prior usage must be a non-negative integer",
            )
        attos, tier_index, free, overage = compiled.price(quantity, prior_units)
        cost_micros, carry = divmod(carry + attos, ATTOS_PER_MICRO)
        total_micros += cost_micros
        line = compiled.line
        rate = (
            line.overage_rate
            if overage and line.overage_rate is not None
            else line.tiers[tier_index].rate
        )
        quote_lines.append(
            QuoteLine(  # positional: this runs per line of every quote
                compiled.meter,
                quantity,
                compiled.line_id,
                rate,
                line.per_units,
                tier_index,
                compiled.tier_mode,
                free,
                overage,
                compiled.multiplier,
                attos_to_micros_decimal(attos),
                cost_micros,
            )
        )
    if total_micros > INT64_MAX:
        raise _too_large(total_micros)
    quote = Quote(
        total_micros=total_micros,
        lines=tuple(quote_lines),
        price_book_version=book.version,
        resolved_model=plan.model,
        provider=plan.provider,
    )
    return quote, carry


PricedLine = tuple[Meter, int, Decimal, int, int]
"""(meter, quantity, rate, per_units, cost_micros) of one line: `QuoteLine`'s receipt part."""


def rate_lines(
    book: PriceBook,
    model: str,
    mode: UsageMode,
    region: str,
    quantities: Mapping[Meter, int],
    prior: Mapping[str, int] | None = None,
    carry_attos: int = 0,
) -> tuple[int, int, str, tuple[PricedLine, ...]]:
    """What a receipt shows, for metering's hot path: (charged micro-credits, new carry in
    attocredits, resolved model, the lines in meter order). The same rule and the same
    figures as `rate_with_carry_attos`, without a `Quote`'s objects and exact decimals."""
    plan = _plan_of(book, model, mode, region)
    if not 0 <= carry_attos < ATTOS_PER_MICRO:
        _check_carry(carry_attos)
    lines = plan.lines
    priced: list[tuple[int, int, _CompiledLine]] = []
    for meter, quantity in quantities.items():
        compiled = lines.get(meter)
        if compiled is None or quantity.__class__ is not int or quantity < 0:
            _bad_entry(book, plan, mode, meter, quantity)
            continue  # unreachable: _bad_entry raises
        priced.append((_METER_ORDER[meter], quantity, compiled))
    if len(priced) > 1:
        priced.sort(key=_first)
    carry = carry_attos
    total_micros = 0
    out: list[PricedLine] = []
    for _, quantity, compiled in priced:
        line = compiled.line
        if compiled.simple_attos is not None and line.overage_rate is None:
            # one rate for every unit: tier 0's (an overage line names its tier by position)
            attos = quantity * compiled.simple_attos
            rate = line.tiers[0].rate
        else:
            prior_units = prior.get(compiled.line_id, 0) if prior else 0
            if prior_units.__class__ is not int or prior_units < 0:
                raise RatingError(
                    RatingReason.INVALID_ARGUMENT,
                    f"prior[{compiled.line_id}]",
                    "prior usage must be a non-negative integer",
                )
            attos, tier_index, _, overage = compiled.price(quantity, prior_units)
            rate = (
                line.overage_rate
                if overage and line.overage_rate is not None
                else line.tiers[tier_index].rate
            )
        cost_micros, carry = divmod(carry + attos, ATTOS_PER_MICRO)
        total_micros += cost_micros
        out.append((compiled.meter, quantity, rate, line.per_units, cost_micros))
    if total_micros > INT64_MAX:
        raise _too_large(total_micros)
    return total_micros, carry, plan.model, tuple(out)


def rate_with_carry(
    book: PriceBook,
    model: str,
    mode: UsageMode,
    region: str,
    quantities: Mapping[Meter, int],
    prior: Mapping[str, int] | None = None,
    carry: Decimal = Decimal(0),
) -> tuple[Quote, Decimal]:
    """Prices one event and applies the rounding rule from `carry` (micro-credits, in
    [0, 1)); returns the quote and the new carry to persist with the accumulator key.

    Raises RatingError: UNKNOWN_MODEL, UNKNOWN_METER, PRICE_NOT_FOUND (no line for a meter
    in this mode), INVALID_ARGUMENT (negative quantity, bad carry, unrepresentable rate).
    """
    carry_attos = micros_decimal_to_attos(carry)
    if carry_attos is None:
        raise RatingError(
            RatingReason.INVALID_ARGUMENT, "carry", "carry is finer than 1e-12 micro-credit"
        )
    quote, new_carry = rate_with_carry_attos(
        book, model, mode, region, quantities, prior, carry_attos
    )
    return quote, attos_to_micros_decimal(new_carry)


def rate(
    book: PriceBook,
    model: str,
    mode: UsageMode,
    region: str,
    quantities: Mapping[Meter, int],
    prior: Mapping[str, int] | None = None,
) -> Quote:
    """Prices one event (or an estimate) line by line, from a zero carry.

    `prior` maps line_id -> units already consumed this period (for allowances and tiers).
    For debits, use `rate_with_carry` or `CarryRounder` so sub-micro remainders carry over.
    """
    return rate_with_carry_attos(book, model, mode, region, quantities, prior, 0)[0]


K = TypeVar("K", bound=Hashable)


class CarryRounder(Generic[K]):
    """The rounding rule's state: a carry (0 <= carry < 1 micro-credit) per accumulator key.

    Metering persists `export()` with its period state and passes it back to the
    constructor on restart; for any sequence of costs on one key, the micro-credits charged
    sum to floor(initial carry + sum of exact costs).
    """

    __slots__ = ("_carry",)

    def __init__(self, state: Mapping[K, Decimal] | None = None) -> None:
        self._carry: dict[K, int] = {}
        for key, value in (state or {}).items():
            attos = micros_decimal_to_attos(value)
            if attos is None or not 0 <= attos < ATTOS_PER_MICRO:
                raise RatingError(
                    RatingReason.INVALID_ARGUMENT,
                    "carry",
                    f"carry for {key!r} must be in [0, 1) micro-credit at 1e-12 resolution",
                )
            if attos:
                self._carry[key] = attos

    def take_attos(self, key: K, exact_attos: int) -> int:
        """Charges an exact cost in attocredits on `key`; returns whole micro-credits."""
        if exact_attos < 0:
            raise RatingError(RatingReason.INVALID_ARGUMENT, "exact_cost", "cost is negative")
        cost, carry = divmod(self._carry.get(key, 0) + exact_attos, ATTOS_PER_MICRO)
        self._carry[key] = carry
        return cost

    def take(self, key: K, exact_micros: Decimal) -> Micros:
        """Charges an exact cost in micro-credits (e.g. `QuoteLine.exact_cost`) on `key`."""
        attos = micros_decimal_to_attos(exact_micros)
        if attos is None:
            raise RatingError(
                RatingReason.INVALID_ARGUMENT, "exact_cost", "cost is finer than 1e-12 micro"
            )
        return Micros(self.take_attos(key, attos))

    def charge(
        self,
        book: PriceBook,
        key: K,
        model: str,
        mode: UsageMode,
        region: str,
        quantities: Mapping[Meter, int],
        prior: Mapping[str, int] | None = None,
    ) -> int:
        """`rate_total` on `key`'s carry: the micro-credits to debit for one event."""
        cost, carry = rate_total(
            book, model, mode, region, quantities, prior, self._carry.get(key, 0)
        )
        self._carry[key] = carry
        return cost

    def rate(
        self,
        book: PriceBook,
        key: K,
        model: str,
        mode: UsageMode,
        region: str,
        quantities: Mapping[Meter, int],
        prior: Mapping[str, int] | None = None,
    ) -> Quote:
        """`rate_with_carry` on `key`'s carry: the full quote of one event, carry kept."""
        quote, carry = rate_with_carry_attos(
            book, model, mode, region, quantities, prior, self._carry.get(key, 0)
        )
        self._carry[key] = carry
        return quote

    def carry(self, key: K) -> Decimal:
        """The sub-micro remainder held for `key`, in micro-credits."""
        return attos_to_micros_decimal(self._carry.get(key, 0))

    def carry_attos(self, key: K) -> int:
        """The remainder held for `key`, in attocredits."""
        return self._carry.get(key, 0)

    def export(self) -> dict[K, Decimal]:
        """Every non-zero carry, in micro-credits, for persisting."""
        return {key: attos_to_micros_decimal(a) for key, a in self._carry.items() if a}

    def __len__(self) -> int:
        return sum(1 for a in self._carry.values() if a)
