"""The rounding rule: carrying the sub-micro remainder never creates or loses credit."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.rating import (
    ATTOS_PER_MICRO,
    CarryRounder,
    Meter,
    PriceBook,
    PriceLine,
    Tier,
    TierMode,
    UsageMode,
    attos_to_micros_decimal,
    rate,
    rate_lines,
    rate_total,
    rate_with_carry,
    rate_with_carry_attos,
)

from .books import book

ONLINE = UsageMode.ONLINE
SUB_MICRO_GRADUATED = (
    # 1.3, 0.7 and 0.1 micro-credits per unit, after an allowance
    Tier(100, Decimal("0.0000013")),
    Tier(1000, Decimal("0.0000007")),
    Tier(None, Decimal("0.0000001")),
)

# Events with sub-micro exact costs: cached tokens are 0.3 micro each, storage 10 credits.
events = st.lists(
    st.fixed_dictionaries(
        {Meter.CACHED_INPUT_TOKENS: st.integers(0, 50), Meter.INPUT_TOKENS: st.integers(0, 50)}
    ),
    max_size=40,
)
carries = st.integers(0, ATTOS_PER_MICRO - 1)


def graduated_book(included: int) -> PriceBook:
    line = PriceLine(
        "grad",
        Meter.STORAGE_GB_HOURS,
        SUB_MICRO_GRADUATED,
        tier_mode=TierMode.GRADUATED,
        included_quantity=included,
    )
    return book(lines=(line,), models=())


@settings(max_examples=200, deadline=None)
@given(events=events, cuts=st.lists(st.integers(0, 40), max_size=6))
def test_splitting_a_batch_anywhere_and_carrying_between_parts_charges_the_same_total(
    events: list[dict[Meter, int]], cuts: list[int]
) -> None:
    b = book()
    whole: CarryRounder[str] = CarryRounder()
    whole_total = sum(whole.charge(b, "org", "chat", ONLINE, "", e) for e in events)

    # Rate the same events in parts, persisting the carry between parts as metering would.
    state: dict[str, Decimal] = {}
    parts_total = 0
    bounds = sorted({0, len(events), *(c for c in cuts if c <= len(events))})
    for start, end in itertools.pairwise(bounds):
        rounder: CarryRounder[str] = CarryRounder(state)
        parts_total += sum(
            rounder.charge(b, "org", "chat", ONLINE, "", e) for e in events[start:end]
        )
        state = rounder.export()

    assert parts_total == whole_total
    assert state.get("org", Decimal(0)) == whole.carry("org")


@settings(max_examples=200, deadline=None)
@given(events=events, carry=carries)
def test_integer_costs_sum_to_floor_of_exact_costs_and_carry_stays_below_one_micro(
    events: list[dict[Meter, int]], carry: int
) -> None:
    b = book()
    carry_micros = attos_to_micros_decimal(carry)
    exact_sum = Fraction(carry_micros)
    charged = 0
    for usage in events:
        quote, carry_micros = rate_with_carry(b, "chat", ONLINE, "", usage, carry=carry_micros)
        exact_sum += sum(Fraction(line.exact_cost) for line in quote.lines)
        charged += quote.total_micros
        assert quote.total_micros == sum(line.cost_micros for line in quote.lines)
        assert 0 <= carry_micros < 1
    assert charged == math.floor(exact_sum)
    assert Fraction(carry_micros) == exact_sum - charged


@settings(max_examples=300, deadline=None)
@given(
    included=st.integers(0, 300),
    prior=st.integers(0, 1500),
    q1=st.integers(0, 1500),
    q2=st.integers(0, 1500),
    carry=carries,
)
def test_graduated_rating_q1_then_q2_with_prior_equals_rating_q1_plus_q2_at_once(
    included: int, prior: int, q1: int, q2: int, carry: int
) -> None:
    b = graduated_book(included)
    meter = Meter.STORAGE_GB_HOURS
    first, carry1 = rate_with_carry_attos(b, "", ONLINE, "", {meter: q1}, {"grad": prior}, carry)
    second, carry2 = rate_with_carry_attos(
        b, "", ONLINE, "", {meter: q2}, {"grad": prior + q1}, carry1
    )
    once, carry_once = rate_with_carry_attos(
        b, "", ONLINE, "", {meter: q1 + q2}, {"grad": prior}, carry
    )
    assert first.lines[0].exact_cost + second.lines[0].exact_cost == once.lines[0].exact_cost
    assert first.total_micros + second.total_micros == once.total_micros
    assert carry2 == carry_once


@settings(max_examples=200, deadline=None)
@given(usage=events.filter(bool).map(lambda e: e[0]), prior=st.integers(0, 2000), carry=carries)
def test_rate_total_hot_path_agrees_with_the_full_quote(
    usage: dict[Meter, int], prior: int, carry: int
) -> None:
    b = book()
    usage = {**usage, Meter.STORAGE_GB_HOURS: prior % 300, Meter.DATA_OPERATIONS: prior % 70}
    priors = {"storage": prior, "ops": prior}
    quote, quote_carry = rate_with_carry_attos(b, "chat", ONLINE, "eu", usage, priors, carry)
    assert rate_total(b, "chat", ONLINE, "eu", usage, priors, carry) == (
        quote.total_micros,
        quote_carry,
    )


def test_four_events_of_three_tenths_of_a_micro_charge_one_micro_and_carry_the_rest() -> None:
    b = book()
    rounder: CarryRounder[tuple[str, str]] = CarryRounder()
    # 0.3 micro per cached token: 1 token each.
    costs = [
        rounder.charge(b, ("org", "x"), "chat", ONLINE, "", {Meter.CACHED_INPUT_TOKENS: 1})
        for _ in range(4)
    ]
    assert costs == [0, 0, 0, 1]
    assert rounder.carry(("org", "x")) == Decimal("0.2")
    assert rate(b, "chat", ONLINE, "", {Meter.CACHED_INPUT_TOKENS: 1}).total_micros == 0


def test_carry_state_exports_as_decimal_and_restores_exactly() -> None:
    rounder: CarryRounder[str] = CarryRounder()
    assert rounder.take("a", Decimal("2.75")) == 2
    assert rounder.take("a", Decimal("0.5")) == 1
    assert rounder.take("b", Decimal("0.000000000001")) == 0
    state = rounder.export()
    assert state == {"a": Decimal("0.25"), "b": Decimal("1e-12")}
    restored: CarryRounder[str] = CarryRounder(state)
    assert restored.take("a", Decimal("0.75")) == 1
    assert restored.carry("a") == 0
    assert len(restored) == 1


@settings(max_examples=300, deadline=None)
@given(
    usage=st.fixed_dictionaries({}, optional={
        m: st.integers(0, 3000) for m in (
            Meter.INPUT_TOKENS, Meter.OUTPUT_TOKENS, Meter.CACHED_INPUT_TOKENS,
            Meter.STORAGE_GB_HOURS, Meter.BANDWIDTH_GB, Meter.EMBEDDING_READS,
            Meter.DATA_OPERATIONS, Meter.GPU_MINUTES, Meter.CALLS)}),
    prior=st.integers(0, 2000), carry=carries, model=st.sampled_from(["chat", "chat-1", ""]),
    mode=st.sampled_from(list(UsageMode)), region=st.sampled_from(["", "eu", "us"]))
def test_rate_lines_gives_the_receipt_of_the_full_quote(
    usage: dict[Meter, int], prior: int, carry: int, model: str, mode: UsageMode, region: str
) -> None:
    b = book()
    if model == "":  # the model meters have no line for usage of no model
        usage = {m: q for m, q in usage.items() if m not in (
            Meter.INPUT_TOKENS, Meter.OUTPUT_TOKENS)}
    # every line with an allowance or tiers, part used, part crossed by this event
    priors = {"storage": prior, "bandwidth": prior, "reads": prior, "ops": prior}
    quote, quote_carry = rate_with_carry_attos(b, model, mode, region, usage, priors, carry)
    total, lines_carry, resolved, lines = rate_lines(b, model, mode, region, usage, priors,
                                                     carry)
    assert (total, lines_carry, resolved) == (quote.total_micros, quote_carry,
                                              quote.resolved_model)
    assert lines == tuple((q.meter, q.quantity, q.rate, q.per_units, q.cost_micros)
                          for q in quote.lines)
    assert [str(r) for _, _, r, _, _ in lines] == [str(q.rate) for q in quote.lines]
