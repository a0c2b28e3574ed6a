"""Envoy's RateLimitRequest / RateLimitResponse <-> the rate-limit check (ratelimit.py).

An OVER_LIMIT carries what the client behind Envoy needs: `x-tally-reason` and
`x-tally-message` response headers, `retry-after` (seconds) when waiting helps, and as the
body the OpenAI error JSON an OpenAI client reads (Envoy sends `raw_body` with its 429).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from tally.kit.http_errors import http_error, openai_error_bytes
from tally.limits import DAY_US, MINUTE_US, SECOND_US

from . import ratelimit as rl

_OK = rls_pb2.RateLimitResponse.OK
_OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
_Unit = rls_pb2.RateLimitResponse.RateLimit
_UNIT_OF = {SECOND_US: _Unit.SECOND, MINUTE_US: _Unit.MINUTE, DAY_US: _Unit.DAY}


def descriptors(request: rls_pb2.RateLimitRequest) -> list[rl.Descriptor]:
    """Every descriptor as a question (INVALID_ARGUMENT naming a bad entry)."""
    default_hits = request.hits_addend or 1
    return [rl.descriptor(i, [(e.key, e.value) for e in d.entries],
                          d.hits_addend.value if d.HasField("hits_addend") else default_hits)
            for i, d in enumerate(request.descriptors)]


def _status(status: rl.Status) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    message = rls_pb2.RateLimitResponse.DescriptorStatus(
        code=_OVER if status.over_limit else _OK,
        limit_remaining=min(status.remaining, 2**32 - 1))
    if status.period_us:
        message.current_limit.CopyFrom(_Unit(
            name=status.limit_name, requests_per_unit=min(status.limit, 2**32 - 1),
            unit=_UNIT_OF[status.period_us]))
    if status.retry_after_ms:
        message.duration_until_reset.CopyFrom(duration_pb2.Duration(
            seconds=status.retry_after_ms // 1000,
            nanos=status.retry_after_ms % 1000 * 1_000_000))
    return message


def response(verdict: rl.Verdict) -> rls_pb2.RateLimitResponse:
    """OK, or OVER_LIMIT with the first refusal's reason in headers and body."""
    answer = rls_pb2.RateLimitResponse(
        overall_code=_OVER if verdict.refusal else _OK,
        statuses=[_status(s) for s in verdict.statuses])
    refusal = verdict.refusal
    if refusal is None:
        return answer
    headers = [("x-tally-reason", refusal.reason), ("x-tally-message", refusal.message),
               ("content-type", "application/json")]
    if refusal.retry_after_ms:
        headers.append(("retry-after", str(-(-refusal.retry_after_ms // 1000))))
    answer.response_headers_to_add.extend(base_pb2.HeaderValue(key=k, value=v)
                                          for k, v in headers)
    answer.raw_body = openai_error_bytes(refusal.message, http_error(refusal.reason))
    return answer
