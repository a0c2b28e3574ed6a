"""Money: exact int64 micro-credits; parsing and formatting round-trip; overflow is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.kit.money import (
    INT64_MAX,
    INT64_MIN,
    MoneyError,
    add,
    format_credits,
    micros,
    mul,
    parse_credits,
    sub,
)

int64s = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.5", 12_500_000),
        ("0.000001", 1),
        ("-3", -3_000_000),
        ("1_000", 1_000_000_000),
        (" 7.250000 ", 7_250_000),
    ],
)
def test_parse_credits(text: str, expected: int) -> None:
    assert parse_credits(text) == expected


@pytest.mark.parametrize("text", ["0.0000001", "abc", "NaN", "inf", "", "1e400"])
def test_parse_refuses_inexact_or_non_numbers(text: str) -> None:
    with pytest.raises(MoneyError):
        parse_credits(text)


def test_format_credits() -> None:
    assert format_credits(12_500_000) == "12.5"
    assert format_credits(1) == "0.000001"
    assert format_credits(-1_000_000) == "-1"
    assert format_credits(0) == "0"


@given(int64s)
def test_format_then_parse_is_identity(amount: int) -> None:
    assert parse_credits(format_credits(amount)) == amount


@given(int64s, int64s)
def test_add_is_exact_or_refused(a: int, b: int) -> None:
    exact = a + b
    if INT64_MIN <= exact <= INT64_MAX:
        assert add(a, b) == exact
        assert sub(exact, b) == a
    else:
        with pytest.raises(MoneyError):
            add(a, b)


@given(int64s, st.integers(min_value=-(10**6), max_value=10**6))
def test_mul_is_exact_or_refused(a: int, k: int) -> None:
    if INT64_MIN <= a * k <= INT64_MAX:
        assert mul(a, k) == a * k
    else:
        with pytest.raises(MoneyError):
            mul(a, k)


def test_micros_refuses_floats_and_bools() -> None:
    with pytest.raises(MoneyError):
        micros(1.5)  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        micros(True)
    with pytest.raises(MoneyError):
        micros(INT64_MAX + 1)
