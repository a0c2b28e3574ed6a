"""envoy.service.ratelimit.v3.RateLimitService: Envoy's descriptors <-> the rate-limit check
(spend/ratelimit.py), nothing else. The mapping of entries, the decision and why no credit is
held are documented there; the wire shapes are in `spend/convert_ratelimit.py`."""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tally.kit.telemetry import annotate

from .spend import convert_ratelimit as convert
from .spend.ratelimit import RateLimitChecker

Context = grpc.aio.ServicerContext[Any, Any]


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Answers Envoy's (and Istio's) global rate-limit filter."""

    def __init__(self, checker: RateLimitChecker) -> None:
        self.checker = checker

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: Context
                              ) -> rls_pb2.RateLimitResponse:
        """OK, or OVER_LIMIT with the reason Authorize would DENY with."""
        verdict = await self.checker.check(request.domain, convert.descriptors(request))
        refusal = verdict.refusal
        annotate(over_limit=refusal is not None, reason=refusal.reason if refusal else "")
        return convert.response(verdict)
