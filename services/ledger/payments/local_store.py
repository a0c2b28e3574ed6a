"""Where the local (development) provider keeps its checkout sessions, charges and refunds.

In memory for a provider of its own (tests, a single process), or in PostgreSQL when the ledger
runs it: then a checkout opened through one ledger replica can be paid on another replica's
page, and two replicas acting on one payment at once are serialized by its row lock.

In PostgreSQL the webhook events are kept too, written in the transaction that changed the
payment: a payment the provider took always has its event on record, and the event is sent
until the ledger answers 2xx, by whichever replica is alive: a real provider's webhooks outlive
the receiver's crash, so a SIGKILLed ledger must not be able to lose them here either.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from .provider import ProviderRefund

if TYPE_CHECKING:
    import asyncpg


@dataclass(slots=True)
class LocalPayment:
    """A checkout session or an off-session charge, and what happened to its money."""

    session_id: str
    """The id the order knows: cs_ for a checkout, pi_ for a charge."""
    payment_intent_id: str
    payment_order_id: str
    org_id: str
    amount_minor: int
    currency: str  # upper case, as the ledger speaks it
    description: str
    created_at: float
    payment_method: str = ""
    success_url: str = ""
    cancel_url: str = ""
    outcome: str = ""  # a charge's planned outcome (PAYMENT_METHODS value)
    charge_id: str = ""
    amount_refunded: int = 0
    is_paid: bool = False
    is_closed: bool = False
    """Expired or canceled (checkout), failed (charge): it can no longer be paid."""
    awaits_authentication: bool = False

    @property
    def is_checkout(self) -> bool:
        return self.session_id.startswith("cs_")

    @property
    def is_open(self) -> bool:
        return not self.is_paid and not self.is_closed


Event = dict[str, Any]
"""A webhook event as sent: Stripe-shaped JSON (id, object, type, created, data.object)."""


@dataclass(slots=True)
class EventAttempt:
    """This process's turn to send one event: how many attempts came before (by any replica),
    and, once made, what this one ends in."""

    attempts_before: int
    delivered: bool = False
    gave_up: bool = False
    next_attempt_at: float = 0.0
    """When the next attempt is due (unix seconds), if this one failed and another follows."""


@dataclass(frozen=True, slots=True)
class LocalRefund:
    """A refund made, under the idempotency key it was asked with."""

    session_id: str
    refund: ProviderRefund


class LocalPayments(Protocol):
    """The provider's state. `locked` is the only way to change a payment: what the block
    does to it is kept when the block ends normally or by an HTTP answer (a redirect)."""

    async def find(self, payment_id: str) -> LocalPayment | None:
        """A payment by its cs_ or pi_ id."""
        ...

    async def find_by_order(self, payment_order_id: str, *, checkout: bool
                            ) -> LocalPayment | None:
        ...

    async def add(self, payment: LocalPayment, *, checkout: bool) -> LocalPayment:
        """Stores a new payment; if one for its order was stored meanwhile, returns that."""
        ...

    def locked(self, payment_id: str, outbox: list[Event]) -> Any:
        """`async with` it: the payment (or None), held until the block ends; the events in
        `outbox` when the block ends are kept with the payment's change (all or nothing)."""
        ...

    def attempting(self, event_id: str, now: float
                   ) -> AbstractAsyncContextManager[EventAttempt | None]:
        """`async with` it around one delivery attempt: None when the event is delivered,
        given up, not yet due, or being attempted by another replica; else this process's
        turn, whose outcome (set on the EventAttempt) is kept when the block ends."""
        ...

    async def due_events(self, now: float, limit: int) -> list[Event]:
        """Events not delivered nor given up whose next attempt is due: the ones a crashed
        replica left (and retries whose sender is gone)."""
        ...

    async def next_event_due(self) -> float | None:
        """When the earliest pending event's next attempt is due, None if none is pending."""
        ...

    async def count(self) -> int:
        ...

    async def open_checkouts(self, created_before: float) -> list[str]:
        """Checkouts still open that were created before `created_before` (unix seconds)."""
        ...

    async def refund_of(self, idempotency_key: str) -> LocalRefund | None:
        ...

    async def add_refund(self, idempotency_key: str, record: LocalRefund) -> LocalRefund:
        """Stores a refund; if the key was used meanwhile, returns the stored one."""
        ...


class MemoryPayments:
    """One process's state (lost when it stops)."""

    def __init__(self) -> None:
        self._payments: dict[str, LocalPayment] = {}  # by cs_ and pi_ (a checkout: both)
        self._by_order: dict[tuple[str, bool], LocalPayment] = {}
        self._refunds: dict[str, LocalRefund] = {}
        self._attempts: dict[str, int] = {}  # delivery attempts made, by event id

    @property
    def is_empty(self) -> bool:
        return not self._by_order

    async def find(self, payment_id: str) -> LocalPayment | None:
        return self._payments.get(payment_id)

    async def find_by_order(self, payment_order_id: str, *, checkout: bool
                            ) -> LocalPayment | None:
        return self._by_order.get((payment_order_id, checkout))

    async def add(self, payment: LocalPayment, *, checkout: bool) -> LocalPayment:
        stored = self._by_order.setdefault((payment.payment_order_id, checkout), payment)
        if stored is payment:
            self._payments[payment.session_id] = payment
            self._payments[payment.payment_intent_id] = payment
        return stored

    @asynccontextmanager
    async def locked(self, payment_id: str, outbox: list[Event]
                     ) -> AsyncIterator[LocalPayment | None]:
        yield self._payments.get(payment_id)  # changed in place; one event loop, no awaits

    @asynccontextmanager
    async def attempting(self, event_id: str, now: float
                         ) -> AsyncIterator[EventAttempt | None]:
        # one process, one retry loop per event: the count is all there is to share
        attempt = EventAttempt(attempts_before=self._attempts.get(event_id, 0))
        yield attempt
        self._attempts[event_id] = attempt.attempts_before + 1

    async def due_events(self, now: float, limit: int) -> list[Event]:
        return []  # nothing outlives the process that would resume it

    async def next_event_due(self) -> float | None:
        return None

    async def count(self) -> int:
        return len(self._by_order)

    async def open_checkouts(self, created_before: float) -> list[str]:
        return [p.session_id for (_, checkout), p in self._by_order.items()
                if checkout and p.is_open and p.created_at < created_before]

    async def refund_of(self, idempotency_key: str) -> LocalRefund | None:
        return self._refunds.get(idempotency_key)

    async def add_refund(self, idempotency_key: str, record: LocalRefund) -> LocalRefund:
        return self._refunds.setdefault(idempotency_key, record)


class PostgresPayments:
    """The state in ledger.local_provider_payments / _refunds, shared by every replica."""

    def __init__(self, pool: asyncpg.Pool, *, attempts_pool: asyncpg.Pool | None = None) -> None:
        self.pool = pool
        self.attempts_pool = attempts_pool or pool
        """Where delivery attempts hold their claims: a pool of their own when the receiver
        of the webhooks shares `pool` (the ledger), else an attempt in flight could hold the
        connection its own answer waits for."""

    async def find(self, payment_id: str) -> LocalPayment | None:
        body = await self.pool.fetchval(
            "SELECT body FROM ledger.local_provider_payments "
            "WHERE session_id = $1 OR payment_intent_id = $1", payment_id)
        return _payment(body)

    async def find_by_order(self, payment_order_id: str, *, checkout: bool
                            ) -> LocalPayment | None:
        body = await self.pool.fetchval(
            "SELECT body FROM ledger.local_provider_payments "
            "WHERE payment_order_id = $1 AND is_checkout = $2", payment_order_id, checkout)
        return _payment(body)

    async def add(self, payment: LocalPayment, *, checkout: bool) -> LocalPayment:
        async with self.pool.acquire() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO ledger.local_provider_payments (session_id, payment_intent_id, "
                "payment_order_id, is_checkout, created_at, is_open, body) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) "
                "ON CONFLICT (payment_order_id, is_checkout) DO NOTHING RETURNING true",
                payment.session_id, payment.payment_intent_id, payment.payment_order_id,
                checkout, payment.created_at, payment.is_open, _body(payment))
            if inserted:
                return payment
            stored = await conn.fetchval(
                "SELECT body FROM ledger.local_provider_payments "
                "WHERE payment_order_id = $1 AND is_checkout = $2",
                payment.payment_order_id, checkout)
        found = _payment(stored)
        assert found is not None
        return found

    @asynccontextmanager
    async def locked(self, payment_id: str, outbox: list[Event]
                     ) -> AsyncIterator[LocalPayment | None]:
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            committed = False
            try:
                payment = _payment(await conn.fetchval(
                    "SELECT body FROM ledger.local_provider_payments "
                    "WHERE session_id = $1 OR payment_intent_id = $1 FOR UPDATE", payment_id))
                try:
                    yield payment
                except web.HTTPException:  # an answer (a redirect), not a failure
                    await self._save(conn, payment, outbox)
                    await transaction.commit()
                    committed = True
                    raise
                await self._save(conn, payment, outbox)
                await transaction.commit()
                committed = True
            finally:
                if not committed:
                    await transaction.rollback()

    @staticmethod
    async def _save(conn: Any, payment: LocalPayment | None, outbox: list[Event]) -> None:
        if payment is not None:
            await conn.execute(
                "UPDATE ledger.local_provider_payments SET body = $2::jsonb, is_open = $3 "
                "WHERE session_id = $1", payment.session_id, _body(payment), payment.is_open)
        if outbox:
            await conn.executemany(
                "INSERT INTO ledger.local_provider_events (event_id, body, next_attempt_at) "
                "VALUES ($1, $2::jsonb, $3)",
                [(event["id"], json.dumps(event), float(event["created"])) for event in outbox])

    @asynccontextmanager
    async def attempting(self, event_id: str, now: float
                         ) -> AsyncIterator[EventAttempt | None]:
        # The row lock is the claim: held while the attempt is made, released by PostgreSQL
        # the moment a SIGKILLed sender's connection drops, so a restarted replica resumes at
        # once instead of waiting out a lease.
        async with self.attempts_pool.acquire() as conn, conn.transaction():
            attempts = await conn.fetchval(
                "SELECT attempts FROM ledger.local_provider_events WHERE event_id = $1 "
                "AND NOT delivered AND NOT gave_up AND next_attempt_at <= $2 "
                "FOR UPDATE SKIP LOCKED", event_id, now)
            if attempts is None:
                yield None
                return
            attempt = EventAttempt(attempts_before=attempts)
            yield attempt
            await conn.execute(
                "UPDATE ledger.local_provider_events SET attempts = attempts + 1, "
                "delivered = $2, gave_up = $3, next_attempt_at = $4 WHERE event_id = $1",
                event_id, attempt.delivered, attempt.gave_up, attempt.next_attempt_at)

    async def due_events(self, now: float, limit: int) -> list[Event]:
        rows = await self.pool.fetch(
            "SELECT body FROM ledger.local_provider_events WHERE NOT delivered AND NOT gave_up "
            "AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2", now, limit)
        return [json.loads(r["body"]) for r in rows]

    async def next_event_due(self) -> float | None:
        due = await self.pool.fetchval(
            "SELECT min(next_attempt_at) FROM ledger.local_provider_events "
            "WHERE NOT delivered AND NOT gave_up")
        return None if due is None else float(due)

    async def count(self) -> int:
        return int(await self.pool.fetchval(
            "SELECT count(*) FROM ledger.local_provider_payments"))

    async def open_checkouts(self, created_before: float) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT session_id FROM ledger.local_provider_payments "
            "WHERE is_checkout AND is_open AND created_at < $1", created_before)
        return [r["session_id"] for r in rows]

    async def refund_of(self, idempotency_key: str) -> LocalRefund | None:
        row = await self.pool.fetchrow(
            "SELECT session_id, refund_id, amount_minor FROM ledger.local_provider_refunds "
            "WHERE idempotency_key = $1", idempotency_key)
        if row is None:
            return None
        return LocalRefund(row["session_id"],
                           ProviderRefund(row["refund_id"], row["amount_minor"]))

    async def add_refund(self, idempotency_key: str, record: LocalRefund) -> LocalRefund:
        await self.pool.execute(
            "INSERT INTO ledger.local_provider_refunds (idempotency_key, session_id, "
            "refund_id, amount_minor) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            idempotency_key, record.session_id, record.refund.refund_id,
            record.refund.amount_minor)
        stored = await self.refund_of(idempotency_key)
        assert stored is not None
        return stored


def _body(payment: LocalPayment) -> str:
    return json.dumps(dataclasses.asdict(payment))


def _payment(body: str | None) -> LocalPayment | None:
    return None if body is None else LocalPayment(**json.loads(body))


if TYPE_CHECKING:  # mypy proves both satisfy the protocol the provider uses
    _memory: LocalPayments = MemoryPayments()
    _postgres: LocalPayments = PostgresPayments(None)  # type: ignore[arg-type]
