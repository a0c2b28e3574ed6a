"""The rating library's one exception type.

Rating is pure domain code shared by pricing and metering, so it does not import the server
kit (which pulls in grpc). Its reasons are spelled exactly like `tally.kit.errors.Reason`, so a
service maps `RatingError.reason` onto the kit's error table by name.
"""

from __future__ import annotations

import enum


class RatingReason(enum.StrEnum):
    """Why rating refused; each value is also a `tally.kit.errors.Reason` name."""

    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    UNKNOWN_METER = "UNKNOWN_METER"
    PRICE_NOT_FOUND = "PRICE_NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"


class RatingError(Exception):
    """A domain error from rating: a stable `reason`, the offending `field`, and a message."""

    __slots__ = ("field", "message", "reason")

    def __init__(self, reason: RatingReason | str, field: str, message: str) -> None:
        self.reason = RatingReason(reason)
        self.field = field
        self.message = message
        super().__init__(f"{self.reason}: {field}: {message}")

    def __reduce__(self) -> tuple[type[RatingError], tuple[str, str, str]]:
        return (RatingError, (str(self.reason), self.field, self.message))
