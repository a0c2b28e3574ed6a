"""Metering's gRPC neighbours: the ledger it debits and the pricing service it watches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import grpc

from services.metering.ingestion import domain as ing
from services.metering.ingestion.domain import MAX_EVENT_AGE
from services.metering.spend.lease_manager import LedgerChange, LedgerLease
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError, from_rpc_error
from tally.kit.log import get_logger
from tally.kit.protoconv import to_timestamp
from tally.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tally.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from tally.rating import PriceBook, PriceBookHistory
from tally.sdk.pricebook import from_proto

log = get_logger("metering.adapters")

_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class GrpcLedger:
    """UsageLedger over LedgerService.PostUsageBatch."""

    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
                 timeout_s: float = 30.0) -> None:
        self.stub = stub
        self.timeout_s = timeout_s

    async def post_org_debits(self, batch_id: str, debits: Sequence[ing.OrgDebit]
                              ) -> list[ing.OrgOutcome]:
        """Posts one batch of org debits; an unreachable ledger is TallyError(UNAVAILABLE)."""
        request = ledger_pb2.PostUsageBatchRequest(batch_id=batch_id)
        add = request.org_debits.add
        for o in debits:
            debit = add(org_id=o.org_id, amount_micros=o.amount_micros,
                        event_count=o.event_count, events_digest=o.events_digest,
                        lease_id=o.lease_id)
            for c in o.captures:
                debit.captures.add(reservation_id=c.reservation_id, cost_micros=c.cost_micros,
                                   cost_before_micros=c.cost_before_micros)
        try:
            reply = await self.stub.PostUsageBatch(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNAVAILABLE_CODES:
                raise TallyError(Reason.UNAVAILABLE, f"ledger: {exc.details()}") from exc
            raise
        return [ing.OrgOutcome(r.org_id, r.transfer_id, r.arrears_transfer_id,
                               r.available_before_micros) for r in reply.org_results]


class GrpcReservingLedger:
    """ReservingLedger over LedgerService.Reserve and Release."""

    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
                 timeout_s: float = 5.0) -> None:
        self.stub = stub
        self.timeout_s = timeout_s

    async def reserve(self, reservation_id: str, org_id: str, amount_micros: int,
                      ttl: timedelta) -> tuple[int, str]:
        """Holds credit; the ledger's refusal arrives as its TallyError (via from_rpc_error).
        An org the ledger has no account for has no credit: INSUFFICIENT_CREDITS, which
        Authorize answers as a DENY (it was an INVALID_ARGUMENT error naming org_id)."""
        try:
            async with _translated():
                reply = await self.stub.Reserve(ledger_pb2.ReserveRequest(
                    reservation_id=reservation_id, org_id=org_id, amount_micros=amount_micros,
                    ttl_seconds=int(ttl.total_seconds())), timeout=self.timeout_s)
        except TallyError as exc:
            if exc.reason is Reason.INVALID_ARGUMENT and exc.field == "org_id":
                raise TallyError(Reason.INSUFFICIENT_CREDITS,
                                 f"org {org_id!r} has no credit account in the ledger",
                                 metadata={"org_id": org_id}) from exc
            raise
        state = common_pb2.BillingState.Name(reply.billing_state).removeprefix("BILLING_STATE_")
        return int(reply.available_micros), "ACTIVE" if state == "UNSPECIFIED" else state

    async def release(self, reservation_id: str, org_id: str, reason: str) -> None:
        """Frees a hold (idempotent in the ledger)."""
        async with _translated():
            await self.stub.Release(ledger_pb2.ReleaseRequest(
                reservation_id=reservation_id, org_id=org_id, reason=reason),
                timeout=self.timeout_s)


class GrpcLeasingLedger:
    """LeasingLedger over LedgerService.ExtendLease and StreamEvents."""

    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
                 timeout_s: float = 5.0) -> None:
        self.stub = stub
        self.timeout_s = timeout_s

    async def extend_lease(self, request_id: str, lease_id: str, org_id: str, holder: str,
                           add_micros: int, return_micros: int, ttl: timedelta,
                           in_flight_micros: int) -> LedgerLease:
        """ExtendLease; the ledger's refusal arrives as its TallyError. An org the ledger has
        no account for has no credit: INSUFFICIENT_CREDITS, which Authorize answers as a DENY
        (not an INVALID_ARGUMENT error naming org_id)."""
        try:
            async with _translated():
                reply = await self.stub.ExtendLease(ledger_pb2.ExtendLeaseRequest(
                    request_id=request_id, lease_id=lease_id, org_id=org_id, holder=holder,
                    add_micros=add_micros, return_micros=return_micros,
                    ttl_seconds=int(ttl.total_seconds()), in_flight_micros=in_flight_micros),
                    # a ledger that is (re)starting is waited for, within the deadline, rather
                    # than refused while the channel is between reconnect attempts
                    timeout=self.timeout_s, wait_for_ready=True)
        except TallyError as exc:
            if exc.reason is Reason.INVALID_ARGUMENT and exc.field == "org_id":
                raise TallyError(Reason.INSUFFICIENT_CREDITS,
                                 f"org {org_id!r} has no credit account in the ledger",
                                 metadata={"org_id": org_id}) from exc
            raise
        return _lease(reply.lease, reply.added_micros, reply.available_micros,
                      _state(reply.billing_state))

    async def changes(self, after_sequence: int) -> AsyncIterator[LedgerChange]:
        """The ledger's LEASE_CHANGED and BILLING_STATE_CHANGED events after the sequence."""
        stream = self.stub.StreamEvents(ledger_pb2.StreamEventsRequest(
            after_event_sequence=after_sequence,
            types=[ledger_pb2.OUTBOX_EVENT_TYPE_LEASE_CHANGED,
                   ledger_pb2.OUTBOX_EVENT_TYPE_BILLING_STATE_CHANGED]))
        async for reply in stream:
            for e in reply.events:
                lease = None
                if e.type == ledger_pb2.OUTBOX_EVENT_TYPE_LEASE_CHANGED:
                    a = e.attributes
                    lease = LedgerLease(
                        a["lease_id"], int(a["granted_micros"]), int(a["charged_micros"]),
                        int(a["consumed_micros"]), int(a["returned_micros"]),
                        a["state"] != "OPEN", e.occurred_at.ToDatetime(UTC))
                yield LedgerChange(e.sequence, e.org_id, lease, _state(e.billing_state))


def _state(state: int) -> str:
    name = common_pb2.BillingState.Name(state).removeprefix("BILLING_STATE_")  # type: ignore[arg-type]
    return "ACTIVE" if name == "UNSPECIFIED" else name


def _lease(x: ledger_pb2.Lease, added: int, available: int, state: str) -> LedgerLease:
    return LedgerLease(x.lease_id, x.granted_micros, x.charged_micros, x.consumed_micros,
                       x.returned_micros, x.state == ledger_pb2.LEASE_STATE_ENDED,
                       x.expires_at.ToDatetime(UTC), added, available, state)


@contextlib.asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """The ledger's errors as TallyErrors: its reasons, or UNAVAILABLE."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        translated = from_rpc_error(exc)
        if translated is not None:
            raise translated from exc
        if exc.code() in _UNAVAILABLE_CODES:
            raise TallyError(Reason.UNAVAILABLE, f"ledger: {exc.details()}") from exc
        raise


class WatchedPriceBooks:
    """The local copy of pricing's books, kept current by WatchPriceBook.

    Holds every book in force during the late-event window, so a late event is rated with the
    book of its time without calling pricing. If pricing goes away the last books stay in use
    and the watch reconnects with backoff.
    """

    def __init__(self, stub: pricing_pb2_grpc.PricingServiceAsyncStub) -> None:
        self.stub = stub
        self._history = PriceBookHistory()
        self.ready = asyncio.Event()

    @property
    def history(self) -> PriceBookHistory:
        """The books known so far."""
        return self._history

    def add(self, book: PriceBook) -> None:
        """Takes a book pushed by pricing (a version seen before is ignored)."""
        known = {b.version for b in self._history.books}
        if book.version not in known:
            self._history = self._history.with_book(book)
        self.ready.set()

    async def watch(self, stop: asyncio.Event) -> None:
        """Follows WatchPriceBook until `stop`, reconnecting with capped backoff."""
        delay = 0.1
        while not stop.is_set():
            since = datetime.now(UTC) - MAX_EVENT_AGE - timedelta(days=1)
            request = pricing_pb2.WatchPriceBookRequest(history_since=to_timestamp(since))
            try:
                async for reply in self.stub.WatchPriceBook(request):
                    self.add(from_proto(reply.book))
                    delay = 0.1
            except grpc.aio.AioRpcError as exc:
                log.warning("price_book_watch_lost", code=exc.code().name, retry_in_s=delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, 5.0)
