"""Pricing one event: tier shapes, allowances, overage, modes, regions, aliases, errors."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tally.rating import (
    Meter,
    PriceLine,
    QuoteLine,
    RatingError,
    RatingReason,
    TierMode,
    UsageMode,
    rate,
    rate_total,
    rate_with_carry,
)

from .books import M, book, flat

ONLINE, BATCH = UsageMode.ONLINE, UsageMode.BATCH
CREDIT = 1_000_000  # micros


def one_line(
    meter: Meter, quantity: int, prior: int = 0, region: str = "", model: str = ""
) -> QuoteLine:
    line_id = rate(book(), model, ONLINE, region, {meter: 1}).lines[0].line_id
    quote = rate(book(), model, ONLINE, region, {meter: quantity}, {line_id: prior})
    assert len(quote.lines) == 1
    return quote.lines[0]


# --- flat -------------------------------------------------------------------------------


def test_flat_line_prices_every_unit_at_its_rate_per_million() -> None:
    quote = rate(book(), "chat-1", ONLINE, "", {Meter.INPUT_TOKENS: 1000, Meter.OUTPUT_TOKENS: 10})
    assert [line.cost_micros for line in quote.lines] == [3000, 150]
    assert quote.total_micros == 3150
    assert quote.lines[0].exact_cost == Decimal(3000)
    assert quote.lines[0].rate == Decimal(3) and quote.lines[0].per_units == M


# --- graduated --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "prior", "credits", "tier_index"),
    [
        (100, 0, 1000, 0),  # exactly fills tier 0
        (99, 0, 990, 0),
        (101, 0, 1000 + 5, 1),  # one unit into tier 1
        (50, 80, 20 * 10 + 30 * 5, 1),  # prior usage moves the boundary
        (2000, 0, 1000 + 900 * 5 + 1000 * 2, 2),  # spans all three tiers
        (1, 1000, 2, 2),
        (1, 999, 5, 1),
    ],
)
def test_graduated_prices_each_unit_at_the_tier_its_position_falls_in(
    quantity: int, prior: int, credits: int, tier_index: int
) -> None:
    line = one_line(Meter.STORAGE_GB_HOURS, quantity, prior)
    assert line.cost_micros == credits * CREDIT
    assert line.tier_index == tier_index
    assert line.tier_mode is TierMode.GRADUATED


# --- volume -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "prior", "credits", "tier_index"),
    [
        (100, 0, 100 * 10, 0),
        (101, 0, 101 * 5, 1),  # crossing the boundary re-prices this event's units
        (1000, 0, 1000 * 5, 1),
        (1001, 0, 1001 * 2, 2),
        (20, 90, 20 * 5, 1),  # cumulative 110 reaches tier 1
    ],
)
def test_volume_prices_the_events_units_at_the_tier_the_cumulative_quantity_reaches(
    quantity: int, prior: int, credits: int, tier_index: int
) -> None:
    line = one_line(Meter.BANDWIDTH_GB, quantity, prior)
    assert line.cost_micros == credits * CREDIT
    assert line.tier_index == tier_index


def test_volume_does_not_re_rate_units_charged_by_earlier_events() -> None:
    first = one_line(Meter.BANDWIDTH_GB, 90).cost_micros
    second = one_line(Meter.BANDWIDTH_GB, 20, prior=90).cost_micros
    assert first == 90 * 10 * CREDIT  # stays at tier 0's rate: no refund later
    assert second == 20 * 5 * CREDIT
    assert first + second != one_line(Meter.BANDWIDTH_GB, 110).cost_micros


# --- included allowance and overage -----------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "prior", "included", "credits"),
    [
        (999, 0, 999, 0),  # one below the allowance
        (1000, 0, 1000, 0),  # exactly at it
        (1001, 0, 1000, 4),  # one above: the tier rate applies
        (2, 999, 1, 4),  # the allowance runs out inside the event
        (1, 1000, 0, 4),  # already used up
    ],
)
def test_included_allowance_is_free_and_units_above_it_pay_the_tier_rate(
    quantity: int, prior: int, included: int, credits: int
) -> None:
    line = one_line(Meter.EMBEDDING_READS, quantity, prior)
    assert (line.included_applied, line.cost_micros) == (included, credits * CREDIT)
    assert line.overage_quantity == 0


@pytest.mark.parametrize(
    ("quantity", "prior", "overage", "credits"),
    [
        (999, 0, 0, 0),
        (1000, 0, 0, 0),
        (1001, 0, 1, 7),
        (10, 1000, 10, 70),
        (3, 999, 2, 14),
    ],
)
def test_overage_rate_replaces_the_tier_rate_above_the_allowance(
    quantity: int, prior: int, overage: int, credits: int
) -> None:
    line = one_line(Meter.DATA_OPERATIONS, quantity, prior)
    assert (line.overage_quantity, line.cost_micros) == (overage, credits * CREDIT)
    if overage:
        assert line.rate == Decimal(7)


def test_overage_rate_without_allowance_prices_every_unit() -> None:
    lines = (PriceLine("x", Meter.CALLS, flat("1"), overage_rate=Decimal(3)),)
    quote = rate(book(lines=lines, models=()), "", ONLINE, "", {Meter.CALLS: 2})
    assert quote.total_micros == 6 * CREDIT


# --- modes, regions, models -------------------------------------------------------------


def test_batch_usage_selects_the_batch_line_and_falls_back_to_the_any_mode_line() -> None:
    usage = {Meter.INPUT_TOKENS: 1000, Meter.OUTPUT_TOKENS: 1000, Meter.CACHED_INPUT_TOKENS: 1000}
    online = {line.meter: line.line_id for line in rate(book(), "chat-1", ONLINE, "", usage).lines}
    batch = {line.meter: line.line_id for line in rate(book(), "chat-1", BATCH, "", usage).lines}
    assert online == {
        Meter.INPUT_TOKENS: "chat-1/in",
        Meter.OUTPUT_TOKENS: "chat-1/out",
        Meter.CACHED_INPUT_TOKENS: "any/cached",
    }
    assert batch == {
        Meter.INPUT_TOKENS: "chat-1/in/batch",
        Meter.OUTPUT_TOKENS: "chat-1/out",
        Meter.CACHED_INPUT_TOKENS: "any/cached/batch",
    }


def test_line_lookup_prefers_model_and_mode_then_model_then_shared_mode_then_shared() -> None:
    r = Meter.REASONING_TOKENS
    lines = (
        *book().lines,
        PriceLine("m+mode", r, flat("4"), model="chat-1", mode=BATCH),
        PriceLine("m", r, flat("3"), model="chat-1"),
        PriceLine("mode", r, flat("2"), mode=BATCH),
        PriceLine("shared", r, flat("1")),
    )
    b = book(lines=lines)

    def line_for(model: str, mode: UsageMode) -> str:
        return rate(b, model, mode, "", {r: 1}).lines[0].line_id

    assert line_for("chat-1", BATCH) == "m+mode"
    assert line_for("chat-1", ONLINE) == "m"
    assert line_for("chat-mini", BATCH) == "mode"
    assert line_for("chat-mini", ONLINE) == "shared"


@pytest.mark.parametrize(
    ("region", "credits", "multiplier"),
    [("eu", 3, Decimal("1.5")), ("us", 1, Decimal("0.5")), ("mars", 2, 1), ("", 2, 1)],
)
def test_region_multiplier_scales_the_exact_cost_and_unknown_regions_cost_1x(
    region: str, credits: int, multiplier: Decimal
) -> None:
    line = one_line(Meter.GPU_MINUTES, 1, region=region)
    assert line.cost_micros == credits * CREDIT
    assert line.region_multiplier == multiplier


def test_aliases_resolve_to_the_canonical_model_and_its_provider() -> None:
    for name in ("chat", "chat-latest", "chat-1"):
        quote = rate(book(), name, ONLINE, "", {Meter.INPUT_TOKENS: 1})
        assert (quote.resolved_model, quote.provider, quote.price_book_version) == (
            "chat-1",
            "acme",
            "v1",
        )


def test_usage_without_a_model_uses_only_shared_lines() -> None:
    quote = rate(book(), "", ONLINE, "", {Meter.CALLS: 5})
    assert (quote.resolved_model, quote.provider, quote.total_micros) == ("", "", 5)


def test_quote_lines_come_in_meter_order_and_sum_to_the_total() -> None:
    usage = {Meter.CALLS: 7, Meter.CACHED_INPUT_TOKENS: 5, Meter.INPUT_TOKENS: 3}
    quote = rate(book(), "chat", ONLINE, "", usage)
    assert [line.meter for line in quote.lines] == [
        Meter.INPUT_TOKENS,
        Meter.CACHED_INPUT_TOKENS,
        Meter.CALLS,
    ]
    assert sum(line.cost_micros for line in quote.lines) == quote.total_micros
    assert quote.total_micros == rate_total(book(), "chat", ONLINE, "", usage)[0]


def test_zero_quantity_costs_nothing() -> None:
    assert rate(book(), "chat", ONLINE, "", {Meter.INPUT_TOKENS: 0}).total_micros == 0


# --- errors -----------------------------------------------------------------------------


def reason_of(call: object) -> RatingReason:
    with pytest.raises(RatingError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


def test_unknown_model_is_an_unknown_model_error() -> None:
    b = book()
    assert reason_of(lambda: rate(b, "gpt-9", ONLINE, "", {Meter.INPUT_TOKENS: 1})) == (
        RatingReason.UNKNOWN_MODEL
    )
    assert reason_of(lambda: rate_total(b, "gpt-9", ONLINE, "", {Meter.INPUT_TOKENS: 1})) == (
        RatingReason.UNKNOWN_MODEL
    )


def test_unknown_meter_is_an_unknown_meter_error() -> None:
    b = book()
    usage: dict[Meter, int] = {"furlongs": 1}  # type: ignore[dict-item]
    assert reason_of(lambda: rate(b, "chat", ONLINE, "", usage)) == RatingReason.UNKNOWN_METER
    assert reason_of(lambda: rate_total(b, "chat", ONLINE, "", usage)) == (
        RatingReason.UNKNOWN_METER
    )


def test_a_meter_without_a_line_for_the_model_is_price_not_found() -> None:
    b = book()
    usage = {Meter.REASONING_TOKENS: 1}
    assert reason_of(lambda: rate(b, "chat", ONLINE, "", usage)) == RatingReason.PRICE_NOT_FOUND
    assert reason_of(lambda: rate_total(b, "chat", ONLINE, "", usage)) == (
        RatingReason.PRICE_NOT_FOUND
    )


@pytest.mark.parametrize("quantity", [-1, Decimal(1), True, "3"])
def test_a_quantity_that_is_not_a_non_negative_int_is_invalid(quantity: object) -> None:
    b = book()
    usage: dict[Meter, int] = {Meter.INPUT_TOKENS: quantity}  # type: ignore[dict-item]
    assert reason_of(lambda: rate(b, "chat", ONLINE, "", usage)) == RatingReason.INVALID_ARGUMENT
    assert reason_of(lambda: rate_total(b, "chat", ONLINE, "", usage)) == (
        RatingReason.INVALID_ARGUMENT
    )


@pytest.mark.parametrize("carry", [Decimal(-1), Decimal(1), Decimal("1e-13"), Decimal("NaN")])
def test_a_carry_outside_zero_to_one_micro_is_invalid(carry: Decimal) -> None:
    b = book()
    call = lambda: rate_with_carry(b, "chat", ONLINE, "", {Meter.INPUT_TOKENS: 1}, carry=carry)  # noqa: E731
    assert reason_of(call) == RatingReason.INVALID_ARGUMENT


def test_an_unknown_mode_is_invalid() -> None:
    b = book()
    call = lambda: rate(b, "chat", "realtime", "", {Meter.INPUT_TOKENS: 1})  # type: ignore[arg-type]  # noqa: E731
    assert reason_of(call) == RatingReason.INVALID_ARGUMENT


def test_floats_are_refused_as_rates() -> None:
    with pytest.raises(RatingError):
        PriceLine("x", Meter.CALLS, flat("1"), overage_rate=0.5)  # type: ignore[arg-type]
