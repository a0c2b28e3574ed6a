"""Exact arithmetic helpers: the sub-micro unit that rating computes in.

Rating works in *attocredits* (1e-18 credit, so 1 micro-credit = 10**12 attocredits) held in
plain Python ints: exact, unbounded, and far faster than `Decimal`. A rate is admitted only if
one unit of it, after any region multiplier, is a whole number of attocredits; every exact
cost is then an integer, and converting it to a `Decimal` of micro-credits is exact.
"""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation
from fractions import Fraction
from typing import Final

ATTOS_PER_MICRO: Final = 10**12
"""Attocredits per micro-credit: the resolution of every exact cost and carry."""

ATTOS_PER_CREDIT: Final = 10**18

# Wide enough for any amount we handle; Inexact is trapped so nothing rounds silently.
EXACT: Final = Context(prec=200, traps=[Inexact, InvalidOperation])


_ATTOS_PER_MICRO_DECIMAL: Final = Decimal(ATTOS_PER_MICRO)


def attos_to_micros_decimal(attos: int) -> Decimal:
    """Exact `Decimal` micro-credits for an integer number of attocredits, with no trailing
    zeros (1_500_000_000_000 -> Decimal("1.5")): an exact division keeps the ideal exponent."""
    return EXACT.divide(Decimal(attos), _ATTOS_PER_MICRO_DECIMAL)


def micros_decimal_to_attos(value: Decimal) -> int | None:
    """Exact attocredits for a `Decimal` of micro-credits, or None if it is finer than that."""
    if not value.is_finite():
        return None
    scaled = value.scaleb(12, EXACT)
    if scaled != scaled.to_integral_value():
        return None
    return int(scaled)


def unit_attos(rate: Decimal, per_units: int, multiplier: Decimal = Decimal(1)) -> int | None:
    """Attocredits for one unit at `rate` credits per `per_units`, scaled by `multiplier`;
    None when that is not a whole number of attocredits (or per_units <= 0)."""
    if per_units <= 0 or not rate.is_finite() or not multiplier.is_finite():
        return None
    exact = Fraction(rate) * ATTOS_PER_CREDIT * Fraction(multiplier) / per_units
    if exact.denominator != 1:
        return None
    return exact.numerator
