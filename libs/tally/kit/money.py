"""Exact money: integer micro-credits.

One credit is 1,000,000 micro-credits. Every amount that touches a balance is a `Micros`
(an `int` subtype, so it costs nothing at run time) bounded to int64, because that is what the
proto fields and the database columns hold. Floats never enter: parsing goes through `Decimal`
and refuses anything that is not an exact number of micro-credits.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Final, NewType

MICROS_PER_CREDIT: Final = 1_000_000
INT64_MAX: Final = 2**63 - 1
INT64_MIN: Final = -(2**63)

Micros = NewType("Micros", int)
"""An exact amount of micro-credits, within int64."""


class MoneyError(ValueError):
    """An amount that cannot be represented exactly as int64 micro-credits."""


def micros(value: int) -> Micros:
    """Checks that `value` fits int64 and returns it as `Micros`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoneyError(f"micro-credits must be an integer, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise MoneyError(f"{value} micro-credits is outside int64")
    return Micros(value)


def add(*amounts: int) -> Micros:
    """Sums amounts, refusing a result outside int64 (Python ints never overflow silently)."""
    return micros(sum(amounts))


def sub(a: int, b: int) -> Micros:
    """`a - b`, refusing a result outside int64."""
    return micros(a - b)


def mul(amount: int, factor: int) -> Micros:
    """`amount * factor` for an integer factor, refusing a result outside int64."""
    return micros(amount * factor)


def parse_credits(text: str) -> Micros:
    """Parses a credit amount such as "12.5" or "-0.000001" into micro-credits.

    More than six decimal places is an error rather than a rounding: an amount typed by a
    person or sent by a client is either exact or wrong.
    """
    cleaned = text.strip().replace("_", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise MoneyError(f"{text!r} is not a number of credits") from None
    if not value.is_finite():
        raise MoneyError(f"{text!r} is not a finite number of credits")
    scaled = value * MICROS_PER_CREDIT
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"{text!r} has more than 6 decimal places (1 micro-credit is 0.000001)")
    return micros(int(scaled))


def format_credits(amount: int) -> str:
    """Formats micro-credits as credits with no trailing zeros: 12_500_000 -> "12.5"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICROS_PER_CREDIT)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def floor_decimal_to_micros(value: Decimal) -> Micros:
    """Rounds a non-negative decimal amount of micro-credits down to an integer.

    Used by rating, which carries the remainder forward so nothing is lost across a batch.
    """
    return micros(int(value.to_integral_value(rounding=ROUND_FLOOR)))


# --- real money (payments): integer minor units of an ISO 4217 currency ----------------------

_ZERO_DECIMAL: Final = frozenset({"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG",
                                  "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"})
_THREE_DECIMAL: Final = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})


def minor_digits(currency: str) -> int:
    """Decimal places of a currency's minor unit (ISO 4217): JPY 0, USD 2, KWD 3."""
    code = currency.upper()
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


def format_money(amount_minor: int, currency: str) -> str:
    """Minor units as an amount of money: 2500, "usd" -> "USD 25.00"."""
    code = currency.upper()
    places = minor_digits(code)
    if places == 0:
        return f"{code} {amount_minor:,}"
    whole, frac = divmod(abs(amount_minor), 10**places)
    sign = "-" if amount_minor < 0 else ""
    return f"{code} {sign}{whole:,}.{frac:0{places}d}"
