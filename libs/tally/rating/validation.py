"""Checks a price book before it is published: `validate` lists every problem at once, and
`below_cost` lists every price that would sell under what the provider charges us."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

from .exact import unit_attos
from .model import Meter, ModelKind, PriceBook, PriceLine, UsageMode

_CURRENCY: Final = re.compile(r"^[A-Z]{3}$")
_Report = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a price book cannot be published; `field` is a path into the book."""

    field: str
    message: str


@dataclass(frozen=True, slots=True)
class BelowCostWarning:
    """A price below our upstream cost (allowed, e.g. a promotion, but worth a second look).

    Rates are credits per one unit, exact, after the region multiplier (`region` "" = 1x).
    """

    line_id: str
    model: str
    meter: Meter
    mode: UsageMode
    tier_index: int  # -1 for the overage rate
    region: str
    price_per_unit: Fraction
    cost_per_unit: Fraction
    message: str


def validate(book: PriceBook) -> list[Problem]:
    """Every problem in `book`; an empty list means it can be published."""
    problems: list[Problem] = []

    def problem(field: str, message: str) -> None:
        problems.append(Problem(field, message))

    if not book.version.strip():
        problem("version", "a price book needs a version")
    if book.effective_from.tzinfo is None or book.effective_from.utcoffset() is None:
        problem("effective_from", "must be timezone-aware")

    # Models, names and aliases.
    names = Counter(entry.model for entry in book.models)
    for name, count in names.items():
        if count > 1:
            problem(f"models[{name}]", f"model {name!r} is defined {count} times")
    seen_alias: dict[str, str] = {}
    for entry in book.models:
        where = f"models[{entry.model}]"
        if not entry.model.strip():
            problem(where, "model name is empty")
        if not entry.provider.strip():
            problem(f"{where}.provider", "provider is empty")
        if not entry.provider_model.strip():
            problem(f"{where}.provider_model", "provider_model is empty")
        if entry.max_context_tokens < 0:
            problem(f"{where}.max_context_tokens", "must be >= 0 (0 = no limit)")
        for alias in entry.aliases:
            if alias in names:
                problem(f"{where}.aliases", f"alias {alias!r} is also a model name")
            elif alias in seen_alias and seen_alias[alias] != entry.model:
                problem(
                    f"{where}.aliases",
                    f"alias {alias!r} also names {seen_alias[alias]!r}",
                )
            seen_alias.setdefault(alias, entry.model)
        for fallback in entry.fallback_models:
            if not book.has_model(fallback):
                problem(f"{where}.fallback_models", f"unknown fallback model {fallback!r}")
            elif book.resolve_model(fallback).model == entry.model:
                problem(f"{where}.fallback_models", "a model cannot fall back to itself")
        if entry.downgrade_to is not None:
            if not book.has_model(entry.downgrade_to):
                problem(f"{where}.downgrade_to", f"unknown downgrade model {entry.downgrade_to!r}")
            elif book.resolve_model(entry.downgrade_to).model == entry.model:
                problem(f"{where}.downgrade_to", "a model cannot downgrade to itself")
    _check_downgrade_cycles(book, problem)

    # Lines.
    ids = Counter(line.line_id for line in book.lines)
    for line_id, count in ids.items():
        if count > 1:
            problem(f"lines[{line_id}]", f"line id {line_id!r} is used {count} times")
    keys = Counter(line.key for line in book.lines)
    for (model, meter, mode), count in keys.items():
        if count > 1:
            problem(
                f"lines[{model or '*'}/{meter}/{mode or '*'}]",
                f"{count} lines price {meter} for {model or 'all models'} in "
                f"{mode or 'any mode'}; lookup would be ambiguous",
            )
    for line in book.lines:
        _check_line(book, line, problem)

    # Every chat model must be quotable for input and output online; others for something.
    for entry in book.models:
        if entry.kind is ModelKind.CHAT:
            for meter in (Meter.INPUT_TOKENS, Meter.OUTPUT_TOKENS):
                if book.find_line(entry.model, meter, UsageMode.ONLINE) is None:
                    problem(
                        f"models[{entry.model}]",
                        f"chat model has no online {meter} line",
                    )
        elif not any(line.model == entry.model for line in book.lines):
            problem(f"models[{entry.model}]", f"{entry.kind} model has no price line")

    # Provider costs.
    for index, cost in enumerate(book.costs):
        where = f"costs[{index}]"
        if cost.model and not book.has_model(cost.model):
            problem(f"{where}.model", f"unknown model {cost.model!r}")
        if cost.per_units <= 0:
            problem(f"{where}.per_units", "must be > 0")
        if cost.cost_rate < 0:
            problem(f"{where}.cost_rate", "must be >= 0")

    # Credit packages.
    package_ids = Counter(package.package_id for package in book.packages)
    for package_id, count in package_ids.items():
        if count > 1:
            problem(f"packages[{package_id}]", f"package id is used {count} times")
    for package in book.packages:
        where = f"packages[{package.package_id}]"
        if package.price_minor <= 0:
            problem(f"{where}.price_minor", "must be > 0")
        if package.credits_micros <= 0:
            problem(f"{where}.credits_micros", "must be > 0")
        if package.bonus_credits_micros < 0:
            problem(f"{where}.bonus_credits_micros", "must be >= 0")
        if not _CURRENCY.match(package.currency):
            problem(f"{where}.currency", "must be an ISO 4217 code such as USD")
    return problems


def _check_line(book: PriceBook, line: PriceLine, problem: _Report) -> None:
    where = f"lines[{line.line_id}]"
    if not line.line_id.strip():
        problem(where, "line id is empty")
    if line.model and not book.has_model(line.model):
        problem(f"{where}.model", f"unknown model {line.model!r}")
    elif line.model and book.resolve_model(line.model).model != line.model:
        problem(f"{where}.model", "lines name the canonical model, not an alias")
    if line.per_units <= 0:
        problem(f"{where}.per_units", "must be > 0")
    if line.included_quantity < 0:
        problem(f"{where}.included_quantity", "allowance must be >= 0")
    tiers = line.tiers
    if not tiers:
        problem(f"{where}.tiers", "a line needs at least one tier")
    if line.tier_mode == "flat" and len(tiers) > 1:
        problem(f"{where}.tiers", "a flat line has exactly one tier")
    previous: int | None = 0
    for index, tier in enumerate(tiers):
        at = f"{where}.tiers[{index}]"
        if tier.rate < 0:
            problem(f"{at}.rate", "rate must be >= 0")
        is_last = index == len(tiers) - 1
        if tier.up_to is None:
            if not is_last:
                problem(f"{at}.up_to", "only the last tier may be unbounded")
        else:
            if previous is not None and tier.up_to <= previous:
                problem(
                    f"{at}.up_to",
                    f"tiers must ascend: up_to {tier.up_to} overlaps the previous tier "
                    f"(up_to {previous})",
                )
            if is_last:
                problem(f"{at}.up_to", "the last tier must be unbounded (up_to null)")
        previous = tier.up_to if tier.up_to is not None else previous
    rates = [(f"{where}.tiers[{i}].rate", tier.rate) for i, tier in enumerate(tiers)]
    if line.overage_rate is not None:
        if line.overage_rate < 0:
            problem(f"{where}.overage_rate", "rate must be >= 0")
        rates.append((f"{where}.overage_rate", line.overage_rate))
    for region, multiplier in line.region_multipliers.items():
        if multiplier < 0:
            problem(f"{where}.region_multipliers[{region}]", "multiplier must be >= 0")
    if line.per_units > 0:
        multipliers = [Decimal(1), *line.region_multipliers.values()]
        for field, rate in rates:
            if rate < 0:
                continue
            if any(unit_attos(rate, line.per_units, m) is None for m in multipliers):
                problem(
                    field,
                    f"{rate} per {line.per_units} units (after region multipliers) is not a "
                    "whole number of attocredits (1e-18 credit) per unit; costs would not be exact",
                )


def _check_downgrade_cycles(book: PriceBook, problem: _Report) -> None:
    downgrades = book.downgrade_map
    reported: set[str] = set()
    for start in downgrades:
        path = [start]
        current = start
        while current in downgrades:
            current = downgrades[current]
            if current in path:
                cycle = path[path.index(current) :]
                if not reported & set(cycle):
                    problem(
                        f"models[{start}].downgrade_to",
                        "downgrades form a cycle: " + " -> ".join([*cycle, current]),
                    )
                    reported.update(cycle)
                break
            path.append(current)


def below_cost(book: PriceBook) -> list[BelowCostWarning]:
    """Every (line, tier or overage rate, region) whose price per unit is below the provider
    cost per unit for the same model, meter and mode."""
    warnings: list[BelowCostWarning] = []
    models = [entry.model for entry in book.models] + [""]
    for model in models:
        for meter in Meter:
            for mode in UsageMode:
                cost = book.provider_cost(model, meter, mode)
                line = book.find_line(model, meter, mode)
                if cost is None or line is None or line.per_units <= 0 or cost.per_units <= 0:
                    continue
                cost_per_unit = Fraction(cost.cost_rate) / cost.per_units
                rates = [(i, tier.rate) for i, tier in enumerate(line.tiers)]
                if line.overage_rate is not None:
                    rates.append((-1, line.overage_rate))
                regions = [("", Decimal(1)), *line.region_multipliers.items()]
                for tier_index, rate in rates:
                    for region, multiplier in regions:
                        price = Fraction(rate) * Fraction(multiplier) / line.per_units
                        if price < cost_per_unit:
                            what = "overage rate" if tier_index < 0 else f"tier {tier_index}"
                            warnings.append(
                                BelowCostWarning(
                                    line_id=line.line_id,
                                    model=model,
                                    meter=meter,
                                    mode=mode,
                                    tier_index=tier_index,
                                    region=region,
                                    price_per_unit=price,
                                    cost_per_unit=cost_per_unit,
                                    message=(
                                        f"{line.line_id} {what}"
                                        f"{' in ' + region if region else ''}: "
                                        f"{rate} per {line.per_units} is below provider cost "
                                        f"{cost.cost_rate} per {cost.per_units} for "
                                        f"{model or 'shared'} {meter} ({mode})"
                                    ),
                                )
                            )
    return warnings
