"""Price books as JSON: the default catalog shipped with Tally, and the parser behind it.

Rates are JSON strings ("62.5") or integers, never JSON floats: the file is read with
`parse_float=Decimal` and a float that slips in any other way is refused. Unknown keys are
refused too, so a typo cannot silently drop a price.

The default catalog's unit: 1 credit = 1 US cent (credit packages sell 100 credits per
dollar before bonus). Token rates are credits per million tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar

from ..errors import RatingError, RatingReason
from ..model import (
    CreditPackage,
    Meter,
    ModelEntry,
    ModelKind,
    PackageTier,
    PriceBook,
    PriceLine,
    ProviderCost,
    Tier,
    TierMode,
    UsageMode,
)
from ..validation import validate

DEFAULT_CATALOG: Final = Path(__file__).with_name("default.json")
"""The default price book shipped with the library."""

T = TypeVar("T")


def load_catalog(path: str | Path | None = None) -> PriceBook:
    """Reads, parses and validates a price book JSON file (the default catalog if None).

    Raises RatingError(INVALID_ARGUMENT) naming the first bad field; when the book parses
    but fails `validate`, the message lists every problem.
    """
    source = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        data = json.loads(source.read_text(encoding="utf-8"), parse_float=Decimal)
    except (OSError, ValueError) as exc:
        raise RatingError(RatingReason.INVALID_ARGUMENT, str(source), str(exc)) from None
    book = parse_price_book(data)
    problems = validate(book)
    if problems:
        raise RatingError(
            RatingReason.INVALID_ARGUMENT,
            problems[0].field,
            "; ".join(f"{p.field}: {p.message}" for p in problems),
        )
    return book


def parse_price_book(data: Any) -> PriceBook:
    """Builds a `PriceBook` from JSON-shaped data (not validated: see `validate`)."""
    obj = _Obj(data, "")
    book = PriceBook(
        version=obj.req("version", _str),
        effective_from=obj.req("effective_from", _datetime),
        note=obj.opt("note", _str, ""),
        models=tuple(_model(m) for m in obj.items("models")),
        lines=tuple(_line(line) for line in obj.items("lines")),
        costs=tuple(_cost(c) for c in obj.items("costs")),
        packages=tuple(_package(p) for p in obj.items("packages")),
    )
    obj.done({"credit_unit"})
    return book


def dump_price_book(book: PriceBook) -> dict[str, Any]:
    """The JSON shape `parse_price_book` reads; rates are strings so no float ever appears."""
    return {
        "version": book.version,
        "effective_from": book.effective_from.isoformat(),
        "note": book.note,
        "models": [
            {
                "model": m.model,
                "provider": m.provider,
                "provider_model": m.provider_model,
                "kind": str(m.kind),
                "aliases": list(m.aliases),
                "routing_priority": m.routing_priority,
                "fallback_models": list(m.fallback_models),
                "downgrade_to": m.downgrade_to,
                "max_context_tokens": m.max_context_tokens,
            }
            for m in book.models
        ],
        "lines": [
            {
                "line_id": line.line_id,
                "meter": str(line.meter),
                "model": line.model,
                "mode": None if line.mode is None else str(line.mode),
                "tier_mode": str(line.tier_mode),
                "per_units": line.per_units,
                "included_quantity": line.included_quantity,
                "overage_rate": None if line.overage_rate is None else str(line.overage_rate),
                "region_multipliers": {r: str(m) for r, m in line.region_multipliers.items()},
                "tiers": [{"up_to": t.up_to, "rate": str(t.rate)} for t in line.tiers],
            }
            for line in book.lines
        ],
        "costs": [
            {
                "provider": c.provider,
                "model": c.model,
                "meter": str(c.meter),
                "mode": None if c.mode is None else str(c.mode),
                "cost_rate": str(c.cost_rate),
                "per_units": c.per_units,
            }
            for c in book.costs
        ],
        "packages": [
            {
                "package_id": p.package_id,
                "name": p.name,
                "tier": str(p.tier),
                "price_minor": p.price_minor,
                "currency": p.currency,
                "credits_micros": p.credits_micros,
                "bonus_credits_micros": p.bonus_credits_micros,
                "manual_settlement_only": p.manual_settlement_only,
            }
            for p in book.packages
        ],
    }


def _model(obj: _Obj) -> ModelEntry:
    entry = ModelEntry(
        model=obj.req("model", _str),
        provider=obj.req("provider", _str),
        provider_model=obj.req("provider_model", _str),
        kind=obj.opt("kind", _enum(ModelKind), ModelKind.CHAT),
        aliases=tuple(obj.opt("aliases", _str_list, [])),
        routing_priority=obj.opt("routing_priority", _int, 0),
        fallback_models=tuple(obj.opt("fallback_models", _str_list, [])),
        downgrade_to=obj.opt("downgrade_to", _str, None),
        max_context_tokens=obj.opt("max_context_tokens", _int, 0),
    )
    obj.done()
    return entry


def _line(obj: _Obj) -> PriceLine:
    line = PriceLine(
        line_id=obj.req("line_id", _str),
        meter=obj.req("meter", _enum(Meter)),
        model=obj.opt("model", _str, ""),
        mode=obj.opt("mode", _enum(UsageMode), None),
        tier_mode=obj.opt("tier_mode", _enum(TierMode), TierMode.FLAT),
        per_units=obj.opt("per_units", _int, 1),
        included_quantity=obj.opt("included_quantity", _int, 0),
        overage_rate=obj.opt("overage_rate", _decimal, None),
        region_multipliers=obj.opt("region_multipliers", _decimal_map, {}),
        tiers=tuple(_tier(t) for t in obj.items("tiers")),
    )
    obj.done()
    return line


def _tier(obj: _Obj) -> Tier:
    tier = Tier(up_to=obj.opt("up_to", _int, None), rate=obj.req("rate", _decimal))
    obj.done()
    return tier


def _cost(obj: _Obj) -> ProviderCost:
    cost = ProviderCost(
        provider=obj.req("provider", _str),
        model=obj.opt("model", _str, ""),
        meter=obj.req("meter", _enum(Meter)),
        mode=obj.opt("mode", _enum(UsageMode), None),
        cost_rate=obj.req("cost_rate", _decimal),
        per_units=obj.opt("per_units", _int, 1),
    )
    obj.done()
    return cost


def _package(obj: _Obj) -> CreditPackage:
    package = CreditPackage(
        package_id=obj.req("package_id", _str),
        name=obj.req("name", _str),
        tier=obj.req("tier", _enum(PackageTier)),
        price_minor=obj.req("price_minor", _int),
        currency=obj.req("currency", _str),
        credits_micros=obj.req("credits_micros", _int),
        bonus_credits_micros=obj.opt("bonus_credits_micros", _int, 0),
        manual_settlement_only=obj.opt("manual_settlement_only", _bool, False),
    )
    obj.done()
    return package


class _Obj:
    """A JSON object being read, remembering its path and which keys were used."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise _bad(path or "$", "expected an object")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def req(self, key: str, parse: Callable[[Any, str], T]) -> T:
        if key not in self.data or self.data[key] is None:
            raise _bad(self._at(key), "is required")
        self.used.add(key)
        return parse(self.data[key], self._at(key))

    def opt(self, key: str, parse: Callable[[Any, str], T], default: T) -> T:
        self.used.add(key)
        if self.data.get(key) is None:
            return default
        return parse(self.data[key], self._at(key))

    def items(self, key: str) -> list[_Obj]:
        self.used.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise _bad(self._at(key), "expected a list")
        return [_Obj(item, f"{self._at(key)}[{i}]") for i, item in enumerate(value)]

    def done(self, ignored: set[str] | frozenset[str] = frozenset()) -> None:
        unknown = set(self.data) - self.used - ignored
        if unknown:
            raise _bad(self.path or "$", f"unknown keys {sorted(unknown)}")


def _bad(field: str, message: str) -> RatingError:
    return RatingError(RatingReason.INVALID_ARGUMENT, field, message)


def _str(value: Any, at: str) -> str:
    if not isinstance(value, str):
        raise _bad(at, "expected a string")
    return value


def _str_list(value: Any, at: str) -> list[str]:
    if not isinstance(value, list):
        raise _bad(at, "expected a list of strings")
    return [_str(item, f"{at}[{i}]") for i, item in enumerate(value)]


def _int(value: Any, at: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(at, "expected an integer")
    return value


def _bool(value: Any, at: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(at, "expected true or false")
    return value


def _decimal(value: Any, at: str) -> Decimal:
    if isinstance(value, bool) or isinstance(value, float):
        raise _bad(at, "rates are decimal strings, never floats")
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip())
        except ArithmeticError:
            raise _bad(at, f"{value!r} is not a decimal number") from None
        if parsed.is_finite():
            return parsed
    raise _bad(at, f"{value!r} is not a finite decimal number")


def _decimal_map(value: Any, at: str) -> dict[str, Decimal]:
    if not isinstance(value, Mapping):
        raise _bad(at, "expected an object")
    return {str(k): _decimal(v, f"{at}.{k}") for k, v in value.items()}


def _datetime(value: Any, at: str) -> datetime:
    text = _str(value, at)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(at, f"{text!r} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        raise _bad(at, "timestamp must carry a UTC offset")
    return parsed


def _enum(kind: Callable[[str], T]) -> Callable[[Any, str], T]:
    def parse(value: Any, at: str) -> T:
        try:
            return kind(_str(value, at))
        except ValueError:
            raise _bad(at, f"{value!r} is not one of the allowed values") from None

    return parse
