"""The domain-error table (DESIGN §7): each stable reason maps to exactly one gRPC status.

Domain code raises `TallyError(Reason.X, ...)`; it never touches grpc. The server kit's error
interceptor turns the error into that status with a `google.rpc.Status` carrying
`google.rpc.ErrorInfo` (reason, domain, metadata) and, where they apply, `BadRequest` field
violations and `RetryInfo` — the shape described by Google's AIP-193. The client SDK turns the
same status back into a `TallyError`, so callers branch on reasons, not on message text.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN: Final = "tally.dev"
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"


class Reason(enum.StrEnum):
    """Stable reasons; the wire carries the bare name in ErrorInfo.reason."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    UNKNOWN_METER = "UNKNOWN_METER"
    EVENT_TOO_OLD = "EVENT_TOO_OLD"
    EVENT_IN_FUTURE = "EVENT_IN_FUTURE"
    CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    WEBHOOK_SIGNATURE_INVALID = "WEBHOOK_SIGNATURE_INVALID"
    NOT_FOUND = "NOT_FOUND"
    PRICE_NOT_FOUND = "PRICE_NOT_FOUND"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    INSUFFICIENT_CREDITS = "INSUFFICIENT_CREDITS"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    ACCOUNT_READ_ONLY = "ACCOUNT_READ_ONLY"
    ACCOUNT_THROTTLED = "ACCOUNT_THROTTLED"
    RESERVATION_ALREADY_CAPTURED = "RESERVATION_ALREADY_CAPTURED"
    RESERVATION_ALREADY_RELEASED = "RESERVATION_ALREADY_RELEASED"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    REFUND_EXCEEDS_UNSPENT = "REFUND_EXCEEDS_UNSPENT"
    PAYMENT_NOT_COMPLETED = "PAYMENT_NOT_COMPLETED"
    BILLING_PROFILE_INCOMPLETE = "BILLING_PROFILE_INCOMPLETE"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    SEAT_LIMIT_REACHED = "SEAT_LIMIT_REACHED"
    LAST_OWNER = "LAST_OWNER"
    KEY_NOT_ACTIVE = "KEY_NOT_ACTIVE"
    WRONG_REGION = "WRONG_REGION"
    PRICE_IN_USE = "PRICE_IN_USE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


_C = grpc.StatusCode
STATUS_OF: Final[Mapping[Reason, grpc.StatusCode]] = {
    Reason.INVALID_ARGUMENT: _C.INVALID_ARGUMENT,
    Reason.BATCH_TOO_LARGE: _C.INVALID_ARGUMENT,
    Reason.UNKNOWN_MODEL: _C.INVALID_ARGUMENT,
    Reason.UNKNOWN_METER: _C.INVALID_ARGUMENT,
    Reason.EVENT_TOO_OLD: _C.INVALID_ARGUMENT,
    Reason.EVENT_IN_FUTURE: _C.INVALID_ARGUMENT,
    Reason.CONTEXT_TOO_LONG: _C.INVALID_ARGUMENT,
    Reason.UPLOAD_TOO_LARGE: _C.INVALID_ARGUMENT,
    Reason.WEBHOOK_SIGNATURE_INVALID: _C.UNAUTHENTICATED,
    Reason.NOT_FOUND: _C.NOT_FOUND,
    Reason.PRICE_NOT_FOUND: _C.NOT_FOUND,
    Reason.RESERVATION_NOT_FOUND: _C.NOT_FOUND,
    Reason.IDEMPOTENCY_KEY_REUSED: _C.ALREADY_EXISTS,
    Reason.INSUFFICIENT_CREDITS: _C.FAILED_PRECONDITION,
    Reason.BUDGET_EXCEEDED: _C.FAILED_PRECONDITION,
    Reason.ACCOUNT_READ_ONLY: _C.FAILED_PRECONDITION,
    Reason.ACCOUNT_THROTTLED: _C.RESOURCE_EXHAUSTED,
    Reason.RESERVATION_ALREADY_CAPTURED: _C.FAILED_PRECONDITION,
    Reason.RESERVATION_ALREADY_RELEASED: _C.FAILED_PRECONDITION,
    Reason.RESERVATION_EXPIRED: _C.FAILED_PRECONDITION,
    Reason.REFUND_EXCEEDS_UNSPENT: _C.FAILED_PRECONDITION,
    Reason.PAYMENT_NOT_COMPLETED: _C.FAILED_PRECONDITION,
    Reason.BILLING_PROFILE_INCOMPLETE: _C.FAILED_PRECONDITION,
    Reason.QUOTA_EXCEEDED: _C.RESOURCE_EXHAUSTED,
    Reason.PERMISSION_DENIED: _C.PERMISSION_DENIED,
    Reason.SEAT_LIMIT_REACHED: _C.FAILED_PRECONDITION,
    Reason.LAST_OWNER: _C.FAILED_PRECONDITION,
    Reason.KEY_NOT_ACTIVE: _C.FAILED_PRECONDITION,
    Reason.WRONG_REGION: _C.FAILED_PRECONDITION,
    Reason.PRICE_IN_USE: _C.FAILED_PRECONDITION,
    Reason.UNAUTHENTICATED: _C.UNAUTHENTICATED,
    Reason.UNAVAILABLE: _C.UNAVAILABLE,
    Reason.INTERNAL: _C.INTERNAL,
}
"""The one table: reason -> gRPC status code. A test walks every row through a real server."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (e.g. `items[3].amount_micros`) and why."""

    field: str
    description: str


class TallyError(Exception):
    """A domain error with a stable reason; raised by domain code, mapped by the kit."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: timedelta | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after = retry_after
        found = list(violations)
        if field is not None and not any(v.field == field for v in found):
            found.insert(0, FieldViolation(field, message))
        self.violations: tuple[FieldViolation, ...] = tuple(found)

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status code this reason maps to."""
        return STATUS_OF[self.reason]

    @property
    def field(self) -> str | None:
        """The first offending field, if the error names one."""
        return self.violations[0].field if self.violations else None

    def __repr__(self) -> str:
        return f"TallyError({self.reason}, {self.message!r})"


def invalid(field: str, description: str, reason: Reason = Reason.INVALID_ARGUMENT) -> TallyError:
    """Shorthand for a bad-input error naming one field."""
    return TallyError(reason, f"{field}: {description}", field=field)


def check_id(field: str, value: str, max_length: int) -> FieldViolation | None:
    """A client-chosen id: 1..max_length printable characters (None when it is one)."""
    if not value:
        return FieldViolation(field, "is required")
    if len(value) > max_length:
        return FieldViolation(field, f"is longer than {max_length} characters")
    if not value.isprintable():
        return FieldViolation(field, "must be printable")
    return None


def raise_if(problems: Iterable[FieldViolation | None]) -> None:
    """Raises one INVALID_ARGUMENT naming every problem, if there is any."""
    found = [p for p in problems if p is not None]
    if found:
        raise invalid_fields(found)


def invalid_fields(violations: Iterable[FieldViolation]) -> TallyError:
    """A bad-input error listing every bad field at once."""
    found = list(violations)
    summary = "; ".join(f"{v.field}: {v.description}" for v in found)
    return TallyError(Reason.INVALID_ARGUMENT, summary, violations=found)


MAX_TEXT: Final = 512
"""Characters of a message, description or metadata value sent back: error texts quote the
request, and gRPC refuses trailers past 16 KiB (the caller would see RESOURCE_EXHAUSTED)."""


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}… ({len(text)} characters)"


def bounded(error: TallyError) -> TallyError:
    """`error` with every text clipped to MAX_TEXT characters (itself when none is longer)."""
    texts = [error.message, *error.metadata.values(),
             *(t for v in error.violations for t in (v.field, v.description))]
    if all(len(t) <= MAX_TEXT for t in texts) and len(error.violations) <= 50:
        return error
    return TallyError(error.reason, _clip(error.message),
                      metadata={k[:MAX_TEXT]: _clip(v) for k, v in error.metadata.items()},
                      retry_after=error.retry_after,
                      violations=[FieldViolation(_clip(v.field), _clip(v.description))
                                  for v in error.violations[:50]])


def to_status_proto(error: TallyError) -> status_pb2.Status:
    """The google.rpc.Status for `error`: ErrorInfo always, BadRequest/RetryInfo when they apply."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(error.retry_after)
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=details)


def from_status_proto(status: status_pb2.Status) -> TallyError | None:
    """Rebuilds the TallyError a Tally server sent, or None if the status is not ours."""
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[FieldViolation] = []
    retry_after: timedelta | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
    if info is None or info.domain != ERROR_DOMAIN:
        return None
    try:
        reason = Reason(info.reason)
    except ValueError:
        reason = Reason.INTERNAL
    return TallyError(
        reason,
        status.message,
        metadata=dict(info.metadata),
        retry_after=retry_after,
        violations=violations,
    )


def from_rpc_error(error: grpc.RpcError) -> TallyError | None:
    """The TallyError inside a failed call's trailing metadata, if any."""
    trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return from_status_proto(status_pb2.Status.FromString(value))
    return None
