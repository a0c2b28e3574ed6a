"""LeaseManager: keeps each org's credit lease in the ledger big enough and alive, off the
request path, and applies what the ledger changes on its own.

- `ensure` is the only synchronous path: Authorize calls it when the lease cannot cover a
  request. One extension per org at a time per process (callers arriving meanwhile wait for
  it and then try their hold again).
- `held` is told of every hold: it sizes the lease (lease.Sizing) and, when the free credit
  runs below the low-water mark, queues a top-up for the background worker.
- Renewals are timers (at expires_at - renew_before), not queries: a lease with requests
  holding credit, or in use since its last renewal, is extended; an idle one is left to end at
  its ttl (the ledger returns its hold).
- `follow` reads the ledger's outbox stream: LEASE_CHANGED (the ledger shrank, revoked or
  ended a lease) and BILLING_STATE_CHANGED reach the lease row as soon as they are seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger

from .lease import LeaseFigures, LeaseSettings, Sizing
from .lease_store import LeaseStore

log = get_logger("metering.leases")


@dataclass(frozen=True, slots=True)
class LedgerLease:
    """The ledger's answer about a lease."""

    lease_id: str
    granted_micros: int
    charged_micros: int
    consumed_micros: int
    returned_micros: int
    ended: bool
    expires_at: datetime
    added_micros: int = 0
    available_micros: int = 0
    billing_state: str = "ACTIVE"

    @property
    def granted_for_metering(self) -> int:
        """Granted as metering counts it: usage charged to the lease that its hold did not
        pay was paid from available credit, so it is granted back (see the migration)."""
        return self.granted_micros + self.charged_micros - self.consumed_micros


@dataclass(frozen=True, slots=True)
class LedgerChange:
    """One event of the ledger's outbox that concerns leases."""

    sequence: int
    org_id: str
    lease: LedgerLease | None  # LEASE_CHANGED
    billing_state: str  # the org's state after the event


class LeasingLedger(Protocol):
    """The ledger as the lease manager needs it (the gRPC client implements it)."""

    async def extend_lease(self, request_id: str, lease_id: str, org_id: str, holder: str,
                           add_micros: int, return_micros: int, ttl: timedelta,
                           in_flight_micros: int) -> LedgerLease:
        """ExtendLease. Raises TallyError: ACCOUNT_READ_ONLY, RESERVATION_EXPIRED (the lease
        ended), UNAVAILABLE..."""
        ...

    def changes(self, after_sequence: int) -> AsyncIterator[LedgerChange]:
        """LEASE_CHANGED and BILLING_STATE_CHANGED events after `after_sequence`, as they
        commit (ends when the stream does)."""
        ...


def lease_id_for(org_id: str, epoch: int) -> str:
    """An org's lease of one epoch: derived, so replicas opening one at once open the same."""
    digest = hashlib.sha256(f"{org_id}\x1f{epoch}".encode()).hexdigest()[:40]
    return f"lease-{digest}"


class LeaseManager:
    """See the module docstring."""

    def __init__(self, store: LeaseStore, ledger: LeasingLedger, settings: LeaseSettings,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.ledger = ledger
        self.settings = settings
        self.sizing = Sizing(settings)
        self.monotonic_ns = monotonic_ns
        self.clock = clock
        self._flights: dict[str, asyncio.Task[tuple[LeaseFigures, int]]] = {}
        self._wanted: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._used: set[str] = set()  # orgs that held credit since their last renewal
        self.synchronous_calls = 0  # extensions a request waited for (the bench prints it)

    # -- the request path ------------------------------------------------------------------

    async def ensure(self, org_id: str, needed_micros: int) -> tuple[LeaseFigures, int]:
        """Extends the org's lease so `needed_micros` fits with the target free after it (or
        waits for the extension in flight). Returns the lease after it and what the ledger
        added. Raises the ledger's TallyError (ACCOUNT_READ_ONLY, UNAVAILABLE...)."""
        self.synchronous_calls += 1
        flight = self._flights.get(org_id)
        if flight is None:
            flight = asyncio.create_task(self._top_up(org_id, needed_micros))
            self._flights[org_id] = flight
            flight.add_done_callback(lambda _: self._flights.pop(org_id, None))
            return await asyncio.shield(flight)
        await asyncio.wait([flight])  # another request's extension: its answer is ours too
        if flight.cancelled():
            return await self.ensure(org_id, needed_micros)
        # its error too: a ledger that did not answer within the deadline is UNAVAILABLE for
        # every request waiting on it, at once (starting another extension each would queue
        # them one deadline after another)
        return flight.result()

    def held(self, org_id: str, micros: int, free_micros: int) -> None:
        """A request of the org now holds `micros`; the lease has `free_micros` left."""
        now_ns = self.monotonic_ns()
        self.sizing.spent(org_id, micros, now_ns)
        self._used.add(org_id)
        if self.sizing.is_low(org_id, free_micros, now_ns):
            self._want(org_id)

    # -- background ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Tops up and renews leases as asked (queue and timers) until `stop`."""
        for lease in await self.store.leases():  # a restart picks its leases up again
            if lease.expires_at > self.clock():
                if lease.held_micros:
                    self._used.add(lease.org_id)
                self._schedule(lease.org_id, lease.expires_at)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                taking = asyncio.ensure_future(self._wanted.get())
                await asyncio.wait((taking, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not taking.done():
                    taking.cancel()
                    break
                org_id = taking.result()
                self._queued.discard(org_id)
                try:
                    await self._renew(org_id)
                except Exception as exc:  # retried at the next want or timer
                    log.warning("lease_renewal_failed", org_id=org_id, error=repr(exc))
        finally:
            stopping.cancel()
            for timer in self._timers.values():
                timer.cancel()

    async def follow(self, stop: asyncio.Event) -> None:
        """Applies the ledger's lease and billing-state changes as they commit, until `stop`
        (reconnecting with capped backoff)."""
        delay = 0.1
        while not stop.is_set():
            try:
                async for change in self.ledger.changes(await self.store.cursor()):
                    await self.apply_change(change)
                    delay = 0.1
                    if stop.is_set():
                        return
            except Exception as exc:
                log.warning("ledger_stream_lost", error=repr(exc), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def apply_change(self, change: LedgerChange) -> None:
        """One change the ledger made on its own."""
        if change.lease is not None:
            await self.store.changed_by_ledger(
                change.lease.lease_id, change.lease.granted_for_metering,
                change.lease.returned_micros, change.lease.ended, self.clock())
        else:
            await self.store.billing_state_changed(change.org_id, change.billing_state)
        await self.store.advance(change.sequence)

    # -- internals -------------------------------------------------------------------------

    def _want(self, org_id: str) -> None:
        if org_id not in self._queued and org_id not in self._flights:
            self._queued.add(org_id)
            self._wanted.put_nowait(org_id)

    def _schedule(self, org_id: str, expires_at: datetime) -> None:
        earlier = self._timers.pop(org_id, None)
        if earlier is not None:
            earlier.cancel()
        due = (expires_at - self.settings.renew_before - self.clock()).total_seconds()
        self._timers[org_id] = asyncio.get_running_loop().call_later(
            max(due, 0.0), self._want, org_id)

    async def _renew(self, org_id: str) -> None:
        """A timer or a low-water mark: top up (and renew) a lease in use; let an idle one
        end at its ttl."""
        lease = await self.store.lease_of(org_id)
        in_use = org_id in self._used or (lease is not None and lease.held_micros > 0)
        if not in_use and lease is not None and self.clock() >= (
                lease.expires_at - self.settings.renew_before):
            # idle: its free credit goes back to the org now, the rest ends with the ttl
            await self.give_back(lease, lease.free_micros)
            return
        self._used.discard(org_id)
        await self._top_up(org_id, 0)

    async def give_back(self, lease: LeaseFigures, amount: int) -> None:
        """Returns `amount` of the lease's free credit to the org. Counted as returned here
        first (so no request is admitted against it meanwhile); if the ledger is not told,
        it stays unused until the lease ends."""
        if amount <= 0 or lease.expires_at <= self.clock():
            return
        if not await self.store.set_aside(lease.org_id, lease.lease_id, amount):
            return  # requests took it meanwhile
        answer = await self.ledger.extend_lease(
            str(uuid.uuid4()), lease.lease_id, lease.org_id, self.settings.holder, 0, amount,
            self.settings.ttl, lease.held_micros)
        await self.store.apply(lease.org_id, lease.lease_id, lease.epoch,
                               answer.granted_for_metering, answer.returned_micros,
                               answer.billing_state, answer.expires_at,
                               answer.available_micros)

    async def _top_up(self, org_id: str, needed: int) -> tuple[LeaseFigures, int]:
        lease = await self.store.lease_of(org_id)
        for _ in range(2):
            now = self.clock()
            fresh = lease is None or lease.expires_at <= now
            epoch = (lease.epoch + 1 if lease else 1) if fresh else lease.epoch  # type: ignore[union-attr]
            held = lease.held_micros if lease else 0
            # a new lease starts by covering what requests hold
            free = -held if fresh or lease is None else lease.free_micros
            lease_id = lease_id_for(org_id, epoch)
            try:
                answer = await self.ledger.extend_lease(
                    str(uuid.uuid4()), lease_id, org_id, self.settings.holder,
                    self.sizing.to_add(free, needed, org_id, self.monotonic_ns()), 0,
                    self.settings.ttl, held)
            except TallyError as exc:
                if exc.reason is not Reason.RESERVATION_EXPIRED or lease is None:
                    raise
                # ended by the ledger before metering saw it: open the next one
                lease = replace(lease, expires_at=now)
                continue
            figures = await self.store.apply(
                org_id, lease_id, epoch, answer.granted_for_metering, answer.returned_micros,
                answer.billing_state, answer.expires_at, answer.available_micros)
            self._schedule(org_id, answer.expires_at)
            return figures, answer.added_micros
        raise TallyError(Reason.UNAVAILABLE, f"ledger: lease of org {org_id} keeps ending")
