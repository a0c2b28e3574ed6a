"""Quotas as limiter decisions, in plain Python: which counters a request consumes and what
a refusal answers.

Every quota that applies to a request becomes one limit of a single decision, so the org's,
project's, environment's and API key's counters are consumed together or not at all. All of
an org's counters share the Redis Cluster hash tag `{org_id}` and so one slot. A THROTTLED
org gets one more counter: its spend policy's throttled rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from tally.kit.errors import Reason
from tally.limits import DAY_US, MINUTE_US, SECOND_US, Limit, Limiter, Window

from ..policies import Quota, QuotaEnforcement, QuotaKind, SpendPolicy
from . import domain as az

_SHAPE: Final = {  # kind -> (period, window, unit)
    QuotaKind.REQUESTS_PER_SECOND: (SECOND_US, Window.ROLLING, "requests"),
    QuotaKind.LONG_CONTEXT_REQUESTS_PER_SECOND: (SECOND_US, Window.ROLLING, "requests"),
    QuotaKind.TOKENS_PER_MINUTE: (MINUTE_US, Window.ROLLING, "tokens"),
    QuotaKind.REQUESTS_PER_DAY: (DAY_US, Window.CALENDAR, "requests"),
}


def counter_key(org_id: str, name: str) -> str:
    """A counter of the org; the braces make every counter of one org share a slot."""
    return f"{{{org_id}}}:{name}"


def is_long_context(quota: Quota, policy: SpendPolicy, context_tokens: int) -> bool:
    """Whether a request with this context counts against a long-context quota: from the
    quota's own threshold, else the spend policy's; never when neither is set."""
    threshold = quota.long_context_threshold_tokens or policy.long_context_threshold_tokens
    return threshold > 0 and context_tokens >= threshold


def applicable(request: az.AuthorizeRequest, quotas: Sequence[Quota], policy: SpendPolicy,
               hits: int = 1) -> list[tuple[Quota, Limit]]:
    """The quotas that count this request, each with the limit it consumes (`hits` requests
    at once: Envoy's hits_addend)."""
    found = []
    for quota in quotas:
        if not quota.applies_to(request.project_id, request.environment, request.api_key_id):
            continue
        if (quota.kind is QuotaKind.LONG_CONTEXT_REQUESTS_PER_SECOND
                and not is_long_context(quota, policy, request.context_tokens)):
            continue
        period, window, _ = _SHAPE[quota.kind]
        cost = (request.estimated_input_tokens + request.max_output_tokens
                if quota.kind is QuotaKind.TOKENS_PER_MINUTE else hits)
        found.append((quota, Limit(
            counter_key(request.org_id, f"quota:{quota.quota_id}"), quota.limit, period,
            window=window, burst=quota.burst if window is Window.ROLLING else 0, cost=cost,
            hard=quota.enforcement is QuotaEnforcement.HARD)))
    return found


def throttle_limit(org_id: str, policy: SpendPolicy) -> Limit | None:
    """The rate a THROTTLED org may still run at; None when the policy allows none."""
    rate = policy.throttled_requests_per_second
    return Limit(counter_key(org_id, "throttled"), rate, SECOND_US) if rate > 0 else None


def _retry_ms(retry_after_us: int) -> int:
    return max(1, -(-retry_after_us // 1000))


class LimiterGate:
    """Authorizer's QuotaGate and throttle over a Limiter (in-process or Redis)."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def admit(self, request: az.AuthorizeRequest, quotas: Sequence[Quota],
                    policy: SpendPolicy, hits: int = 1
                    ) -> tuple[az.Answer | None, list[az.Headroom]]:
        """Consumes every applicable quota or none: (a QUOTA_EXCEEDED DENY or None, headroom
        under each quota)."""
        counted = applicable(request, quotas, policy, hits)
        if not counted:
            return None, []
        verdict = await self.limiter.acquire([limit for _, limit in counted])
        headroom = [az.Headroom(f"quota:{quota.quota_id}", _SHAPE[quota.kind][2], quota.limit,
                                left) for (quota, _), left in zip(counted, verdict.remaining,
                                                                 strict=True)]
        if verdict.allowed:
            return None, headroom
        names = ", ".join(f"{q.kind.value} {q.limit} on {q.scope.value}"
                          f"{':' + q.scope_value if q.scope_value else ''} ({q.quota_id})"
                          for q in (counted[i][0] for i in verdict.denied_by))
        why = "limiter unavailable, failing closed" if verdict.degraded else "exhausted"
        return az.deny(Reason.QUOTA_EXCEEDED, f"quota {why}: {names}",
                       retry_after_ms=_retry_ms(verdict.retry_after_us),
                       headroom=headroom), headroom

    async def throttle(self, org_id: str, policy: SpendPolicy) -> az.Answer | None:
        """An ACCOUNT_THROTTLED DENY when the throttled org is past its reduced rate."""
        limit = throttle_limit(org_id, policy)
        if limit is None:
            return az.deny(Reason.ACCOUNT_THROTTLED,
                           f"org {org_id} is throttled and its spend policy allows no requests",
                           retry_after_ms=1000)
        verdict = await self.limiter.acquire([limit])
        if verdict.allowed:
            return None
        return az.deny(Reason.ACCOUNT_THROTTLED,
                       f"org {org_id} is throttled to {limit.amount} requests per second",
                       retry_after_ms=_retry_ms(verdict.retry_after_us))
