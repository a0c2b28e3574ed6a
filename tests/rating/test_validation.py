"""`validate` lists every problem of a bad book at once; `below_cost` flags loss-making rates."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from tally.rating import (
    CreditPackage,
    Meter,
    ModelEntry,
    PackageTier,
    PriceBook,
    PriceLine,
    ProviderCost,
    Tier,
    TierMode,
    UsageMode,
    below_cost,
    validate,
)

from .books import M, book, flat

D = Decimal
G = TierMode.GRADUATED


def bad_book() -> PriceBook:
    lines = (
        PriceLine("a/in", Meter.INPUT_TOKENS, flat("3"), model="a", per_units=M),
        # "a" has no output line.
        PriceLine(
            "desc", Meter.CALLS, (Tier(100, D(1)), Tier(50, D(1)), Tier(None, D(1))), tier_mode=G
        ),
        PriceLine("bounded", Meter.GPU_MINUTES, (Tier(100, D(1)), Tier(200, D(1))), tier_mode=G),
        PriceLine("gap", Meter.BANDWIDTH_GB, (Tier(None, D(1)), Tier(100, D(1))), tier_mode=G),
        PriceLine("neg", Meter.DATA_OPERATIONS, flat("-1"), overage_rate=D(-2)),
        PriceLine("neg", Meter.EMBEDDING_READS, flat("1")),  # duplicate id
        PriceLine("units", Meter.EMBEDDING_WRITES, flat("1"), per_units=0),
        PriceLine("allow", Meter.STORAGE_GB_HOURS, flat("1"), included_quantity=-5),
        PriceLine("flat2", Meter.COMPUTE_VCPU_SECONDS, (Tier(10, D(1)), Tier(None, D(2)))),
        PriceLine("third", Meter.REASONING_TOKENS, flat("1"), per_units=3),
        PriceLine("region", Meter.CACHED_INPUT_TOKENS, flat("1"), region_multipliers={"eu": D(-1)}),
        PriceLine("empty", Meter.OUTPUT_TOKENS, (), model="b"),
        PriceLine("dup-key", Meter.OUTPUT_TOKENS, flat("1"), model="b"),
        PriceLine("ghost", Meter.INPUT_TOKENS, flat("1"), model="ghost"),
        PriceLine("b/in", Meter.INPUT_TOKENS, flat("1"), model="b"),
    )
    models = (
        ModelEntry("a", "p", "pa", downgrade_to="nowhere", fallback_models=("missing", "a")),
        ModelEntry("b", "p", "pb", downgrade_to="c"),
        ModelEntry("c", "p", "pc", downgrade_to="b", aliases=("a",)),
    )
    packages = (
        CreditPackage("p1", "P", PackageTier.TEAM, 0, "usd", 0, -1),
        CreditPackage("p1", "P", PackageTier.TEAM, 100, "USD", 100),
    )
    return book(
        version="",
        effective_from=datetime(2025, 1, 1),
        lines=lines,
        models=models,
        packages=packages,
        costs=(ProviderCost("p", "zzz", Meter.CALLS, D(-1), 0),),
    )


def test_validate_lists_every_problem_in_a_bad_book() -> None:
    problems = validate(bad_book())
    found = {(p.field, p.message.split(" ")[0]) for p in problems}
    messages = "\n".join(f"{p.field}: {p.message}" for p in problems)
    expected_fields = [
        "version",
        "effective_from",
        "models[a]",  # no output_tokens line
        "lines[desc].tiers[1].up_to",  # not ascending (overlap)
        "lines[bounded].tiers[1].up_to",  # last tier bounded (gap to infinity)
        "lines[gap].tiers[0].up_to",  # unbounded tier before the last
        "lines[neg].tiers[0].rate",  # negative rate
        "lines[neg].overage_rate",
        "lines[neg]",  # duplicate line id
        "lines[units].per_units",
        "lines[allow].included_quantity",
        "lines[flat2].tiers",  # flat with two tiers
        "lines[third].tiers[0].rate",  # 1/3 credit per unit is not exact
        "lines[region].region_multipliers[eu]",
        "lines[empty].tiers",
        "lines[b/output_tokens/*]",  # two lines for the same key
        "lines[ghost].model",
        "models[a].downgrade_to",
        "models[a].fallback_models",
        "models[c].aliases",  # alias collides with a model name
        "models[b].downgrade_to",  # b -> c -> b
        "costs[0].model",
        "costs[0].per_units",
        "costs[0].cost_rate",
        "packages[p1]",
        "packages[p1].price_minor",
        "packages[p1].credits_micros",
        "packages[p1].bonus_credits_micros",
        "packages[p1].currency",
    ]
    fields = {field for field, _ in found}
    missing = [f for f in expected_fields if f not in fields]
    assert not missing, f"missing {missing} in:\n{messages}"
    fallback_problems = [p for p in problems if p.field == "models[a].fallback_models"]
    assert len(fallback_problems) == 2  # unknown "missing" and itself
    assert any("cycle" in p.message for p in problems)


def test_a_good_book_has_no_problems() -> None:
    assert validate(book()) == []


def test_below_cost_flags_tiers_overage_and_regions_under_the_provider_cost() -> None:
    lines = (
        *book().lines[:0],
        PriceLine(
            "cheap",
            Meter.INPUT_TOKENS,
            (Tier(10, D(3)), Tier(None, D(1))),
            model="chat-1",
            tier_mode=G,
            per_units=M,
        ),
        PriceLine(
            "out",
            Meter.OUTPUT_TOKENS,
            flat("15"),
            model="chat-1",
            per_units=M,
            overage_rate=D("0.5"),
            included_quantity=10,
            region_multipliers={"promo": D("0.1")},
        ),
    )
    costs = (
        ProviderCost("acme", "chat-1", Meter.INPUT_TOKENS, D(2), M),
        ProviderCost("acme", "chat-1", Meter.OUTPUT_TOKENS, D(2000), 10**8),  # = 20 per M
    )
    b = book(lines=lines, costs=costs, models=book().models[:1])
    warnings = below_cost(b)
    flagged = {(w.line_id, w.tier_index, w.region, w.mode) for w in warnings}
    assert ("cheap", 1, "", UsageMode.ONLINE) in flagged
    assert ("cheap", 0, "", UsageMode.ONLINE) not in flagged
    assert ("out", 0, "", UsageMode.ONLINE) in flagged  # 15 < 20 per million
    assert ("out", -1, "", UsageMode.BATCH) in flagged  # overage 0.5
    assert ("out", 0, "promo", UsageMode.ONLINE) in flagged
    assert all(w.price_per_unit < w.cost_per_unit for w in warnings)


def test_below_cost_is_empty_when_every_rate_covers_the_cost() -> None:
    assert below_cost(book()) == []
