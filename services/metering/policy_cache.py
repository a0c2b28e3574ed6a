"""What Authorize reads about an org on every call — spend policy, quotas, budgets — kept for
a short while, so the hot path does not query three tables per request.

A change made through the management RPCs (or SQL) reaches every replica within the ttl;
0 turns the cache off. Budget *spend* is never cached: it is read under the row lock.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .policies import Budget, Quota, SpendPolicy
from .spend.authorizer import PolicySource

T = TypeVar("T")


class PolicyCache:
    """A PolicySource in front of another, with per-org entries that expire."""

    def __init__(self, source: PolicySource, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[tuple[str, str], tuple[float, object]] = {}

    async def _cached(self, kind: str, org_id: str, load: Callable[[str], Awaitable[T]]) -> T:
        if self.ttl_s <= 0:
            return await load(org_id)
        now = self.clock()
        entry = self._entries.get((kind, org_id))
        if entry is not None and entry[0] > now:
            return entry[1]  # type: ignore[return-value]
        value = await load(org_id)
        if len(self._entries) > 100_000:  # bounded: drop what has expired
            self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
        self._entries[(kind, org_id)] = (now + self.ttl_s, value)
        return value

    async def policy_for(self, org_id: str) -> SpendPolicy:
        """The org's spend policy."""
        return await self._cached("policy", org_id, self.source.policy_for)

    async def quotas_for(self, org_id: str) -> list[Quota]:
        """The org's live quotas."""
        return await self._cached("quotas", org_id, self.source.quotas_for)

    async def budgets_of(self, org_id: str) -> list[Budget]:
        """The org's live budgets."""
        return await self._cached("budgets", org_id, self.source.budgets_of)

    def forget(self, org_id: str) -> None:
        """Drops what is cached of the org (after a change made through this replica)."""
        for kind in ("policy", "quotas", "budgets"):
            self._entries.pop((kind, org_id), None)
