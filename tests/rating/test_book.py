"""Price books over time, models, downgrades and credit packages."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from tally.rating import (
    CreditPackage,
    Meter,
    PackageTier,
    PriceBookHistory,
    PriceLine,
    RatingError,
    RatingReason,
    UsageMode,
    rate,
)

from .books import T0, book, flat

NEW_BOOK_AT = T0 + timedelta(days=30)


def history() -> PriceBookHistory:
    cheaper = [
        PriceLine(
            line.line_id,
            line.meter,
            flat("1"),
            model=line.model,
            mode=line.mode,
            per_units=line.per_units,
        )
        if line.line_id == "chat-1/in"
        else line
        for line in book().lines
    ]
    return PriceBookHistory([book("v2", NEW_BOOK_AT, lines=tuple(cheaper)), book("v1", T0)])


def test_book_at_rates_a_late_event_with_the_book_in_force_when_it_happened() -> None:
    h = history()
    late_event_at = NEW_BOOK_AT - timedelta(microseconds=1)  # arrives after v2 took effect
    old = h.book_at(late_event_at)
    assert old.version == "v1"
    assert rate(old, "chat", UsageMode.ONLINE, "", {Meter.INPUT_TOKENS: 10**6}).total_micros == (
        3_000_000
    )
    new = h.book_at(NEW_BOOK_AT)
    assert new.version == "v2"
    assert rate(new, "chat", UsageMode.ONLINE, "", {Meter.INPUT_TOKENS: 10**6}).total_micros == (
        1_000_000
    )
    assert h.book_at(NEW_BOOK_AT + timedelta(days=400)).version == "v2"
    assert [b.version for b in h.books] == ["v1", "v2"] and h.latest.version == "v2"


def test_book_at_before_the_first_book_is_price_not_found() -> None:
    with pytest.raises(RatingError) as caught:
        history().book_at(T0 - timedelta(seconds=1))
    assert caught.value.reason is RatingReason.PRICE_NOT_FOUND


def test_book_at_refuses_a_naive_timestamp() -> None:
    with pytest.raises(RatingError) as caught:
        history().book_at(datetime(2025, 3, 1))
    assert caught.value.reason is RatingReason.INVALID_ARGUMENT


def test_two_books_taking_effect_at_the_same_instant_are_refused() -> None:
    with pytest.raises(RatingError):
        PriceBookHistory([book("a"), book("b")])


def test_with_book_returns_a_new_history_and_leaves_the_old_one_alone() -> None:
    h = PriceBookHistory([book("v1")])
    later = h.with_book(book("v2", NEW_BOOK_AT))
    assert (len(h), len(later)) == (1, 2)
    assert later.version("v2").effective_from == NEW_BOOK_AT


def test_alias_resolution_and_unknown_model() -> None:
    b = book()
    assert b.resolve_model("chat-latest").model == "chat-1"
    with pytest.raises(RatingError) as caught:
        b.resolve_model("nope")
    assert caught.value.reason is RatingReason.UNKNOWN_MODEL
    assert caught.value.field == "model"


def test_downgrade_map_names_the_cheaper_model_by_canonical_name() -> None:
    b = book()
    assert b.downgrade_map == {"chat-1": "chat-mini"}
    downgrade = b.downgrade_for("chat")
    assert downgrade is not None and downgrade.model == "chat-mini"
    assert b.downgrade_for("chat-mini") is None


def test_credit_package_effective_credits_and_exact_cost_per_credit() -> None:
    package = CreditPackage(
        "team",
        "Team",
        PackageTier.TEAM,
        price_minor=20_000,
        currency="USD",
        credits_micros=20_000 * 10**6,
        bonus_credits_micros=5_000 * 10**6,
    )
    assert package.effective_credits_micros == 25_000 * 10**6
    assert package.cost_per_credit_minor == Decimal("0.8")
    thirds = CreditPackage(
        "x",
        "X",
        PackageTier.INDIVIDUAL,
        price_minor=100,
        currency="USD",
        credits_micros=300 * 10**6,
    )
    assert thirds.cost_per_credit_minor == Decimal("0.333333333333")  # documented rounding


def test_book_at_compares_instants_whatever_the_utc_offset() -> None:
    h = history()
    tokyo = timezone(timedelta(hours=9))
    assert h.book_at(NEW_BOOK_AT.astimezone(tokyo)).version == "v2"
    just_before = (NEW_BOOK_AT - timedelta(microseconds=1)).astimezone(tokyo)
    assert h.book_at(just_before).version == "v1"
