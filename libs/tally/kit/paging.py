"""Paging for every List/Export RPC: page_size (default 100, at most 1000) and opaque tokens.

A token is base64 of "<kind>:<integer>" — an offset, or a keyset cursor such as the last entry
sequence seen. Clients treat it as opaque; a token this service did not issue is INVALID_ARGUMENT
naming `page_token`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from tally.kit.errors import FieldViolation, TallyError, invalid_fields, raise_if

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
_MAX_DIGITS: Final = 19
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """A validated page request: where to start (None = the first page) and how many."""

    position: int | None
    page_size: int

    @property
    def offset(self) -> int:
        """The start as an offset (for offset-kind tokens)."""
        return self.position or 0


def encode_token(kind: str, position: int) -> str:
    """An opaque token for the page starting after/at `position`."""
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode()


def decode_token(token: str, kind: str) -> int | None:
    """The position in a token of `kind`; raises ValueError if we did not issue it."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise ValueError(token) from None
    prefix, sep, digits = text.partition(":")
    if prefix != kind or not sep or not digits.isascii() or not digits.isdigit():
        raise ValueError(token)
    if len(digits) > _MAX_DIGITS:
        raise ValueError(token)
    return int(digits)


def page_problems(page_size: int, page_token: str, kind: str = "offset") -> list[FieldViolation]:
    """What is wrong with a request's paging fields, if anything."""
    problems: list[FieldViolation] = []
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        problems.append(FieldViolation(
            "page_size", f"must be between 0 and {MAX_PAGE_SIZE}, got {page_size}"))
    try:
        decode_token(page_token, kind)
    except ValueError:
        problems.append(FieldViolation("page_token", "is not a token this service issued"))
    return problems


def page_request(page_size: int, page_token: str, kind: str = "offset") -> PageRequest:
    """Validated paging (size 0 = the default); INVALID_ARGUMENT naming each bad field."""
    problems = page_problems(page_size, page_token, kind)
    if problems:
        raise invalid_fields(problems)
    return PageRequest(decode_token(page_token, kind), page_size or DEFAULT_PAGE_SIZE)


def next_offset_token(request: PageRequest, returned: int, total: int) -> str:
    """The offset token of the following page, or "" when this was the last."""
    following = request.offset + returned
    return encode_token("offset", following) if following < total else ""


def encode_cursor(kind: str, *parts: str | int) -> str:
    """An opaque keyset token carrying several values (e.g. a timestamp and an id)."""
    return base64.urlsafe_b64encode(json.dumps([kind, *parts]).encode()).decode()


def decode_cursor(token: str, kind: str) -> list[str | int] | None:
    """The values of a keyset token of `kind`; None for ""; INVALID_ARGUMENT if not ours."""
    if not token:
        return None
    try:
        found = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        if not isinstance(found, list) or not found or found[0] != kind:
            raise ValueError
        return list(found[1:])
    except (binascii.Error, UnicodeError, ValueError):
        raise invalid_fields([FieldViolation(
            "page_token", "is not a token this service issued")]) from None


def encode_time_cursor(kind: str, at: datetime, last_id: str) -> str:
    """The keyset token after the row (`at`, `last_id`) of a list ordered by a timestamp and
    an id (the timestamp travels as whole microseconds, exactly)."""
    return encode_cursor(kind, (at - _EPOCH) // timedelta(microseconds=1), last_id)


def time_cursor_page(page_size: int, page_token: str, kind: str, *,
                     also: Iterable[FieldViolation | None] = ()
                     ) -> tuple[int, tuple[datetime, str] | None]:
    """Validated paging of a list ordered by (timestamp, id): the page size (0 = the
    default) and the (timestamp, id) to continue after, None on the first page. Raises one
    INVALID_ARGUMENT naming every bad field, the request's own `also` problems included."""
    problems = list(also)
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        problems.append(FieldViolation(
            "page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) .. {MAX_PAGE_SIZE}"))
    after = None
    try:
        cursor = decode_cursor(page_token, kind)
        if cursor is not None:
            micros, last_id = cursor
            if not isinstance(micros, int) or not isinstance(last_id, str):
                raise ValueError(page_token)
            after = (_EPOCH + timedelta(microseconds=micros), last_id)
    except (TallyError, ValueError, TypeError, OverflowError):
        problems.append(FieldViolation("page_token", "is not a token this service issued"))
    raise_if(problems)
    return page_size or DEFAULT_PAGE_SIZE, after
