"""What a limit is and how one decision consumes it — the arithmetic both backends share.

A decision names several limits (the org's QPS, the project's tokens per minute, the API
key's requests per day, ...) and consumes every one of them or none. Hard limits deny;
soft limits never deny but are counted, so their headroom can go negative.

ROLLING limits: `amount` per `period` means no window of that length ever admits more than
`capacity` = amount + burst units (with burst 0: never more than `amount`), and over time no
more than `amount` per period. Two checks, both in exact integers, a request must pass:

- a sliding window: each period is cut into SLOTS slots; a unit counts in its slot until
  SLOTS + 1 slots have begun after it, and a request fits while the units counted plus its
  cost stay within `capacity`. Every window of `period` lies inside the SLOTS + 1 newest
  slots, so none ever holds more than `capacity`. The price: a unit stops counting up to one
  slot (period / SLOTS) later than one period after it was admitted.
- a token bucket kept as GCRA-style backlog: every unit consumed adds `period_us` to the
  backlog, time drains it at `amount` per microsecond, and a request fits while the backlog
  stays within `capacity * period_us`. With burst 0 the window is the tighter bound; with a
  burst, the bucket pays the burst back (after `capacity` at once, `amount` per period).

A plain token bucket (the bucket alone) admits `capacity` at once and then refills while the
same window is still open, so an idle limit of `amount` per second admitted about 2 x amount
in its first second; the window check is what makes `limit` per `window` hold.
CALENDAR limits count in fixed windows aligned to the Unix epoch (a day window is a UTC day).

The Lua script in `gcra.lua` is the same arithmetic; the in-process limiter is this module's.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

MAX_SCALED: Final = 2**53
"""Redis runs Lua with doubles: every scaled quantity must stay exactly representable."""

SLOTS: Final = 10
"""Slots per period of a rolling limit's sliding window (see the module docstring)."""

SECOND_US: Final = 1_000_000
MINUTE_US: Final = 60 * SECOND_US
DAY_US: Final = 86_400 * SECOND_US


class Window(enum.StrEnum):
    """How a limit measures time."""

    ROLLING = "R"
    CALENDAR = "C"


@dataclass(frozen=True, slots=True)
class Limit:
    """One counter a decision consumes `cost` units of."""

    key: str
    """Where the counter lives; for Redis Cluster, keys of one decision share a {hash tag}."""
    amount: int
    """Units allowed per period."""
    period_us: int
    window: Window = Window.ROLLING
    burst: int = 0
    """ROLLING only: units allowed at once above one period's amount."""
    cost: int = 1
    hard: bool = True
    """Hard limits deny; soft limits are counted and reported only."""
    wire: tuple[str, int, int, int, int, int] = field(init=False, repr=False, compare=False)
    """The limit as the Lua script reads it (built once: decisions are hot)."""

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("limit key is empty")
        if self.amount <= 0 or self.period_us <= 0 or self.burst < 0 or self.cost < 0:
            raise ValueError(f"limit {self.key}: amount and period must be > 0, "
                             "burst and cost >= 0")
        if self.window is Window.CALENDAR and self.burst:
            raise ValueError(f"limit {self.key}: calendar windows have no burst")
        if self.capacity * self.period_us >= MAX_SCALED:
            raise ValueError(f"limit {self.key}: capacity x period exceeds 2^53")
        object.__setattr__(self, "wire", (self.window.value, self.amount, self.period_us,
                                          self.capacity, self.cost, 1 if self.hard else 0))

    @property
    def capacity(self) -> int:
        """Units an idle limit admits at once."""
        return self.amount + self.burst


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision over several limits."""

    allowed: bool
    remaining: tuple[int, ...]
    """Per limit, units left after this decision (before it, when denied)."""
    retry_after_us: int = 0
    """When denied: how long until every denying limit would admit the same request."""
    denied_by: tuple[int, ...] = ()
    """Indexes of the hard limits that denied."""
    degraded: bool = False
    """Decided by the outage policy, not by the shared counters."""


class Limiter(Protocol):
    """Consumes every limit of a decision, or none."""

    async def acquire(self, limits: Sequence[Limit]) -> Verdict:
        """The verdict on one decision; counters change only when it is allowed."""
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


def drain(backlog: int, elapsed_us: int, amount: int) -> int:
    """A rolling limit's backlog after `elapsed_us` of draining at `amount` per microsecond."""
    if elapsed_us <= 0:
        return backlog
    if elapsed_us * amount >= backlog:
        return 0
    return backlog - elapsed_us * amount


def slot_us(period_us: int) -> int:
    """The length of one slot of a rolling limit's window (SLOTS of them cover a period)."""
    return -(-period_us // SLOTS)


def shifted(counts: Sequence[int], base: int, slot: int) -> list[int]:
    """The window's SLOTS + 1 counts (oldest first) as of `slot`, from counts as of `base`."""
    gap = slot - base
    if gap <= 0:
        return list(counts)
    if gap > SLOTS:
        return [0] * (SLOTS + 1)
    return [*counts[gap:], *([0] * gap)]


EMPTY_WINDOW: Final = (0,) * (SLOTS + 1)


@dataclass(frozen=True, slots=True)
class RollingStep:
    """One rolling limit asked for its cost at some time."""

    fits: bool
    backlog: int
    """The bucket's backlog if consumed."""
    slot: int
    """The window's newest slot now."""
    window: list[int]
    """The window's counts if consumed (oldest first)."""
    left: int
    """Remaining if consumed (negative only for a soft limit)."""
    left_before: int
    """Remaining if not consumed."""
    retry_us: int
    """When it does not fit: how long until it would."""
    idle_at_us: int
    """When, if consumed, the limit is back to idle (nothing in the bucket or window)."""


def rolling_step(limit: Limit, backlog: int, last_us: int, base: int, counts: Sequence[int],
                 now_us: int) -> RollingStep:
    """One rolling limit whose state is (backlog, last_us, base slot, window counts), asked
    for `limit.cost` at `now_us`. Remaining and the retry are those of the tighter check."""
    amount, period, capacity, cost = limit.amount, limit.period_us, limit.capacity, limit.cost
    current = drain(backlog, now_us - last_us, amount)
    after = current + cost * period
    ceiling = capacity * period
    bucket_fits = after <= ceiling
    retry = 0 if bucket_fits else -(-(after - ceiling) // amount)
    length = slot_us(period)
    slot = now_us // length
    window = shifted(counts, base, slot)
    counted = sum(window)
    window_fits = counted + cost <= capacity
    if not window_fits:
        # the oldest slots leave the window one by one: the first moment enough has left
        running = counted
        wait = (slot + SLOTS + 1) * length - now_us
        for age, units in enumerate(window):
            running -= units
            if running + cost <= capacity:
                wait = (slot + age + 1) * length - now_us
                break
        retry = max(retry, wait)
    left = min((ceiling - after) // period, capacity - counted - cost)
    left_before = min((ceiling - current) // period, capacity - counted)
    window[-1] += cost
    idle = max(now_us + -(-after // amount), (slot + SLOTS + 1) * length)
    return RollingStep(bucket_fits and window_fits, after, slot, window, left, left_before,
                       retry, idle)


def calendar_step(limit: Limit, window: int, count: int, now_us: int
                  ) -> tuple[bool, int, int, int, int, int]:
    """One calendar limit whose state is (window, count): (fits, window now, count if
    consumed, remaining if consumed, remaining if not, retry after µs when it does not fit:
    the start of the next window)."""
    current = now_us // limit.period_us
    used = count if window == current else 0
    after = used + limit.cost
    fits = after <= limit.amount
    retry = 0 if fits else (current + 1) * limit.period_us - now_us
    return fits, current, after, limit.amount - after, limit.amount - used, retry
