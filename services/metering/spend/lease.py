"""Credit leases as metering sees them, in plain Python: how big a lease should be and when
it needs the ledger.

An org's lease is a durable hold in the ledger on a slice of its available credit. Authorize
admits a request when the lease's free credit covers its worst case (one statement in
metering's database, `free = granted - returned - charged - held`) and only goes to the ledger
when it does not. Sizing: `window` seconds of the org's recent spend (an exponentially
weighted rate of what Authorize held), never less than `floor` nor more than `cap`; the ledger
grants at most the org's available credit, so a small org's lease is its whole balance.

What a lease may cost in overshoot (the bound the docs state): when the ledger takes credit
away (READ_ONLY, a refund, grant expiry, an adjustment) it shrinks the lease in the same
transaction and tells metering through its outbox; until metering has applied that, requests
admitted against the lease can together hold at most what the lease's free credit was at the
change, i.e. at most `cap` (and at most the lease's hold). After metering has applied it,
none is admitted against the lost credit.
"""

from __future__ import annotations

import math
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
    low_water: float = 0.25  # top up in the background below this share of the target
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


@dataclass(slots=True)
class BurnRate:
    """Micro-credits per second an org's requests hold, exponentially weighted (half-life
    `half_life_s`): what sizes its lease."""

    half_life_s: float = 10.0
    rate: float = 0.0
    at: float = 0.0

    def add(self, micros: int, now: float) -> None:
        """Counts `micros` held at monotonic time `now`."""
        if self.at:
            elapsed = max(now - self.at, 1e-3)
            decay = math.exp(-elapsed * math.log(2) / self.half_life_s)
            self.rate = self.rate * decay + micros * (1 - decay) / elapsed
        else:
            self.rate = float(micros)
        self.at = now


@dataclass(slots=True)
class Sizing:
    """How much a lease should hold, per org."""

    settings: LeaseSettings
    rates: dict[str, BurnRate] = field(default_factory=dict)

    def spent(self, org_id: str, micros: int, now: float) -> None:
        """Authorize held `micros` for the org at monotonic time `now`."""
        self.rates.setdefault(org_id, BurnRate()).add(micros, now)

    def target(self, org_id: str) -> int:
        """Free credit the org's lease should hold: `window` of its spend, floor to cap."""
        rate = self.rates.get(org_id)
        wanted = int(rate.rate * self.settings.window.total_seconds()) if rate else 0
        return min(max(wanted, self.settings.floor_micros), self.settings.cap_micros)

    def to_add(self, free_micros: int, needed: int, org_id: str) -> int:
        """What to ask the ledger for so that `needed` fits now and the target stays free."""
        return max(needed + self.target(org_id) - free_micros, 0)
