"""Authorize's policy cache: entries last their ttl, a change through this replica is seen at
once, and a ttl of 0 reads through every time."""

from __future__ import annotations

from services.metering.policies import Budget, Quota, SpendPolicy
from services.metering.policy_cache import PolicyCache


class Counting:
    """A policy source that answers a new policy version on every read."""

    def __init__(self) -> None:
        self.reads = 0

    async def policy_for(self, org_id: str) -> SpendPolicy:
        self.reads += 1
        return SpendPolicy(org_id, max_context_tokens=self.reads)

    async def quotas_for(self, org_id: str) -> list[Quota]:
        self.reads += 1
        return []

    async def budgets_of(self, org_id: str) -> list[Budget]:
        self.reads += 1
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_entries_last_their_ttl_per_org() -> None:
    source, clock = Counting(), Clock()
    cache = PolicyCache(source, ttl_s=1.0, clock=clock)
    first = await cache.policy_for("acme")
    assert await cache.policy_for("acme") == first and source.reads == 1
    assert (await cache.policy_for("globex")).max_context_tokens == 2
    clock.now += 0.999
    assert await cache.policy_for("acme") == first
    clock.now += 0.001
    assert (await cache.policy_for("acme")).max_context_tokens == 3


async def test_forget_drops_every_kind_of_the_org_only() -> None:
    source, clock = Counting(), Clock()
    cache = PolicyCache(source, ttl_s=60.0, clock=clock)
    await cache.policy_for("acme")
    await cache.quotas_for("acme")
    await cache.budgets_of("acme")
    await cache.policy_for("globex")
    cache.forget("acme")
    reads = source.reads
    await cache.policy_for("acme")
    await cache.quotas_for("acme")
    await cache.budgets_of("acme")
    await cache.policy_for("globex")
    assert source.reads == reads + 3


async def test_a_zero_ttl_reads_through() -> None:
    source = Counting()
    cache = PolicyCache(source, ttl_s=0)
    for _ in range(3):
        await cache.policy_for("acme")
    assert source.reads == 3
