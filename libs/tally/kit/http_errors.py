"""Tally's reasons as the HTTP answers an OpenAI client expects: one table, used by the
OpenAI-compatible gateway (examples/gateway) and by the body metering hands Envoy with an
OVER_LIMIT (services/metering: ShouldRateLimit), so a refusal reads the same wherever it is
made.

OpenAI's error body is `{"error": {"message", "type", "param", "code"}}`; the `openai` package
raises by status (400 BadRequestError, 401 AuthenticationError, 402/403 APIStatusError and
PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from .errors import Reason


@dataclass(frozen=True, slots=True)
class HttpError:
    """How one reason is answered over HTTP."""

    status: int
    type: str
    code: str


_PAY = "insufficient_quota"  # OpenAI's type when the account cannot pay
_BAD = "invalid_request_error"

HTTP_OF: Final = {
    Reason.INSUFFICIENT_CREDITS: HttpError(402, _PAY, "insufficient_credits"),
    Reason.BUDGET_EXCEEDED: HttpError(402, _PAY, "budget_exceeded"),
    Reason.ACCOUNT_READ_ONLY: HttpError(402, _PAY, "account_read_only"),
    Reason.QUOTA_EXCEEDED: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    Reason.ACCOUNT_THROTTLED: HttpError(429, "rate_limit_error", "account_throttled"),
    Reason.CONTEXT_TOO_LONG: HttpError(400, _BAD, "context_length_exceeded"),
    Reason.UPLOAD_TOO_LARGE: HttpError(413, _BAD, "upload_too_large"),
    Reason.UNKNOWN_MODEL: HttpError(404, _BAD, "model_not_found"),
    Reason.PRICE_NOT_FOUND: HttpError(404, _BAD, "model_not_found"),
    Reason.INVALID_ARGUMENT: HttpError(400, _BAD, "invalid_request"),
    Reason.IDEMPOTENCY_KEY_REUSED: HttpError(409, _BAD, "idempotency_key_reused"),
    Reason.UNAUTHENTICATED: HttpError(401, _BAD, "invalid_api_key"),
    Reason.PERMISSION_DENIED: HttpError(403, "permission_error", "permission_denied"),
    Reason.WRONG_REGION: HttpError(421, _BAD, "wrong_region"),
    Reason.UNAVAILABLE: HttpError(503, "server_error", "service_unavailable"),
}
_INTERNAL: Final = HttpError(500, "server_error", "internal_error")


def http_error(reason: str) -> HttpError:
    """The HTTP answer for a reason's bare name (500 for one not in the table)."""
    try:
        return HTTP_OF.get(Reason(reason), _INTERNAL)
    except ValueError:
        return _INTERNAL


def openai_error_body(message: str, error: HttpError, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": error.type, "param": param,
                      "code": error.code}}


def openai_error_bytes(message: str, error: HttpError, param: str | None = None) -> bytes:
    """OpenAI's error JSON, encoded."""
    return json.dumps(openai_error_body(message, error, param)).encode()
