"""Requests the kit refuses before a handler sees them, whatever the RPC.

- Bytes that do not decode as the request type (corrupt wire format, invalid UTF-8 or a lone
  surrogate in a string field): gRPC itself would answer UNKNOWN; we answer INVALID_ARGUMENT.
- A NUL character in any string field, however deep: PostgreSQL cannot store one, so it would
  otherwise surface as a database error (INTERNAL) — even on reads like GetBalance. The error
  names the field path (`events[3].context.org_id`).

  Except in a repeated field a service declared with `items_checked_by_handler`: there each
  item is the handler's to reject alone (a usage event with a NUL is rejected with its reason
  while the other events of its call are recorded, as for any other bad field of an event).

The NUL walk costs nothing for most requests: a NUL in a string is a 0x00 byte on the wire,
and a request without any 0x00 byte is not walked at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from google.protobuf import descriptor as d
from google.protobuf.message import Message

from tally.kit.errors import FieldViolation, Reason, TallyError, invalid_fields

_STRING: Final = d.FieldDescriptor.TYPE_STRING
_MESSAGE: Final = d.FieldDescriptor.TYPE_MESSAGE
MAX_VIOLATIONS: Final = 20


class Refused:
    """What a request decodes to when the kit refuses it; the handler wrapper raises `error`."""

    __slots__ = ("error",)

    def __init__(self, error: TallyError) -> None:
        self.error = error


def checked_decoder(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`decode`, returning a `Refused` instead of raising, and for a request with a NUL."""

    def decoder(data: bytes) -> Any:
        try:
            message = decode(data)
        except Exception as exc:
            return Refused(TallyError(Reason.INVALID_ARGUMENT,
                                      f"the request does not decode: {exc}"))
        if b"\x00" in data and isinstance(message, Message):
            found: list[FieldViolation] = []
            _find_nul(message, "", found)
            if found:
                return Refused(invalid_fields(found))
        return message

    return decoder


# Per message type: its string fields and message fields (name, repeated, map value kind).
_Plan = tuple[tuple[str, bool], ...]
_plans: dict[str, tuple[_Plan, _Plan, _Plan]] = {}
# (message full name, repeated message field) whose items the handler checks one by one.
_handler_checked: set[tuple[str, str]] = set()


def items_checked_by_handler(message_type: type[Message], field: str) -> None:
    """The items of `message_type.field` (a repeated message field) are not NUL-checked by the
    kit: the handler rejects a bad item alone, with its reason, and keeps the others. The
    handler must then refuse every NUL in those items itself (PostgreSQL cannot store one)."""
    descriptor = message_type.DESCRIPTOR
    if descriptor.fields_by_name[field].type != _MESSAGE:
        raise ValueError(f"{descriptor.full_name}.{field} is not a message field")
    _handler_checked.add((descriptor.full_name, field))
    _plans.pop(descriptor.full_name, None)


def _plan(descriptor: Any) -> tuple[_Plan, _Plan, _Plan]:
    plan = _plans.get(descriptor.full_name)
    if plan is not None:
        return plan
    strings: list[tuple[str, bool]] = []
    messages: list[tuple[str, bool]] = []
    maps: list[tuple[str, bool]] = []  # (name, value is a message)
    for field in descriptor.fields:
        if field.type == _STRING:
            strings.append((field.name, field.is_repeated))
        elif field.type == _MESSAGE:
            if field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"]
                maps.append((field.name, value.type == _MESSAGE))
            elif (descriptor.full_name, field.name) not in _handler_checked:
                messages.append((field.name, field.is_repeated))
    plan = _plans[descriptor.full_name] = (tuple(strings), tuple(messages), tuple(maps))
    return plan


def _find_nul(message: Message, path: str, found: list[FieldViolation]) -> None:
    strings, messages, maps = _plan(message.DESCRIPTOR)
    for name, repeated in strings:
        value = getattr(message, name)
        if repeated:
            for i, item in enumerate(value):
                if "\x00" in item:
                    found.append(FieldViolation(f"{path}{name}[{i}]", "contains a NUL character"))
        elif "\x00" in value:
            found.append(FieldViolation(f"{path}{name}", "contains a NUL character"))
    for name, value_is_message in maps:
        for key, value in getattr(message, name).items():
            if isinstance(key, str) and "\x00" in key:
                found.append(FieldViolation(f"{path}{name}", "a key contains a NUL character"))
            if value_is_message:
                _find_nul(value, f"{path}{name}[{key!r}].", found)
            elif isinstance(value, str) and "\x00" in value:
                found.append(FieldViolation(f"{path}{name}[{key!r}]",
                                            "contains a NUL character"))
    for name, repeated in messages:
        if len(found) >= MAX_VIOLATIONS:
            return
        if repeated:
            for i, item in enumerate(getattr(message, name)):
                _find_nul(item, f"{path}{name}[{i}].", found)
        elif message.HasField(name):
            _find_nul(getattr(message, name), f"{path}{name}.", found)


# PostgreSQL refusing a value the request carried: too long for its column or an index row,
# out of range for its type, a character it cannot store.
_UNSTORABLE_SQLSTATES: Final = frozenset({
    "22001",  # string_data_right_truncation
    "22003",  # numeric_value_out_of_range
    "22008",  # datetime_field_overflow
    "22021",  # character_not_in_repertoire
    "22P05",  # untranslatable_character
    "54000",  # program_limit_exceeded (index row size)
})


def unstorable(exc: BaseException) -> bool:
    """True when `exc` is a value of the request that cannot be stored or computed with (a
    database range or size limit, an OverflowError): the caller's input, not our bug. A safety
    net under the handlers' own checks, which name the field."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, OverflowError):
            return True
        if getattr(current, "sqlstate", None) in _UNSTORABLE_SQLSTATES:
            return True
        current = current.__cause__ or getattr(current, "orig", None)
    return False
