"""The limiter contract: both backends pass every test here, against a clock the test owns.

The Redis backend runs the Lua script on a real server; the in-process one the same
arithmetic in Python. A differential property test drives both with the same random
decisions and demands the same verdicts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.limits import (
    DAY_US,
    MINUTE_US,
    SECOND_US,
    InProcessLimiter,
    Limit,
    Limiter,
    RedisLimiter,
    Window,
)
from tally.limits.model import SLOTS


class Clock:
    """Microseconds the test moves by hand."""

    def __init__(self, now_us: int = 1_800_000_000 * SECOND_US) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, us: int) -> None:
        self.now_us += us


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["in-process", "redis"])
async def limiter(request: pytest.FixtureRequest, clock: Clock,
                  redis_url: str) -> AsyncIterator[Limiter]:
    backend: Limiter
    if request.param == "redis":
        backend = RedisLimiter(redis_url, clock_us=clock)
    else:
        backend = InProcessLimiter(clock)
    yield backend
    await backend.close()


def keys(*names: str) -> list[str]:
    """Fresh keys sharing one hash tag (one org), so tests never see each other's counters."""
    org = uuid.uuid4().hex[:12]
    return [f"{{{org}}}:{name}" for name in names]


def qps(key: str, amount: int, *, burst: int = 0, cost: int = 1, hard: bool = True) -> Limit:
    return Limit(key, amount, SECOND_US, burst=burst, cost=cost, hard=hard)


async def admitted(limiter: Limiter, limits: list[Limit], attempts: int) -> int:
    verdicts = [await limiter.acquire(limits) for _ in range(attempts)]
    return sum(v.allowed for v in verdicts)


async def test_an_idle_limit_admits_its_capacity_then_denies_with_retry_after(
        limiter: Limiter, clock: Clock) -> None:
    (key,) = keys("qps")
    first = await limiter.acquire([qps(key, 10)])
    assert first.allowed and first.remaining == (9,)
    assert await admitted(limiter, [qps(key, 10)], 20) == 9
    denied = await limiter.acquire([qps(key, 10)])
    assert not denied.allowed and denied.denied_by == (0,) and denied.remaining == (0,)
    # the ten stay in the window for a period and one slot (the clock sits on a slot's start)
    assert denied.retry_after_us == SECOND_US + SECOND_US // SLOTS
    clock.advance(denied.retry_after_us - 1)
    assert not (await limiter.acquire([qps(key, 10)])).allowed
    clock.advance(1)
    assert (await limiter.acquire([qps(key, 10)])).allowed


async def test_a_drained_limit_admits_exactly_its_amount_per_period(
        limiter: Limiter, clock: Clock) -> None:
    (key,) = keys("qps")
    assert await admitted(limiter, [qps(key, 100)], 150) == 100
    for _ in range(3):
        clock.advance(SECOND_US - 1)  # still the same one-second window: nothing more
        assert await admitted(limiter, [qps(key, 100)], 150) == 0
        clock.advance(1 + SECOND_US // SLOTS)  # a period and a slot after: the next hundred
        assert await admitted(limiter, [qps(key, 100)], 150) == 100


async def test_burst_adds_to_what_a_window_admits_and_is_paid_back(
        limiter: Limiter, clock: Clock) -> None:
    (key,) = keys("qps")
    limit = qps(key, 10, burst=5)
    assert await admitted(limiter, [limit], 30) == 15
    clock.advance(SECOND_US // 2)
    assert await admitted(limiter, [limit], 30) == 0  # never more than 15 in one window
    clock.advance(SECOND_US // 2 + SECOND_US // SLOTS)
    # the window is empty again, but the burst is paid back: 10 per second refilled 11
    assert await admitted(limiter, [limit], 30) == 11
    clock.advance(2 * SECOND_US)
    assert await admitted(limiter, [limit], 30) == 15  # idle again: the whole burst


async def test_a_denied_decision_consumes_none_of_its_limits(
        limiter: Limiter, clock: Clock) -> None:
    org, project, api_key = keys("org", "project", "key")
    assert await admitted(limiter, [qps(project, 2)], 2) == 2
    decision = [qps(org, 5), qps(project, 2), qps(api_key, 5)]
    for _ in range(10):
        verdict = await limiter.acquire(decision)
        assert not verdict.allowed and verdict.denied_by == (1,)
        assert verdict.remaining == (5, 0, 5)
    # the org and key counters are whole: 5 each, not 5 minus the ten refused attempts
    assert await admitted(limiter, [qps(org, 5), qps(api_key, 5)], 10) == 5


async def test_every_denying_limit_is_named_and_the_longest_wait_is_returned(
        limiter: Limiter) -> None:
    fast, slow = keys("fast", "slow")
    limits = [qps(fast, 10), Limit(slow, 1, MINUTE_US)]
    assert (await limiter.acquire(limits)).allowed
    assert await admitted(limiter, [qps(fast, 10)], 9) == 9
    verdict = await limiter.acquire(limits)
    assert verdict.denied_by == (0, 1)
    assert verdict.retry_after_us == MINUTE_US + MINUTE_US // SLOTS  # the minute's window


async def test_soft_limits_are_counted_past_their_limit_but_never_deny(
        limiter: Limiter) -> None:
    soft, hard = keys("soft", "hard")
    verdicts = [await limiter.acquire([qps(soft, 3, hard=False)]) for _ in range(5)]
    assert all(v.allowed for v in verdicts)
    assert [v.remaining[0] for v in verdicts] == [2, 1, 0, -1, -2]
    # a hard limit's denial leaves the soft counter alone too
    assert await admitted(limiter, [qps(hard, 1)], 1) == 1
    denied = await limiter.acquire([qps(soft, 3, hard=False), qps(hard, 1)])
    assert not denied.allowed and denied.denied_by == (1,) and denied.remaining == (-2, 0)


async def test_token_costs_are_consumed_per_unit(limiter: Limiter, clock: Clock) -> None:
    (key,) = keys("tpm")

    def tpm(cost: int) -> Limit:
        return Limit(key, 10_000, MINUTE_US, cost=cost)

    assert (await limiter.acquire([tpm(6_000)])).remaining == (4_000,)
    too_big = await limiter.acquire([tpm(5_000)])
    # the 6,000 leave the window a minute and a slot after they came
    assert not too_big.allowed and too_big.retry_after_us == MINUTE_US + MINUTE_US // SLOTS
    assert (await limiter.acquire([tpm(4_000)])).remaining == (0,)
    clock.advance(MINUTE_US // 2)
    assert not (await limiter.acquire([tpm(5_000)])).allowed  # 10,000 in this minute already
    clock.advance(MINUTE_US // 2 + MINUTE_US // SLOTS)
    assert (await limiter.acquire([tpm(5_000)])).allowed


async def test_a_cost_above_capacity_never_fits(limiter: Limiter) -> None:
    (key,) = keys("tpm")
    verdict = await limiter.acquire([Limit(key, 100, MINUTE_US, cost=101)])
    assert not verdict.allowed and verdict.retry_after_us > 0
    assert verdict.remaining == (100,)


async def test_calendar_windows_reset_at_the_window_boundary(
        limiter: Limiter, clock: Clock) -> None:
    (key,) = keys("qpd")
    day = Limit(key, 3, DAY_US, window=Window.CALENDAR)
    clock.now_us = 20_000 * DAY_US + DAY_US - 10 * SECOND_US  # ten seconds before midnight UTC
    assert await admitted(limiter, [day], 5) == 3
    denied = await limiter.acquire([day])
    assert denied.retry_after_us == 10 * SECOND_US and denied.remaining == (0,)
    clock.advance(10 * SECOND_US)
    assert (await limiter.acquire([day])).remaining == (2,)


async def test_concurrent_callers_cannot_overshoot(limiter: Limiter) -> None:
    org, project = keys("org", "project")
    verdicts = await asyncio.gather(*(limiter.acquire([qps(org, 1000), qps(project, 100)])
                                      for _ in range(500)))
    assert sum(v.allowed for v in verdicts) == 100
    follow = await limiter.acquire([qps(org, 1000)])
    assert follow.remaining == (1000 - 100 - 1,)


OPS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 3 * SECOND_US)),
    st.tuples(st.just("acquire"), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)),
                                           min_size=1, max_size=3, unique_by=lambda t: t[0]))),
    max_size=40)
SHAPES = [
    dict(amount=5, period_us=SECOND_US, burst=2),
    dict(amount=7, period_us=3 * SECOND_US, hard=False),
    dict(amount=100, period_us=MINUTE_US),
    dict(amount=4, period_us=2 * SECOND_US, window=Window.CALENDAR),
]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_both_backends_give_the_same_verdicts(redis_url: str, ops: list) -> None:
    clock = Clock()
    memory, shared = InProcessLimiter(clock), RedisLimiter(redis_url, clock_us=clock)
    names = keys("a", "b", "c", "d")
    try:
        for op, arg in ops:
            if op == "advance":
                clock.advance(arg)
                continue
            decision = [Limit(names[i], cost=min(cost, 3) if i < 2 else cost, **SHAPES[i])
                        for i, cost in arg]
            assert await memory.acquire(decision) == await shared.acquire(decision)
    finally:
        await shared.close()


async def test_many_replicas_never_admit_more_than_the_limit_in_any_window(
        redis_url: str) -> None:
    """Four replicas (four Redis limiters), 100 concurrent callers at each instant, the clock
    moving in random steps over six periods: every window of one period, wherever it starts,
    holds at most `amount` admissions (burst 0), and the limit is used (not starved)."""
    import random

    clock = Clock()
    replicas = [RedisLimiter(redis_url, clock_us=clock) for _ in range(4)]
    (key,) = keys("qps")
    limit = qps(key, 20)
    admitted_at: list[int] = []
    rng = random.Random(7)
    try:
        start = clock.now_us
        while clock.now_us < start + 6 * SECOND_US:
            now = clock.now_us
            verdicts = await asyncio.gather(*(replicas[i % 4].acquire([limit])
                                              for i in range(100)))
            admitted_at += [now] * sum(v.allowed for v in verdicts)
            clock.advance(rng.randint(1, SECOND_US // 20))
    finally:
        for replica in replicas:
            await replica.close()
    admitted_at.sort()
    worst = max(sum(1 for t in admitted_at if s <= t <= s + SECOND_US) for s in admitted_at)
    assert worst == 20, f"a one-second window admitted {worst}"
    assert len(admitted_at) >= 6 * 20 * SECOND_US // (SECOND_US + SECOND_US // SLOTS) - 20
