"""Where the local (development) provider keeps its checkout sessions, charges and refunds.

In memory for a provider of its own (tests, a single process), or in PostgreSQL when the ledger
runs it: then a checkout opened through one ledger replica can be paid on another replica's
page, and two replicas acting on one payment at once are serialized by its row lock.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

    def locked(self, payment_id: str) -> Any:
        """`async with` it: the payment (or None), held until the block ends."""
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
    async def locked(self, payment_id: str) -> AsyncIterator[LocalPayment | None]:
        yield self._payments.get(payment_id)  # changed in place; one event loop, no awaits

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

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

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
    async def locked(self, payment_id: str) -> AsyncIterator[LocalPayment | None]:
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
                    await self._save(conn, payment)
                    await transaction.commit()
                    committed = True
                    raise
                await self._save(conn, payment)
                await transaction.commit()
                committed = True
            finally:
                if not committed:
                    await transaction.rollback()

    @staticmethod
    async def _save(conn: Any, payment: LocalPayment | None) -> None:
        if payment is not None:
            await conn.execute(
                "UPDATE ledger.local_provider_payments SET body = $2::jsonb, is_open = $3 "
                "WHERE session_id = $1", payment.session_id, _body(payment), payment.is_open)

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
