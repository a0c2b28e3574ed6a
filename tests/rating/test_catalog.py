"""The default catalog and the JSON format behind it."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tally.rating import (
    DEFAULT_CATALOG,
    Meter,
    ModelKind,
    PackageTier,
    RatingError,
    TierMode,
    UsageMode,
    below_cost,
    dump_price_book,
    load_catalog,
    parse_price_book,
    rate,
    validate,
)


def test_default_catalog_loads_and_validates() -> None:
    book = load_catalog()
    assert validate(book) == []
    assert len(book.models) >= 12
    assert len({m.provider for m in book.models}) >= 5


def test_default_catalog_never_prices_below_provider_cost() -> None:
    assert below_cost(load_catalog()) == []


@pytest.mark.parametrize("mode", list(UsageMode))
def test_every_model_in_the_default_catalog_can_be_quoted(mode: UsageMode) -> None:
    book = load_catalog()
    for entry in book.models:
        if entry.kind is ModelKind.CHAT:
            usage = {Meter.INPUT_TOKENS: 1000, Meter.OUTPUT_TOKENS: 500}
        elif entry.kind is ModelKind.EMBEDDING:
            usage = {Meter.INPUT_TOKENS: 1000}
        else:
            usage = {Meter.CALLS: 10}
        if mode is UsageMode.BATCH and entry.kind is not ModelKind.CHAT:
            continue
        quote = rate(book, entry.model, mode, "", usage)
        assert quote.total_micros > 0, entry.model
        assert quote.resolved_model == entry.model


def test_default_catalog_batch_rates_are_half_of_online() -> None:
    book = load_catalog()
    usage = {Meter.INPUT_TOKENS: 10**6, Meter.OUTPUT_TOKENS: 10**6}
    for name in ("gpt-4.1", "claude-sonnet-4", "gemini-2.5-pro"):
        online = rate(book, name, UsageMode.ONLINE, "", usage).total_micros
        batch = rate(book, name, UsageMode.BATCH, "", usage).total_micros
        assert batch * 2 == online


def test_default_catalog_has_the_promised_shapes() -> None:
    book = load_catalog()
    modes = {line.tier_mode for line in book.lines}
    assert {TierMode.GRADUATED, TierMode.VOLUME, TierMode.FLAT} <= modes
    assert any(line.region_multipliers for line in book.lines)
    assert any(line.overage_rate is not None for line in book.lines)
    assert book.resolve_model("gpt-4.1-latest").model == "gpt-4.1"
    assert book.resolve_model("claude-sonnet").model == "claude-sonnet-4"
    assert book.downgrade_map["gpt-4.1"] == "gpt-4.1-mini"
    assert book.downgrade_map["claude-sonnet-4"] == "claude-haiku-3.5"
    tiers = {p.tier: p for p in book.packages}
    assert set(tiers) == set(PackageTier)
    assert tiers[PackageTier.ENTERPRISE].manual_settlement_only
    assert all(p.bonus_credits_micros > 0 for p in book.packages)
    assert not any(p.manual_settlement_only for t, p in tiers.items() if t != "enterprise")


def test_a_quote_for_a_familiar_request_in_the_default_catalog() -> None:
    # gpt-4.1 online: 250 credits per million input, 1000 per million output, 1 credit = 1 cent.
    quote = rate(
        load_catalog(),
        "gpt-4.1",
        UsageMode.ONLINE,
        "",
        {Meter.INPUT_TOKENS: 10_000, Meter.OUTPUT_TOKENS: 1_000},
    )
    assert quote.total_micros == 2_500_000 + 1_000_000  # 3.5 credits = 3.5 cents
    assert quote.provider == "openai"


def test_dump_and_parse_round_trip_the_default_catalog() -> None:
    book = load_catalog()
    text = json.dumps(dump_price_book(book))
    again = parse_price_book(json.loads(text, parse_float=Decimal))
    assert again == book


def test_the_catalog_file_contains_no_json_floats() -> None:
    def no_floats(value: object) -> float:
        raise AssertionError(f"float {value} in catalog")

    json.loads(DEFAULT_CATALOG.read_text(), parse_float=no_floats)


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "book.json"
    path.write_text(json.dumps(data))
    return path


def test_load_catalog_refuses_floats_unknown_keys_and_invalid_books(tmp_path: Path) -> None:
    base = json.loads(DEFAULT_CATALOG.read_text())

    # A JSON number is read as an exact Decimal, never through float ...
    number = json.loads(json.dumps(base))
    number["lines"][0]["tiers"][0]["rate"] = 0.1
    assert load_catalog(write(tmp_path, number)).lines[0].tiers[0].rate == Decimal("0.1")
    # ... and a Python float handed to the parser is refused.
    number["lines"][0]["tiers"][0]["rate"] = 0.1
    with pytest.raises(RatingError, match="float") as caught:
        parse_price_book(number)
    assert caught.value.field == "lines[0].tiers[0].rate"

    typo = json.loads(json.dumps(base))
    typo["lines"][0]["overage_rat"] = "1"
    with pytest.raises(RatingError, match="overage_rat"):
        load_catalog(write(tmp_path, typo))

    invalid = json.loads(json.dumps(base))
    invalid["lines"][0]["tiers"][0]["rate"] = "-1"
    invalid["lines"][1]["per_units"] = 0
    with pytest.raises(RatingError) as caught:
        load_catalog(write(tmp_path, invalid))
    assert "must be >= 0" in caught.value.message and "per_units" in caught.value.message

    with pytest.raises(RatingError):
        load_catalog(tmp_path / "missing.json")
