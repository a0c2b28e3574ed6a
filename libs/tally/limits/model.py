"""What a limit is and how one decision consumes it — the arithmetic both backends share.

A decision names several limits (the org's QPS, the project's tokens per minute, the API
key's requests per day, ...) and consumes every one of them or none. Hard limits deny;
soft limits never deny but are counted, so their headroom can go negative.

ROLLING limits are a token bucket kept as GCRA-style backlog, in exact integers: every unit
consumed adds `period_us` to the backlog, time drains it at `amount` per microsecond, and a
request fits while the backlog stays within `capacity * period_us` (capacity = amount +
burst). So an idle limit admits `capacity` at once and then exactly `amount` per period.
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


def rolling_step(limit: Limit, backlog: int, last_us: int, now_us: int
                 ) -> tuple[bool, int, int, int, int]:
    """One rolling limit whose state is (backlog, last_us), asked for `limit.cost` at
    `now_us`: (fits, backlog if consumed, remaining if consumed, remaining if not, retry
    after µs when it does not fit). Remaining goes negative only for a soft limit."""
    current = drain(backlog, now_us - last_us, limit.amount)
    after = current + limit.cost * limit.period_us
    ceiling = limit.capacity * limit.period_us
    fits = after <= ceiling
    retry = 0 if fits else -(-(after - ceiling) // limit.amount)
    return (fits, after, (ceiling - after) // limit.period_us,
            (ceiling - current) // limit.period_us, retry)


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
