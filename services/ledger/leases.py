"""Credit leases: a holder's (metering's) durable hold on a slice of an org's available credit.

Metering admits requests against its lease locally (one statement in its own database) and
comes here only to grow, renew or give back the lease, so no request waits on a ledger hop
while the lease lasts. The ledger stays the only place credit lives:

- The lease's hold, granted - consumed - returned, is part of the org account's held_micros
  (available = posted - held stays exact). All four counters only grow, so a holder can
  compare what it knows with the ledger's figures whatever order answers arrive in.
- Usage items that name the lease are paid from its hold first (`UsageLeases`, called from
  the usage debit): `charged` grows by their cost, `consumed` by the part the hold paid; the
  rest is debited plainly like any usage (so credit is never counted twice, and usage beyond
  the hold never fails).
- The ledger shrinks a lease itself when the org's credit can no longer back it (`fit`, run
  by every transaction's flush): READ_ONLY returns the whole hold; available below zero
  (refund, grant expiry, adjustment) returns what is missing. Each change is a LEASE_CHANGED
  outbox event the holder follows. Until it sees the event the holder may still admit
  requests against what it knew: never more than the lease held before the change.
- A lease not extended before its ttl ends (`expire`): its hold is returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from services.ledger import domain as d
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid

if TYPE_CHECKING:
    from services.ledger.store import Work

MAX_LEASE_TTL: Final = timedelta(days=1)
OPEN: Final = "OPEN"
ENDED: Final = "ENDED"


@dataclass(slots=True)
class Lease:
    """One credit lease as stored (see the module docstring)."""

    lease_id: str
    org_id: str
    holder: str
    granted_micros: int
    charged_micros: int
    consumed_micros: int
    returned_micros: int
    in_flight_micros: int
    state: str
    expires_at: datetime
    dirty: bool = False

    @property
    def hold_micros(self) -> int:
        """Credit the lease holds now."""
        return self.granted_micros - self.consumed_micros - self.returned_micros

    def give_back(self, amount: int) -> int:
        """Returns up to `amount` of the hold; how much was returned."""
        returned = min(max(amount, 0), self.hold_micros)
        self.returned_micros += returned
        self.dirty = True
        return returned


@dataclass(frozen=True, slots=True)
class ExtendLease:
    """Grow, shrink or renew a lease (the ExtendLease RPC)."""

    request_id: str
    lease_id: str
    org_id: str
    holder: str
    add_micros: int
    return_micros: int
    ttl: timedelta
    in_flight_micros: int
    caller: d.Caller

    def problems(self) -> list[FieldViolation | None]:
        return [d.check_id("request_id", self.request_id), d.check_id("lease_id", self.lease_id),
                d.check_id("org_id", self.org_id), d.check_id("holder", self.holder),
                d.check_amount("add_micros", self.add_micros, allow_zero=True),
                d.check_amount("return_micros", self.return_micros, allow_zero=True),
                d.check_amount("in_flight_micros", self.in_flight_micros, allow_zero=True),
                None if timedelta(0) < self.ttl <= MAX_LEASE_TTL else FieldViolation(
                    "ttl_seconds", f"must be 1..{int(MAX_LEASE_TTL.total_seconds())}")]

    def fingerprint(self) -> str:
        return d.fingerprint(self.lease_id, self.org_id, self.holder, self.add_micros,
                             self.return_micros, self.ttl.total_seconds())


@dataclass(frozen=True, slots=True)
class Extended:
    """ExtendLease's answer."""

    lease: Lease
    added_micros: int
    available_micros: int
    billing_state: d.BillingState


_COLUMNS: Final = ("lease_id, org_id, holder, granted_micros, charged_micros, consumed_micros, "
                   "returned_micros, in_flight_micros, state, expires_at")


def _lease(r: Any) -> Lease:
    return Lease(r["lease_id"], r["org_id"], r["holder"], r["granted_micros"],
                 r["charged_micros"], r["consumed_micros"], r["returned_micros"],
                 r["in_flight_micros"], r["state"], r["expires_at"])


async def _lock(work: Work, where: str, *args: Any) -> list[Lease]:
    rows = await work.conn.fetch(
        f"SELECT {_COLUMNS} FROM ledger.leases WHERE {where} ORDER BY lease_id FOR UPDATE", *args)
    return [_lease(r) for r in rows]


async def _write(work: Work, leases: Iterable[Lease]) -> None:
    changed = [x for x in leases if x.dirty]
    if not changed:
        return
    await work.conn.execute(
        "INSERT INTO ledger.leases (lease_id, org_id, holder, granted_micros, charged_micros, "
        "consumed_micros, returned_micros, in_flight_micros, state, expires_at, created_at, "
        "updated_at) SELECT u.*, $11, $11 FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], "
        "$10::timestamptz[]) AS u ON CONFLICT (lease_id) DO UPDATE SET "
        "granted_micros = EXCLUDED.granted_micros, charged_micros = EXCLUDED.charged_micros, "
        "consumed_micros = EXCLUDED.consumed_micros, returned_micros = EXCLUDED.returned_micros, "
        "in_flight_micros = EXCLUDED.in_flight_micros, state = EXCLUDED.state, "
        "expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at",
        [x.lease_id for x in changed], [x.org_id for x in changed],
        [x.holder for x in changed], [x.granted_micros for x in changed],
        [x.charged_micros for x in changed], [x.consumed_micros for x in changed],
        [x.returned_micros for x in changed], [x.in_flight_micros for x in changed],
        [x.state for x in changed], [x.expires_at for x in changed], work.now)
    for lease in changed:
        lease.dirty = False


def _emit_changed(work: Work, lease: Lease) -> None:
    work.emit(lease.org_id, d.OutboxEventType.LEASE_CHANGED, lease_id=lease.lease_id,
              granted_micros=str(lease.granted_micros),
              charged_micros=str(lease.charged_micros),
              consumed_micros=str(lease.consumed_micros),
              returned_micros=str(lease.returned_micros), state=lease.state)


class LeaseStore:
    """Postgres persistence of credit leases, on the ledger store's units of work."""

    def __init__(self, store: Any) -> None:
        self.store = store  # services.ledger.store.LedgerStore (its pool, clock and Work)

    async def extend(self, cmd: ExtendLease) -> Extended:
        """Applies the return, then grants up to `add_micros` of the available credit, and
        renews the ttl. A replay answers the lease as it is now."""
        d.raise_if(cmd.problems())
        from services.ledger.store import Work  # the store imports this module

        async with self.store.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.store.clock(), cmd.caller)
            claimed = await work.claim(f"lease:{cmd.request_id}", cmd.fingerprint())
            await work.lock_orgs([cmd.org_id])
            account = work.org(cmd.org_id)
            found = await _lock(work, "lease_id = $1", cmd.lease_id)
            if found and found[0].org_id != cmd.org_id:
                raise invalid("lease_id", f"lease {cmd.lease_id!r} is another org's")
            if not claimed:
                if not found:
                    raise invalid("request_id", f"{cmd.request_id!r} was a refused request")
                return Extended(found[0], 0, work.available(cmd.org_id), account.billing_state)
            lease = found[0] if found else Lease(
                cmd.lease_id, cmd.org_id, cmd.holder, 0, 0, 0, 0, 0, OPEN, work.now, dirty=True)
            if lease.state != OPEN or (found and lease.expires_at <= work.now):
                raise TallyError(Reason.RESERVATION_EXPIRED,
                                 f"lease {cmd.lease_id} ended: open a new one",
                                 field="lease_id")
            if cmd.add_micros and account.billing_state is d.BillingState.READ_ONLY:
                raise TallyError(Reason.ACCOUNT_READ_ONLY,
                                 f"org {cmd.org_id} is read-only: no new holds",
                                 metadata={"org_id": cmd.org_id})
            account.held -= lease.give_back(cmd.return_micros)
            added = min(cmd.add_micros, max(work.available(cmd.org_id), 0))
            lease.granted_micros += added
            account.held += added
            lease.in_flight_micros = cmd.in_flight_micros
            lease.expires_at = work.now + cmd.ttl
            lease.dirty = account.dirty = True
            await _write(work, [lease])
            await work.flush(follow_the_money=False)
        self.store.lease_expiry.due(lease.expires_at)
        return Extended(lease, added, work.available(cmd.org_id), account.billing_state)

    async def get(self, lease_id: str) -> Lease | None:
        """One lease, as stored."""
        row = await self.store.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM ledger.leases WHERE lease_id = $1", lease_id)
        return _lease(row) if row else None

    async def next_expiry(self) -> datetime | None:
        """When the next open lease reaches its ttl (the sweeper waits until then)."""
        found: datetime | None = await self.store.pool.fetchval(
            "SELECT min(expires_at) FROM ledger.leases WHERE state = 'OPEN'")
        return found

    async def expire(self, limit: int = 500) -> int:
        """Ends the open leases past their ttl and returns their holds (the sweeper)."""
        from services.ledger.store import Work

        now = self.store.clock()
        async with self.store.pool.acquire() as conn, conn.transaction():
            orgs = [r["org_id"] for r in await conn.fetch(
                "SELECT DISTINCT org_id FROM ledger.leases WHERE state = 'OPEN' "
                "AND expires_at <= $1 LIMIT $2", now, limit)]
            if not orgs:
                return 0
            work = Work(conn, now, d.Caller(actor="service:ledger-sweeper"))
            await work.lock_orgs(orgs)
            ended = [x for x in await _lock(work, "org_id = ANY($1) AND state = 'OPEN'", orgs)
                     if x.expires_at <= now]
            for lease in ended:
                work.org(lease.org_id).held -= lease.give_back(lease.hold_micros)
                work.org(lease.org_id).dirty = True
                lease.state = ENDED
                _emit_changed(work, lease)
            await _write(work, ended)
            await work.flush(follow_the_money=False)
            return len(ended)


async def totals_of(conn: Any, org_id: str) -> tuple[int, int]:
    """(leased, in flight) of an org's open leases, for GetBalance."""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(granted_micros - consumed_micros - returned_micros), 0)::bigint "
        "AS leased, coalesce(sum(in_flight_micros), 0)::bigint AS in_flight "
        "FROM ledger.leases WHERE org_id = $1 AND state = 'OPEN'", org_id)
    return int(row["leased"]), int(row["in_flight"])


class UsageLeases:
    """The leases a usage debit pays from (hooked into the usage debit of the ledger store:
    the one place usage is debited per org)."""

    def __init__(self, work: Work, leases: Sequence[Lease]) -> None:
        self.work = work
        self.by_id = {x.lease_id: x for x in leases}

    @classmethod
    async def lock(cls, work: Work, items: Sequence[d.UsageItem]) -> UsageLeases:
        """Locks the open leases the items name (after the orgs: the global lock order)."""
        return await cls.lock_ids(work, [i.lease_id for i in items])

    @classmethod
    async def lock_ids(cls, work: Work, lease_ids: Iterable[str]) -> UsageLeases:
        """Locks the open leases of `lease_ids` ("" = none), after the orgs and their
        reservations (the global lock order)."""
        ids = sorted({i for i in lease_ids if i})
        if not ids:
            return cls(work, [])
        return cls(work, await _lock(work, "lease_id = ANY($1) AND state = 'OPEN'", ids))

    def take(self, org_id: str, lease_id: str, cost: int) -> int:
        """Charges `cost` to the lease and takes what its hold covers; returns the part paid,
        which the caller frees from the org's held credit (the rest is debited plainly)."""
        lease = self.by_id.get(lease_id)
        if lease is None or lease.org_id != org_id:
            return 0
        paid = min(cost, lease.hold_micros)
        lease.charged_micros += cost
        lease.consumed_micros += paid
        lease.dirty = True
        return paid

    def pay(self, org_id: str, lease_id: str, cost: int) -> int:
        """`take`, and frees the part paid from the org's held credit in the unit of work."""
        paid = self.take(org_id, lease_id, cost)
        if paid:
            account = self.work.org(org_id)
            account.held -= paid
            account.dirty = True
        return paid

    async def write(self) -> None:
        await _write(self.work, self.by_id.values())


async def reclaim(work: Work, org_id: str, amount: int) -> int:
    """Before the ledger itself takes credit from a locked org (refund, grant expiry, negative
    adjustment, reversal): its open leases give back what `amount` needs beyond available.
    Returns how much was given back."""
    account = work.org(org_id)
    needed = amount - (account.balance - account.held)
    if needed <= 0 or account.held <= 0:
        return 0
    reclaimed = 0
    for lease in await _lock(work, "org_id = $1 AND state = 'OPEN'", org_id):
        returned = lease.give_back(needed - reclaimed)
        if returned:
            reclaimed += returned
            _emit_changed(work, lease)
        await _write(work, [lease])
        if reclaimed >= needed:
            break
    account.held -= reclaimed
    account.dirty = True
    return reclaimed


def short_of_credit(work: Work) -> dict[str, Any]:
    """The changed org accounts whose holds their credit may no longer back: READ_ONLY, or
    holding more than they have (no query: Work.flush asks on every write)."""
    return {a.org_id: a for a in work.accounts.values()
            if a.dirty and a.kind is d.AccountKind.ORG_CREDIT and a.org_id and a.held > 0
            and (a.billing_state is d.BillingState.READ_ONLY or a.balance < a.held)}


async def fit(work: Work, short: dict[str, Any]) -> None:
    """Shrinks the leases of the `short` orgs: all of a READ_ONLY org's, what is missing
    when available went below zero (called by Work.flush)."""
    for lease in await _lock(work, "org_id = ANY($1) AND state = 'OPEN'", sorted(short)):
        account = short[lease.org_id]
        missing = (lease.hold_micros if account.billing_state is d.BillingState.READ_ONLY
                   else account.held - account.balance)
        returned = lease.give_back(missing)
        if returned:
            account.held -= returned
            _emit_changed(work, lease)
        await _write(work, [lease])
