"""Credit leases as metering sees them, in plain Python: how big a lease should be and when
it needs the ledger.

An org's lease is a durable hold in the ledger on a slice of its available credit. Authorize
admits a request when the lease's free credit covers its worst case (one statement in
metering's database, `free = granted - returned - charged - held`) and only goes to the ledger
when it does not. Sizing: `window` seconds of the org's recent spend (what Authorize held in
the last `window` whole seconds, summed in integer micro-credits per second: no float is near
money), never less than `floor` nor more than `cap`; the ledger grants at most the org's
available credit, so a small org's lease is its whole balance.

What a lease may cost in overshoot (the bound the docs state): when the ledger takes credit
away (READ_ONLY, a refund, grant expiry, an adjustment) it shrinks the lease in the same
transaction and tells metering through its outbox; until metering has applied that, requests
admitted against the lease can together hold at most what the lease's free credit was at the
change, i.e. at most `cap` (and at most the lease's hold). After metering has applied it,
none is admitted against the lost credit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """How metering sizes and keeps its leases."""

    window: timedelta = timedelta(seconds=20)  # of recent spend a lease holds
    floor_micros: int = 10_000_000  # smallest lease worth asking for (10 credits)
    cap_micros: int = 1_000_000_000  # largest lease (1,000 credits): the overshoot bound
    ttl: timedelta = timedelta(seconds=120)  # the ledger returns an unrenewed lease then
    renew_before: timedelta = timedelta(seconds=40)  # renew an active lease this long before
    low_water_percent: int = 25  # top up in the background below this share of the target
    holder: str = "metering"


@dataclass(frozen=True, slots=True)
class LeaseFigures:
    """A lease as metering knows it (one row, shared by the replicas)."""

    org_id: str
    lease_id: str
    epoch: int
    granted_micros: int
    returned_micros: int
    charged_micros: int
    held_micros: int
    billing_state: str
    expires_at: datetime
    ledger_available_micros: int = 0  # the org's credit beyond its leases, as last told

    @property
    def spendable_micros(self) -> int:
        """What the org can still spend: the lease's free credit and what the ledger could
        still lease (as of its last answer)."""
        return max(self.free_micros, 0) + max(self.ledger_available_micros, 0)

    @property
    def free_micros(self) -> int:
        """What requests may still hold against the lease."""
        return (self.granted_micros - self.returned_micros - self.charged_micros
                - self.held_micros)


_NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class BurnRate:
    """What an org's requests held in the last `window_s` whole seconds, in integer
    micro-credits: one bucket per second (at most `window_s` of them), so the rate is
    `held // window_s` micro-credits per second and the lease's target is `held` itself."""

    window_s: int
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, micros held]
    held: int = 0  # the sum of the buckets

    def add(self, micros: int, now_ns: int) -> None:
        """Counts `micros` held at monotonic time `now_ns` (nanoseconds)."""
        second = self._expire(now_ns)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += micros
        else:
            self.buckets.append([second, micros])
        self.held += micros

    def held_in_window(self, now_ns: int) -> int:
        """Micro-credits held in the `window_s` seconds up to `now_ns`."""
        self._expire(now_ns)
        return self.held

    def micros_per_second(self, now_ns: int) -> int:
        """The burn rate: micro-credits per second over the window, rounded down."""
        return self.held_in_window(now_ns) // self.window_s

    def _expire(self, now_ns: int) -> int:
        second = now_ns // _NS_PER_S
        while self.buckets and self.buckets[0][0] <= second - self.window_s:
            self.held -= self.buckets.popleft()[1]
        return second


@dataclass(slots=True)
class Sizing:
    """How much a lease should hold, per org."""

    settings: LeaseSettings
    rates: dict[str, BurnRate] = field(default_factory=dict)
    _now_ns: int = 0  # the latest time seen (a target asked without one is as of it)

    def spent(self, org_id: str, micros: int, now_ns: int) -> None:
        """Authorize held `micros` for the org at monotonic time `now_ns` (nanoseconds)."""
        rate = self.rates.get(org_id)
        if rate is None:
            rate = self.rates[org_id] = BurnRate(max(self.settings.window // _SECOND, 1))
        rate.add(micros, now_ns)
        self._now_ns = max(self._now_ns, now_ns)

    def target(self, org_id: str, now_ns: int | None = None) -> int:
        """Free credit the org's lease should hold: `window` of its spend, floor to cap."""
        rate = self.rates.get(org_id)
        wanted = rate.held_in_window(self._now_ns if now_ns is None else now_ns) if rate else 0
        return min(max(wanted, self.settings.floor_micros), self.settings.cap_micros)

    def is_low(self, org_id: str, free_micros: int, now_ns: int | None = None) -> bool:
        """Whether the lease's free credit is below `low_water_percent` of its target."""
        return free_micros * 100 < self.target(org_id, now_ns) * self.settings.low_water_percent

    def to_add(self, free_micros: int, needed: int, org_id: str,
               now_ns: int | None = None) -> int:
        """What to ask the ledger for so that `needed` fits now and the target stays free."""
        return max(needed + self.target(org_id, now_ns) - free_micros, 0)


_SECOND = timedelta(seconds=1)
