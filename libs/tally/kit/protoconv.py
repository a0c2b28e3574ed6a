"""Proto <-> Python conversions every servicer needs: timestamps and prefixed enums.

Proto enums carry their type as a prefix (`TRANSFER_KIND_USAGE`, buf STANDARD); domain enums
use the bare name (`TransferKind.USAGE`). These helpers map one to the other by name, so adding
a value to both is all it takes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from tally.kit.errors import invalid

E = TypeVar("E", bound=enum.Enum)

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp, or None (leave the field unset)."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def from_timestamp(message: Any, field: str) -> datetime | None:
    """The aware UTC datetime in `message.field`, or None when the field is unset."""
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    if not TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS:
        raise invalid(field, "is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z")
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise invalid(field, "nanos must be 0..999999999")
    return stamp.ToDatetime(tzinfo=UTC)


def timestamp_clamped(message: Any, field: str) -> datetime | None:
    """Like `from_timestamp`, but a time past either end of the representable range is that
    end (datetime.min or .max, UTC): for per-item checks (usage events) that then reject the
    item as too old or in the future instead of failing the whole call. Bad nanos: None."""
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    if stamp.seconds < TIMESTAMP_MIN_SECONDS:
        return datetime.min.replace(tzinfo=UTC)
    if stamp.seconds > TIMESTAMP_MAX_SECONDS:
        return datetime.max.replace(tzinfo=UTC)
    if not 0 <= stamp.nanos < 1_000_000_000:
        return None
    # what Timestamp.ToDatetime(tzinfo=UTC) gives, without its generic conversions (this runs
    # per usage event)
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def enum_out(proto_enum: Any, prefix: str, value: enum.Enum | None) -> Any:
    """The proto number of a domain enum value (`prefix` + name); UNSPECIFIED for None."""
    if value is None:
        return 0
    return proto_enum.Value(f"{prefix}{value.name}")


def enum_in(proto_enum: Any, prefix: str, number: int, domain: type[E], field: str,
            *, required: bool = True) -> E | None:
    """The domain value of a proto enum number; INVALID_ARGUMENT naming `field` if unknown."""
    if number == 0:
        if required:
            raise invalid(field, "is required")
        return None
    try:
        name = proto_enum.Name(number)
    except ValueError:
        raise invalid(field, f"unknown value {number}") from None
    try:
        return domain[name.removeprefix(prefix)]
    except KeyError:
        raise invalid(field, f"{name} is not accepted here") from None


def enums_in(proto_enum: Any, prefix: str, numbers: Iterable[int], domain: type[E],
             field: str) -> list[E]:
    """The domain values of a repeated enum field (a filter); each one must be set and known."""
    found = [enum_in(proto_enum, prefix, n, domain, field) for n in numbers]
    return [value for value in found if value is not None]


def enum_or_none(proto_enum: Any, prefix: str, number: int, domain: type[E]) -> E | None:
    """The domain value of a proto enum number; None for UNSPECIFIED or a value we lack (for
    messages whose domain validation names the missing field itself)."""
    if number == 0:
        return None
    try:
        return domain[proto_enum.Name(number).removeprefix(prefix)]
    except (ValueError, KeyError):
        return None
