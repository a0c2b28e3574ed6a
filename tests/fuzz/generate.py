"""Random and boundary requests for any proto message, driven by its descriptor alone.

Nothing here names an RPC or a field of ours: a new RPC or field is fuzzed as soon as it is in
the contract. Values lean towards the edges that break servers: empty and 1 MB strings, NUL,
ids at and past the usual lengths, int64 extremes, NaN and infinities, unknown enum numbers,
timestamps at and past the representable range, repeated fields with 100k items. A request
can also be spoiled on the wire (invalid UTF-8 / a lone surrogate in a string field, or bytes
that are no message at all), which protobuf itself refuses to build.
"""

from __future__ import annotations

import random
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf.message import Message

INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1
INT32 = (-(2**31), 2**31 - 1)
UINT32_MAX = 2**32 - 1
# Timestamp's valid range is 0001-01-01 .. 9999-12-31T23:59:59.999999999Z
TIMESTAMP_MIN_S, TIMESTAMP_MAX_S = -62_135_596_800, 253_402_300_799
DURATION_MAX_S = 315_576_000_000
NOW_S = 1_796_601_600  # 2026-12-07: near now, so some events fall inside time windows
ONE_MB = 1024 * 1024
HUGE_REPEATED = 100_000

# Words a field of that name usually holds, so some calls get past the first check.
_VOCABULARY = {
    "org_id": ["org-fuzz-1", "org-fuzz-2", "acme"],
    "model": ["gpt-4o", "gpt-4o-mini", "claude-sonnet", "unknown-model"],
    "currency": ["USD", "EUR", "usd", ""],
    "meter": ["input_tokens", "output_tokens", "calls"],
}

_TYPE = d.FieldDescriptor


class Generator:
    """Makes requests of any message type from a seeded random source."""

    def __init__(self, rng: random.Random, *, heavy: bool = True, edge_rate: float = 1.0
                 ) -> None:
        self.rng = rng
        self.edge_rate = edge_rate
        """The share of values drawn from the edge cases; the rest are plausible, so that a
        low rate makes requests with one or two bad values that get deep into a handler."""
        self.heavy = heavy
        """Allow 1 MB strings and 100k-item repeated fields (rarely)."""
        self._heavy_left = 0

    def message(self, cls: type[Message], depth: int = 0) -> Message:
        """A random instance of `cls`, with at most one heavy value (1 MB, 100k items)."""
        self._heavy_left = 1 if self.heavy else 0
        message = cls()
        self.fill(message, depth)
        return message

    def fill(self, message: Message, depth: int) -> None:
        descriptor = message.DESCRIPTOR
        full = descriptor.full_name
        if full == "google.protobuf.FieldMask" and not self._edge():
            return  # an empty mask: "every field", the usual plausible choice
        if full == "google.protobuf.Timestamp":
            seconds, nanos = self._timestamp()
            message.seconds, message.nanos = seconds, nanos  # type: ignore[attr-defined]
            return
        if full == "google.protobuf.Duration":
            message.seconds = self.rng.choice(  # type: ignore[attr-defined]
                [0, 1, -1, DURATION_MAX_S, DURATION_MAX_S + 1, *INT64])
            return
        for field in descriptor.fields:
            if self.rng.random() < 0.05 + (0.3 if depth else 0.15) * self.edge_rate:
                continue  # leave some fields unset
            self._set(message, field, depth)

    def _set(self, message: Message, field: d.FieldDescriptor, depth: int) -> None:
        rng = self.rng
        is_map = (field.type == _TYPE.TYPE_MESSAGE
                  and field.message_type.GetOptions().map_entry)
        if is_map:
            target = getattr(message, field.name)
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for _ in range(rng.choice([0, 1, 3, 40])):
                key = self._scalar(key_field, field.name)
                if value_field.type == _TYPE.TYPE_MESSAGE:
                    self.fill(target[key], depth + 1)
                else:
                    target[key] = self._scalar(value_field, field.name)
            return
        if field.is_repeated:
            target = getattr(message, field.name)
            roll = rng.random()
            if self._take_heavy(0.04):
                count = HUGE_REPEATED
            elif roll < 0.3:
                count = 0
            else:
                count = rng.choice([1, 2, 3, 10])
            if field.type == _TYPE.TYPE_MESSAGE:
                if count == HUGE_REPEATED or depth >= 3:
                    for _ in range(count):
                        target.add()  # empty items: 100k of them stay a small request
                else:
                    for _ in range(count):
                        self.fill(target.add(), depth + 1)
            elif count == HUGE_REPEATED:
                small = self._scalar(field, field.name)
                target.extend([small] * count)
            else:
                target.extend(self._scalar(field, field.name) for _ in range(count))
            return
        if field.type == _TYPE.TYPE_MESSAGE:
            if depth >= 4:
                return
            self.fill(getattr(message, field.name), depth + 1)
            return
        setattr(message, field.name, self._scalar(field, field.name))

    def _take_heavy(self, chance: float) -> bool:
        if self._heavy_left and self.rng.random() < chance:
            self._heavy_left -= 1
            return True
        return False

    def _edge(self) -> bool:
        return self.rng.random() < self.edge_rate

    def _timestamp(self) -> tuple[int, int]:
        rng = self.rng
        if not self._edge():
            return NOW_S - rng.randint(-60, 86400), rng.choice([0, 500_000_000])
        seconds = rng.choice([
            NOW_S, NOW_S - 3600, NOW_S + 3600, NOW_S - 40 * 86400, 0, -1,
            TIMESTAMP_MIN_S, TIMESTAMP_MAX_S, TIMESTAMP_MIN_S - 1, TIMESTAMP_MAX_S + 1,
            *INT64, rng.randint(*INT64)])
        nanos = rng.choice([0, 0, 0, 999_999_999, 1_000_000_000, -1, *INT32])
        return seconds, nanos

    def _scalar(self, field: d.FieldDescriptor, name: str) -> Any:
        rng = self.rng
        kind = field.type
        if kind == _TYPE.TYPE_STRING:
            return self._string(name)
        if not self._edge():
            return self._plausible(field)
        if kind == _TYPE.TYPE_BYTES:
            return rng.choice([b"", b"\x00", rng.randbytes(rng.randint(1, 64)),
                               *([b"x" * ONE_MB] if self._take_heavy(0.05) else [])])
        if kind == _TYPE.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == _TYPE.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return rng.choice([*known, *known, 999, -1, INT32[1]])
        if kind in (_TYPE.TYPE_DOUBLE, _TYPE.TYPE_FLOAT):
            return rng.choice([0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"),
                               float("-inf"), 1e308 if kind == _TYPE.TYPE_DOUBLE else 3e38,
                               rng.uniform(-1e6, 1e6)])
        if kind in (_TYPE.TYPE_INT64, _TYPE.TYPE_SINT64, _TYPE.TYPE_SFIXED64):
            return rng.choice([0, 1, -1, 1_000_000, *INT64, INT64[1] - 1, INT64[0] + 1,
                               rng.randint(*INT64), rng.randint(-1000, 10**9)])
        if kind in (_TYPE.TYPE_UINT64, _TYPE.TYPE_FIXED64):
            return rng.choice([0, 1, UINT64_MAX, INT64[1], INT64[1] + 1,
                               rng.randint(0, UINT64_MAX)])
        if kind in (_TYPE.TYPE_INT32, _TYPE.TYPE_SINT32, _TYPE.TYPE_SFIXED32):
            return rng.choice([0, 1, -1, 100, *INT32, rng.randint(*INT32)])
        if kind in (_TYPE.TYPE_UINT32, _TYPE.TYPE_FIXED32):
            return rng.choice([0, 1, 100, UINT32_MAX, rng.randint(0, UINT32_MAX)])
        raise AssertionError(f"unhandled field type {kind} of {field.full_name}")

    def _plausible(self, field: d.FieldDescriptor) -> Any:
        rng = self.rng
        kind = field.type
        if kind == _TYPE.TYPE_BYTES:
            return rng.randbytes(8)
        if kind == _TYPE.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == _TYPE.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values if v.number]
            return rng.choice(known) if known else 0
        if kind in (_TYPE.TYPE_DOUBLE, _TYPE.TYPE_FLOAT):
            return rng.choice([0.5, 1.0, 0.8])
        return rng.choice([1, 2, 10, 60, 1000, 1_000_000, rng.randint(1, 10**7)])

    def _string(self, name: str) -> str:
        rng = self.rng
        roll = rng.random()
        if not self._edge():
            roll = min(roll, 0.59)
        for suffix, words in _VOCABULARY.items():
            if name.endswith(suffix) and roll < 0.5:
                return rng.choice(words)
        if roll < 0.6:  # mostly plausible, so calls get past the first check
            return rng.choice(["fuzz", f"fuzz-{rng.randint(0, 50)}", "org-fuzz-1", "a"])
        cases = [
            "", " ", "fuzz", f"fuzz-{rng.randint(0, 10**6)}", "a\x00b", "\x00",
            "ü😀漢字", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 256, "x" * 3000,
            "x" * 9000, "\t\n", "https://example.invalid/hook", "a@example.invalid",
            "../../etc/passwd", "'; DROP TABLE x; --", "%s%n", "2026-12-01", "-1",
        ]
        if self._take_heavy(0.03):
            return "x" * ONE_MB
        return rng.choice(cases)


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string_fields(descriptor: d.Descriptor) -> list[d.FieldDescriptor]:
    """The top-level string fields of a message (where a bad UTF-8 value can be spliced)."""
    return [f for f in descriptor.fields if f.type == _TYPE.TYPE_STRING]


def spoiled(payload: bytes, descriptor: d.Descriptor, rng: random.Random) -> bytes:
    """`payload` with a string field set to invalid UTF-8 (a lone surrogate, or a stray
    continuation byte), else with bytes that decode as no message of this type."""
    strings = string_fields(descriptor)
    if strings and rng.random() < 0.6:
        field = rng.choice(strings)
        value = rng.choice([b"\xed\xa0\x80", b"\xff\xfe", b"a\x80b", b"\xc3"])
        tag = encode_varint((field.number << 3) | 2)
        return payload + tag + encode_varint(len(value)) + value
    return rng.choice([
        b"\xff\xff\xff\xff",  # a tag with no end
        b"\x0a\xff\xff\xff\x0f",  # a length far past the end
        b"\x08",  # a tag without its value
        rng.randbytes(rng.randint(1, 256)),
        b"\x07",  # wire type 7 does not exist
    ])
