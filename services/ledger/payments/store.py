"""PaymentStore: payment orders, provider events, refunds and top-up settings in PostgreSQL.

Credit moves through the ledger's own unit of work (`store.Work`): the PURCHASE and BONUS
transfers of an order, its state change, the provider event that caused them and the outbox
events all commit in one transaction, or none of them does. Provider calls are never made
while a transaction is open: a refund commits its reversal with the money's return marked
PENDING, and the service asks the provider afterwards (idempotently on the refund id) until it
confirms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from services.ledger import domain as d
from services.ledger import leases
from services.ledger.payments import domain as p
from services.ledger.payments.provider import ProviderEvent, ProviderEventType
from services.ledger.store import LedgerStore, Work
from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.kit.paging import encode_time_cursor, time_cursor_page

if TYPE_CHECKING:
    from services.ledger.store import Connection, Row

log = get_logger("ledger.payments")

MANUAL_PROVIDER: Final = "manual"
OrderHook = Callable[["Connection", p.PaymentOrder], Awaitable[None]]
PaidHook = Callable[["Connection", p.PaymentOrder, datetime], Awaitable[object]]
RefundHook = Callable[["Connection", p.PaymentOrder, str, p.RefundPlan, datetime],
                      Awaitable[object]]
TOP_UP_CURSOR: Final = "auto-top-up"

_ORDER_COLUMNS: Final = (
    "payment_order_id", "org_id", "kind", "state", "amount_minor", "currency",
    "credits_micros", "bonus_credits_micros", "package_id", "price_book_version",
    "billing_profile_id", "provider", "provider_session_id", "checkout_url", "failure_reason",
    "manual_method", "reference", "created_by", "approved_by", "credit_transfer_id",
    "refunded_minor", "refunded_micros", "bonus_forfeited_micros", "created_at", "settled_at",
)


def _order(r: Row) -> p.PaymentOrder:
    return p.PaymentOrder(
        payment_order_id=r["payment_order_id"], org_id=r["org_id"],
        kind=p.PaymentOrderKind(r["kind"]), state=p.PaymentOrderState(r["state"]),
        amount_minor=r["amount_minor"], currency=r["currency"],
        credits_micros=r["credits_micros"], bonus_credits_micros=r["bonus_credits_micros"],
        provider=r["provider"], created_by=r["created_by"], created_at=r["created_at"],
        package_id=r["package_id"], price_book_version=r["price_book_version"],
        billing_profile_id=r["billing_profile_id"],
        provider_session_id=r["provider_session_id"], checkout_url=r["checkout_url"],
        failure_reason=r["failure_reason"],
        manual_method=p.ManualPaymentMethod(r["manual_method"]) if r["manual_method"] else None,
        reference=r["reference"], approved_by=r["approved_by"],
        credit_transfer_id=r["credit_transfer_id"], refunded_minor=r["refunded_minor"],
        refunded_micros=r["refunded_micros"],
        bonus_forfeited_micros=r["bonus_forfeited_micros"], settled_at=r["settled_at"])


def _auto_top_up(r: Row) -> p.AutoTopUp:
    custom = (p.CustomAmount(r["custom_amount_minor"], r["custom_currency"])
              if r["custom_amount_minor"] else None)
    return p.AutoTopUp(r["org_id"], r["enabled"], r["threshold_micros"], r["max_per_day"],
                       r["package_id"], custom, r["billing_profile_id"],
                       r["payment_method_id"], r["updated_at"], r["updated_by"])


async def _lock_top_up(conn: Connection, org_id: str) -> None:
    """Locks an org's top-up configuration (if any) ahead of its accounts: every transaction
    that takes both takes them in this order, so none waits for another in a cycle."""
    await conn.execute("SELECT 1 FROM ledger.auto_top_ups WHERE org_id = $1 FOR UPDATE",
                       org_id)


def _not_found(order_id: str) -> TallyError:
    return TallyError(Reason.NOT_FOUND, f"payment_order_id: no order {order_id!r}",
                      field="payment_order_id")


class PaymentStore:
    """Persistence of payments, sharing the ledger's pool, clock and unit of work."""

    def __init__(self, ledger: LedgerStore, *, failures_to_throttle: int = 3) -> None:
        self.ledger = ledger
        self.pool = ledger.pool
        self.failures_to_throttle = failures_to_throttle
        # what else a new order writes in its own transaction (its tax snapshot)
        self.on_order_created: OrderHook | None = None
        # what a payment's success and a refund also write in their transactions (the
        # invoice, the credit note)
        self.on_order_paid: PaidHook | None = None
        self.on_refund: RefundHook | None = None

    def _clock(self) -> datetime:
        return self.ledger.clock()

    # -- orders ----------------------------------------------------------------------------

    async def create_order(self, order: p.PaymentOrder, request_hash: str) -> p.PaymentOrder:
        """Stores a new PENDING order, idempotently on its id: the same request returns the
        stored order (with whatever it became since), another one is IDEMPOTENCY_KEY_REUSED."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, order.created_at, d.Caller(order.created_by))
            if not await work.claim(f"payment-order:{order.payment_order_id}", request_hash):
                return await self._get(conn, order.payment_order_id)
            await self._insert(conn, order)
            if self.on_order_created is not None:
                await self.on_order_created(conn, order)
            await self._history(conn, order, order.created_by, "created", "")
            return order

    async def claimed_order(self, order_id: str, request_hash: str) -> p.PaymentOrder | None:
        """The order a request id already made (None if none); a different request under the
        same id is IDEMPOTENCY_KEY_REUSED."""
        async with self.pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT request_hash FROM ledger.idempotency_keys WHERE key = $1",
                f"payment-order:{order_id}")
            if stored is None:
                return None
            if stored != request_hash:
                raise d.reused(f"payment-order:{order_id}")
            return await self._get(conn, order_id)

    async def attach_session(self, order_id: str, session_id: str, url: str
                             ) -> p.PaymentOrder:
        """Records the provider's checkout session (or charge) of an order."""
        row = await self.pool.fetchrow(
            "UPDATE ledger.payment_orders SET provider_session_id = $2, checkout_url = $3 "
            "WHERE payment_order_id = $1 RETURNING *", order_id, session_id, url)
        if row is None:
            raise _not_found(order_id)
        return _order(row)

    async def get_order(self, org_id: str, order_id: str) -> p.PaymentOrder:
        """One order of an org."""
        d.raise_if([d.check_id("org_id", org_id), d.check_id("payment_order_id", order_id)])
        async with self.pool.acquire() as conn:
            order = await self._get(conn, order_id)
        if order.org_id != org_id:
            raise _not_found(order_id)
        return order

    async def list_orders(self, org_id: str, *, states: Sequence[p.PaymentOrderState] = (),
                          kinds: Sequence[p.PaymentOrderKind] = (), size: int = 0,
                          token: str = "") -> tuple[list[p.PaymentOrder], str]:
        """An org's orders, newest first, keyset-paged on (created_at, id)."""
        limit, after = time_cursor_page(size, token, "orders",
                                        also=[d.check_id("org_id", org_id)])
        before_at, before_id = after if after else (None, "")
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.payment_orders WHERE org_id = $1 "
            "AND (cardinality($2::text[]) = 0 OR state = ANY($2::text[])) "
            "AND (cardinality($3::text[]) = 0 OR kind = ANY($3::text[])) "
            "AND ($4::timestamptz IS NULL OR (created_at, payment_order_id) < ($4, $5)) "
            "ORDER BY created_at DESC, payment_order_id DESC LIMIT $6",
            org_id, [s.value for s in states], [k.value for k in kinds], before_at, before_id,
            limit + 1)
        found = [_order(r) for r in rows[:limit]]
        last = found[-1] if found and len(rows) > limit else None
        next_token = (encode_time_cursor("orders", last.created_at, last.payment_order_id)
                      if last else "")
        return found, next_token

    @staticmethod
    async def _get(conn: Connection, order_id: str, *, lock: bool = False) -> p.PaymentOrder:
        row = await conn.fetchrow(
            "SELECT * FROM ledger.payment_orders WHERE payment_order_id = $1"
            + (" FOR UPDATE" if lock else ""), order_id)
        if row is None:
            raise _not_found(order_id)
        return _order(row)

    @staticmethod
    async def _insert(conn: Connection, order: p.PaymentOrder) -> None:
        values = [getattr(order, c) for c in _ORDER_COLUMNS]
        values[_ORDER_COLUMNS.index("kind")] = order.kind.value
        values[_ORDER_COLUMNS.index("state")] = order.state.value
        values[_ORDER_COLUMNS.index("manual_method")] = (
            order.manual_method.value if order.manual_method else "")
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        await conn.execute(
            f"INSERT INTO ledger.payment_orders ({', '.join(_ORDER_COLUMNS)}) "
            f"VALUES ({placeholders})", *values)

    @staticmethod
    async def _save(conn: Connection, order: p.PaymentOrder) -> None:
        await conn.execute(
            "UPDATE ledger.payment_orders SET state = $2, failure_reason = $3, "
            "approved_by = $4, credit_transfer_id = $5, refunded_minor = $6, "
            "refunded_micros = $7, bonus_forfeited_micros = $8, settled_at = $9 "
            "WHERE payment_order_id = $1",
            order.payment_order_id, order.state.value, order.failure_reason, order.approved_by,
            order.credit_transfer_id, order.refunded_minor, order.refunded_micros,
            order.bonus_forfeited_micros, order.settled_at)

    @staticmethod
    async def _history(conn: Connection, order: p.PaymentOrder, actor: str, cause: str,
                       trace_id: str, at: datetime | None = None) -> None:
        await conn.execute(
            "INSERT INTO ledger.payment_order_history (payment_order_id, org_id, state, actor, "
            "cause, trace_id, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            order.payment_order_id, order.org_id, order.state.value, actor, cause, trace_id,
            at or order.created_at)

    # -- crediting -------------------------------------------------------------------------

    async def _credit(self, work: Work, order: p.PaymentOrder, cause: str) -> p.PaymentOrder:
        """Grants an order's credit (PURCHASE, and BONUS as its own grant) and marks it
        SUCCEEDED; lifts a throttle that failed top-ups put on the org."""
        org, order_id = order.org_id, order.payment_order_id
        await _lock_top_up(work.conn, org)
        await work.lock_orgs([org], open_missing=True)
        purchase_id = p.purchase_transfer_id(order_id)
        for transfer_id, kind, amount in (
                (purchase_id, d.TransferKind.PURCHASE, order.credits_micros),
                (p.bonus_transfer_id(order_id), d.TransferKind.BONUS,
                 order.bonus_credits_micros)):
            if amount == 0:
                continue
            # the order's id makes these ids; claiming them keeps a client's Transfer off them
            if not await work.claim(f"transfer:{transfer_id}",
                                    d.fingerprint(order_id, kind.value, amount)):
                raise TallyError(Reason.INTERNAL, f"{transfer_id} was already posted")
            await work.credit_org(kind, org, amount, transfer_id,
                                  d.GrantSpec(d.GRANT_OF_KIND[kind]), f"payment order {order_id}",
                                  payment_order_id=order_id)
        paid = replace(order, state=p.PaymentOrderState.SUCCEEDED, settled_at=work.now,
                       credit_transfer_id=purchase_id, failure_reason="")
        await self._save(work.conn, paid)
        await self._history(work.conn, paid, work.caller.actor, cause, work.caller.trace_id,
                            work.now)
        attributes = {"payment_order_id": order_id, "amount_minor": str(order.amount_minor),
                      "currency": order.currency, "order_kind": order.kind.value}
        work.emit(org, d.OutboxEventType.PAYMENT_SUCCEEDED, **attributes)
        if order.kind is p.PaymentOrderKind.AUTO_TOP_UP:
            work.emit(org, d.OutboxEventType.TOP_UP_SUCCEEDED, payment_order_id=order_id)
        await self._lift_top_up_throttle(work, org)
        work.emit_balance_changes()
        await work.flush()
        if self.on_order_paid is not None:  # last: its number's lock is held until commit
            await self.on_order_paid(work.conn, paid, work.now)
        return paid

    async def _lift_top_up_throttle(self, work: Work, org: str) -> None:
        """A payment clears the failures; if they had throttled the org (and nothing else
        pinned it since), the money decides its state again."""
        was_throttling = await work.conn.fetchval(
            "WITH old AS (SELECT org_id, throttling FROM ledger.auto_top_ups "
            "WHERE org_id = $1 FOR UPDATE) "
            "UPDATE ledger.auto_top_ups t SET consecutive_failures = 0, throttling = false "
            "FROM old WHERE t.org_id = old.org_id "
            "AND (t.consecutive_failures > 0 OR t.throttling) RETURNING old.throttling", org)
        account = work.org(org)
        if (was_throttling and account.pinned
                and account.billing_state is d.BillingState.THROTTLED
                and await self._throttled_by_top_ups(work.conn, org)):
            account.pinned = False
            account.dirty = True

    @staticmethod
    async def _throttled_by_top_ups(conn: Connection, org: str) -> bool:
        cause = await conn.fetchval(
            "SELECT cause FROM ledger.billing_state_changes WHERE org_id = $1 "
            "ORDER BY changed_at DESC LIMIT 1", org)
        return bool(cause) and str(cause).startswith(TOP_UP_THROTTLE_CAUSE)

    # -- provider events -------------------------------------------------------------------

    async def apply_event(self, provider: str, event: ProviderEvent, payload: bytes,
                          caller: d.Caller) -> tuple[bool, p.PaymentOrder | None, p.Outcome]:
        """Acts on a verified provider event exactly once: the event's row and everything it
        causes commit together, so a redelivery (even one racing the first) finds the row and
        changes nothing. Returns (first time?, the order after, what the event did)."""
        digest = hashlib.sha256(payload).hexdigest()
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                "INSERT INTO ledger.provider_events (provider, event_id, type, "
                "payment_order_id, outcome, payload_sha256, received_at) "
                "VALUES ($1, $2, $3, $4, '', $5, $6) ON CONFLICT DO NOTHING RETURNING true",
                provider, event.event_id, event.type.value, event.payment_order_id, digest,
                self._clock())
            if not claimed:
                row = await conn.fetchrow(
                    "SELECT e.outcome, o.* FROM ledger.provider_events e LEFT JOIN "
                    "ledger.payment_orders o ON o.payment_order_id = e.payment_order_id "
                    "WHERE e.provider = $1 AND e.event_id = $2", provider, event.event_id)
                assert row is not None
                order = _order(row) if row["payment_order_id"] else None
                return False, order, p.Outcome(row["outcome"])
            order, outcome = await self._act(conn, provider, event, caller)
            await conn.execute(
                "UPDATE ledger.provider_events SET outcome = $3 "
                "WHERE provider = $1 AND event_id = $2", provider, event.event_id,
                outcome.value)
            return True, order, outcome

    async def _act(self, conn: Connection, provider: str, event: ProviderEvent,
                   caller: d.Caller) -> tuple[p.PaymentOrder | None, p.Outcome]:
        row = await conn.fetchrow("SELECT * FROM ledger.payment_orders "
                                  "WHERE payment_order_id = $1 FOR UPDATE",
                                  event.payment_order_id)
        if row is None or row["provider"] != provider:
            log.warning("provider_event_for_unknown_order", provider=provider,
                        event_id=event.event_id, payment_order_id=event.payment_order_id)
            return None, p.Outcome.IGNORED
        order = _order(row)
        outcome = p.outcome_of(order, event)
        work = Work(conn, self._clock(), caller)
        cause = f"{provider} event {event.event_id} ({event.type.value})"
        if outcome is p.Outcome.CREDITED:
            return await self._credit(work, order, cause), outcome
        if outcome is p.Outcome.MISMATCH:
            log.error("provider_event_amount_mismatch", provider=provider,
                      event_id=event.event_id, payment_order_id=order.payment_order_id,
                      event_amount_minor=event.amount_minor, event_currency=event.currency,
                      order_amount_minor=order.amount_minor, order_currency=order.currency)
        elif outcome in (p.Outcome.FAILED, p.Outcome.ATTEMPT_FAILED):
            return await self._fail(work, order, event.failure_reason or "payment_failed",
                                    cause, final=outcome is p.Outcome.FAILED), outcome
        elif outcome is p.Outcome.CANCELED:
            canceled = replace(order, state=p.PaymentOrderState.CANCELED, settled_at=work.now)
            await self._save(conn, canceled)
            await self._history(conn, canceled, caller.actor, cause, caller.trace_id, work.now)
            return canceled, outcome
        elif event.type is ProviderEventType.REFUND_SUCCEEDED:
            known = await conn.fetchval(
                "SELECT true FROM ledger.refunds WHERE payment_order_id = $1 "
                "AND provider_refund_minor > 0 LIMIT 1", order.payment_order_id)
            if not known:  # money returned at the provider, outside Refund: say so
                log.warning("provider_refund_unknown_to_ledger", provider=provider,
                            event_id=event.event_id, payment_order_id=order.payment_order_id,
                            amount_minor=event.amount_minor)
        return order, outcome

    async def _fail(self, work: Work, order: p.PaymentOrder, reason: str, cause: str, *,
                    final: bool) -> p.PaymentOrder:
        """A refused payment: a checkout stays open for another card (final=False); an
        automatic top-up fails, and enough failures in a row throttle the org."""
        conn, org = work.conn, order.org_id
        await _lock_top_up(conn, org)
        failed = replace(order, failure_reason=reason,
                         state=p.PaymentOrderState.FAILED if final else order.state,
                         settled_at=work.now if final else None)
        await self._save(conn, failed)
        await self._history(conn, failed, work.caller.actor, f"{cause}: {reason}",
                            work.caller.trace_id, work.now)
        await work.lock_orgs([org], open_missing=True)
        work.emit(org, d.OutboxEventType.PAYMENT_FAILED,
                  payment_order_id=order.payment_order_id, failure_reason=reason)
        if order.kind is p.PaymentOrderKind.AUTO_TOP_UP:
            work.emit(org, d.OutboxEventType.TOP_UP_FAILED,
                      payment_order_id=order.payment_order_id, failure_reason=reason)
            await self._count_top_up_failure(work, org)
        await work.flush()  # an org opened here gets the state its (empty) balance calls for
        return failed

    async def _count_top_up_failure(self, work: Work, org: str) -> None:
        failures = await work.conn.fetchval(
            "UPDATE ledger.auto_top_ups SET consecutive_failures = consecutive_failures + 1 "
            "WHERE org_id = $1 RETURNING consecutive_failures", org)
        account = work.org(org)
        if (failures is None or failures < self.failures_to_throttle
                or account.billing_state is not d.BillingState.ACTIVE):
            return
        cause = f"{TOP_UP_THROTTLE_CAUSE} {failures} times in a row"
        await work.conn.execute("UPDATE ledger.auto_top_ups SET throttling = true "
                                "WHERE org_id = $1", org)
        previous = account.billing_state
        account.billing_state, account.pinned, account.dirty = (
            d.BillingState.THROTTLED, True, True)
        work.state_changes.append((f"top-up-failures:{org}:{work.now.isoformat()}", org,
                                   previous.value, account.billing_state.value, cause,
                                   work.caller.actor, work.now))
        work.emit(org, d.OutboxEventType.BILLING_STATE_CHANGED, previous_state=previous.value,
                  cause=cause)

    # -- manual settlement -----------------------------------------------------------------

    async def approve(self, order_id: str, caller: d.Caller
                      ) -> tuple[p.PaymentOrder, d.Balance]:
        """Credits a recorded manual payment once; approving it again returns it as it is."""
        async with self.pool.acquire() as conn, conn.transaction():
            order = await self._get(conn, order_id, lock=True)
            p.check_approver(order, caller.actor)
            if order.state is p.PaymentOrderState.PENDING:
                work = Work(conn, self._clock(), caller)
                order = await self._credit(work, replace(order, approved_by=caller.actor),
                                           f"approved by {caller.actor}")
            return order, await self.ledger.balance_in(conn, order.org_id)

    # -- refunds ---------------------------------------------------------------------------

    async def refund(self, refund_id: str, order_id: str, amount_micros: int, reason: str,
                     caller: d.Caller) -> tuple[p.RefundPlan, d.Transfer, p.PaymentOrder]:
        """Takes back unspent purchased credit of an order (and its bonus in proportion),
        idempotently on `refund_id`. The money's return is left PENDING for the provider
        (`provider_refund_done`); a manual payment's is paid back by hand (NONE)."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self._clock(), caller)
            if not await work.claim(f"refund:{refund_id}",
                                    d.fingerprint(order_id, amount_micros, reason)):
                return await self._replay_refund(conn, refund_id)
            order = await self._get(conn, order_id, lock=True)
            p.check_refundable(order)
            org = order.org_id
            await work.lock_orgs([org])
            grants = {g.grant_id: g for g in await work.grants_of(org)}
            purchased = grants.get(f"grant:{p.purchase_transfer_id(order_id)}")
            bonus = grants.get(f"grant:{p.bonus_transfer_id(order_id)}")
            # a credit lease gives its hold back first: for what is asked (0 = all unspent)
            # and the bonus taken with it
            await leases.reclaim(work, org, (amount_micros or (
                purchased.remaining_micros if purchased else 0)) + (
                bonus.remaining_micros if bonus else 0))
            plan = p.plan_refund(order, amount_micros,
                                 purchased.remaining_micros if purchased else 0,
                                 bonus.remaining_micros if bonus else 0, work.available(org))
            assert purchased is not None  # plan_refund refuses when nothing is unspent
            refunds = d.system_account(d.AccountKind.REFUNDS, org)
            await work.lock([refunds])
            purchased.remaining_micros -= plan.reversed_micros
            work.dirty_grants[purchased.grant_id] = purchased
            transfer = work.post(d.TransferKind.REFUND, d.credit_account(org), refunds, org,
                                 plan.reversed_micros, f"refund:{refund_id}", reason=reason,
                                 grant_id=purchased.grant_id, payment_order_id=order_id)
            if plan.bonus_forfeited_micros:
                # Bonus is not money: it lapses with the refund (an EXPIRY, not a REVERSAL,
                # since a transfer is reversed once and wholly, and a refund may be partial).
                assert bonus is not None
                lapsed = d.system_account(d.AccountKind.EXPIRY, org)
                await work.lock([lapsed])
                bonus.remaining_micros -= plan.bonus_forfeited_micros
                work.dirty_grants[bonus.grant_id] = bonus
                work.post(d.TransferKind.EXPIRY, d.credit_account(org), lapsed, org,
                          plan.bonus_forfeited_micros, f"refund:{refund_id}:bonus",
                          reason=f"bonus forfeited by refund {refund_id}",
                          grant_id=bonus.grant_id, payment_order_id=order_id)
            after = replace(order, state=plan.state_after,
                            refunded_micros=order.refunded_micros + plan.reversed_micros,
                            refunded_minor=order.refunded_minor + plan.provider_refund_minor,
                            bonus_forfeited_micros=(order.bonus_forfeited_micros
                                                    + plan.bonus_forfeited_micros))
            await self._save(conn, after)
            await self._history(conn, after, caller.actor, f"refund {refund_id}: {reason}",
                                caller.trace_id, work.now)
            pending = order.provider != MANUAL_PROVIDER and plan.provider_refund_minor > 0
            await conn.execute(
                "INSERT INTO ledger.refunds (refund_id, payment_order_id, org_id, "
                "reversed_micros, bonus_forfeited_micros, provider_refund_minor, "
                "provider_state, transfer_id, reason, actor, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                refund_id, order_id, org, plan.reversed_micros, plan.bonus_forfeited_micros,
                plan.provider_refund_minor, "PENDING" if pending else "NONE",
                transfer.transfer_id, reason, caller.actor, work.now)
            work.emit_balance_changes()
            await work.flush()
            if self.on_refund is not None:  # last: its number's lock is held until commit
                await self.on_refund(conn, order, refund_id, plan, work.now)
            return plan, transfer, after

    async def _replay_refund(self, conn: Connection, refund_id: str
                             ) -> tuple[p.RefundPlan, d.Transfer, p.PaymentOrder]:
        row = await conn.fetchrow("SELECT * FROM ledger.refunds WHERE refund_id = $1",
                                  refund_id)
        assert row is not None  # the claim and the row commit together
        order = await self._get(conn, row["payment_order_id"])
        transfer, _ = await self.ledger.replay_transfer(conn, row["transfer_id"])
        state = (p.PaymentOrderState.REFUNDED
                 if order.state is p.PaymentOrderState.REFUNDED else
                 p.PaymentOrderState.PARTIALLY_REFUNDED)
        return (p.RefundPlan(row["reversed_micros"], row["provider_refund_minor"],
                             row["bonus_forfeited_micros"], state), transfer, order)

    async def pending_provider_refunds(self, refund_id: str = "", limit: int = 100
                                       ) -> list[tuple[str, p.PaymentOrder, int]]:
        """Refunds whose money the provider has not confirmed yet: (refund id, order, amount);
        one refund's when `refund_id` is given."""
        rows = await self.pool.fetch(
            "SELECT r.refund_id, r.provider_refund_minor, o.* FROM ledger.refunds r "
            "JOIN ledger.payment_orders o USING (payment_order_id) "
            "WHERE r.provider_state = 'PENDING' AND ($1 = '' OR r.refund_id = $1) "
            "ORDER BY r.created_at LIMIT $2", refund_id, limit)
        return [(r["refund_id"], _order(r), r["provider_refund_minor"]) for r in rows]

    async def provider_refund_done(self, refund_id: str, provider_refund_id: str) -> None:
        """The provider returned the money."""
        await self.pool.execute(
            "UPDATE ledger.refunds SET provider_state = 'DONE', provider_refund_id = $2, "
            "provider_attempts = provider_attempts + 1, provider_error = '' "
            "WHERE refund_id = $1 AND provider_state = 'PENDING'", refund_id,
            provider_refund_id)

    async def provider_refund_failed(self, refund_id: str, error: str) -> None:
        """The provider could not be asked (or refused for now): tried again later."""
        await self.pool.execute(
            "UPDATE ledger.refunds SET provider_attempts = provider_attempts + 1, "
            "provider_error = $2 WHERE refund_id = $1 AND provider_state = 'PENDING'",
            refund_id, error[:500])

    # -- automatic top-up ------------------------------------------------------------------

    async def set_auto_top_up(self, request_id: str, config: p.AutoTopUp, caller: d.Caller
                              ) -> p.AutoTopUp:
        """Replaces an org's configuration, idempotently on `request_id`."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self._clock(), caller)
            if await work.claim(f"auto-top-up:{request_id}", d.fingerprint(config)):
                custom = config.custom
                await conn.execute(
                    "INSERT INTO ledger.auto_top_ups (org_id, enabled, threshold_micros, "
                    "package_id, custom_amount_minor, custom_currency, max_per_day, "
                    "billing_profile_id, payment_method_id, updated_at, updated_by) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
                    "ON CONFLICT (org_id) DO UPDATE SET enabled = $2, threshold_micros = $3, "
                    "package_id = $4, custom_amount_minor = $5, custom_currency = $6, "
                    "max_per_day = $7, billing_profile_id = $8, payment_method_id = $9, "
                    "updated_at = $10, updated_by = $11, consecutive_failures = "
                    "CASE WHEN $9 <> ledger.auto_top_ups.payment_method_id THEN 0 "
                    "ELSE ledger.auto_top_ups.consecutive_failures END",
                    config.org_id, config.enabled, config.threshold_micros, config.package_id,
                    custom.amount_minor if custom else 0, custom.currency if custom else "",
                    config.max_per_day, config.billing_profile_id, config.payment_method_id,
                    work.now, caller.actor)
            return await self._top_up_config(conn, config.org_id) or config

    async def get_auto_top_up(self, org_id: str) -> p.AutoTopUp:
        """An org's configuration (disabled if never set)."""
        d.raise_if([d.check_id("org_id", org_id)])
        async with self.pool.acquire() as conn:
            return await self._top_up_config(conn, org_id) or p.AutoTopUp(
                org_id, False, 0, 0)

    @staticmethod
    async def _top_up_config(conn: Connection, org_id: str, *, lock: bool = False
                             ) -> p.AutoTopUp | None:
        row = await conn.fetchrow("SELECT * FROM ledger.auto_top_ups WHERE org_id = $1"
                                  + (" FOR UPDATE" if lock else ""), org_id)
        return _auto_top_up(row) if row else None

    async def enabled_top_ups(self, org_ids: list[str]) -> dict[str, p.AutoTopUp]:
        """The enabled configurations of these orgs."""
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.auto_top_ups WHERE enabled AND org_id = ANY($1::text[])",
            org_ids)
        return {r["org_id"]: _auto_top_up(r) for r in rows}

    async def available_now(self, org_ids: list[str]) -> dict[str, int]:
        """Each org's available credit as committed now (0 for an org without accounts)."""
        rows = await self.pool.fetch(
            "SELECT org_id, balance_micros - held_micros AS available FROM ledger.accounts "
            "WHERE kind = 'ORG_CREDIT' AND account_id = ANY($1::text[])",
            [d.credit_account(o) for o in org_ids])
        found = {r["org_id"]: r["available"] for r in rows}
        return {org: found.get(org, 0) for org in org_ids}

    async def note_threshold(self, org_id: str, available: int, caller: d.Caller) -> None:
        """Emits LOW_BALANCE when an org's available credit is first seen below its top-up
        threshold (and re-arms when it is seen above it again)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT threshold_micros, below_threshold FROM ledger.auto_top_ups "
                "WHERE org_id = $1 AND enabled FOR UPDATE", org_id)
            if row is None:
                return
            below = available < row["threshold_micros"]
            if below == row["below_threshold"]:
                return
            await conn.execute("UPDATE ledger.auto_top_ups SET below_threshold = $2 "
                               "WHERE org_id = $1", org_id, below)
            if below:
                work = Work(conn, self._clock(), caller)
                await work.lock_orgs([org_id])
                work.emit(org_id, d.OutboxEventType.LOW_BALANCE,
                          threshold_micros=str(row["threshold_micros"]))
                await work.flush(follow_the_money=False)

    async def open_top_up(self, org_id: str,
                          price: Callable[[p.AutoTopUp], Awaitable[p.Offer]], provider: str,
                          caller: d.Caller) -> tuple[p.TopUpDecision, p.PaymentOrder | None]:
        """Opens an automatic top-up order if the rules allow one now, priced by `price` from
        the configuration as locked (asked only then). Serialized per org by the
        configuration row's lock; a second in-flight order is also impossible by index."""
        async with self.pool.acquire() as conn, conn.transaction():
            config = await self._top_up_config(conn, org_id, lock=True)
            now = self._clock()
            day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            counts = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'PENDING') AS in_flight, "
                "count(*) FILTER (WHERE created_at >= $2) AS today "
                "FROM ledger.payment_orders WHERE org_id = $1 AND kind = 'AUTO_TOP_UP'",
                org_id, day)
            credit = await conn.fetchrow(
                "SELECT balance_micros - held_micros AS available FROM ledger.accounts "
                "WHERE account_id = $1", d.credit_account(org_id))
            available = credit["available"] if credit else 0
            assert counts is not None
            decision = p.top_up_decision(config, available, counts["in_flight"] > 0,
                                         counts["today"])
            if decision is p.TopUpDecision.DAILY_LIMIT:
                await self._report_daily_limit(conn, org_id, day.date(), caller, now)
            if decision is not p.TopUpDecision.START:
                return decision, None
            assert config is not None
            offer = await price(config)  # only now: most calls end IN_FLIGHT or NOT_BELOW
            attempt = await conn.fetchval(
                "UPDATE ledger.auto_top_ups SET attempts = attempts + 1 WHERE org_id = $1 "
                "RETURNING attempts", org_id)
            order = p.PaymentOrder(
                p.top_up_order_id(org_id, attempt), org_id, p.PaymentOrderKind.AUTO_TOP_UP,
                p.PaymentOrderState.PENDING, offer.amount_minor, offer.currency,
                offer.credits_micros, offer.bonus_credits_micros, provider, caller.actor, now,
                package_id=offer.package_id, price_book_version=offer.price_book_version,
                billing_profile_id=config.billing_profile_id)
            await self._insert(conn, order)
            if self.on_order_created is not None:
                await self.on_order_created(conn, order)
            await self._history(conn, order, caller.actor,
                                f"available {available} below threshold "
                                f"{config.threshold_micros}", caller.trace_id)
            return decision, order

    async def _report_daily_limit(self, conn: Connection, org_id: str, day: Any,
                                  caller: d.Caller, now: datetime) -> None:
        first = await conn.fetchval(
            "UPDATE ledger.auto_top_ups SET limit_reported_on = $2 WHERE org_id = $1 "
            "AND limit_reported_on IS DISTINCT FROM $2 RETURNING true", org_id, day)
        if first:
            work = Work(conn, now, caller)
            await work.lock_orgs([org_id])
            work.emit(org_id, d.OutboxEventType.TOP_UP_FAILED,
                      failure_reason="max_per_day reached")
            await work.flush(follow_the_money=False)

    async def fail_order(self, order_id: str, reason: str, caller: d.Caller) -> p.PaymentOrder:
        """A top-up whose charge the provider refused outright (no webhook will come)."""
        async with self.pool.acquire() as conn, conn.transaction():
            order = await self._get(conn, order_id, lock=True)
            if order.state is not p.PaymentOrderState.PENDING:
                return order
            work = Work(conn, self._clock(), caller)
            return await self._fail(work, order, reason, "the provider refused the charge",
                                    final=order.kind is p.PaymentOrderKind.AUTO_TOP_UP)

    async def unstarted_top_ups(self, older_than: timedelta) -> list[p.PaymentOrder]:
        """PENDING top-ups never handed to the provider (the process stopped in between)."""
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.payment_orders WHERE kind = 'AUTO_TOP_UP' "
            "AND state = 'PENDING' AND provider_session_id = '' AND created_at < $1",
            self._clock() - older_than)
        return [_order(r) for r in rows]

    # -- the top-up follower's place in the outbox -------------------------------------------

    async def cursor(self, consumer: str) -> int:
        """Where `consumer` is in the ledger's outbox. A new consumer starts at the newest
        event: top-ups are about balances now, not about the ledger's whole history."""
        value = await self.pool.fetchval(
            "WITH start AS (INSERT INTO ledger.outbox_cursors (consumer, sequence) "
            "SELECT $1, coalesce(max(sequence), 0) FROM ledger.outbox "
            "ON CONFLICT (consumer) DO NOTHING RETURNING sequence) "
            "SELECT sequence FROM start UNION ALL "
            "SELECT sequence FROM ledger.outbox_cursors WHERE consumer = $1", consumer)
        return int(value or 0)

    async def advance(self, consumer: str, sequence: int) -> None:
        """Moves `consumer` forward (never back: replicas may race)."""
        await self.pool.execute(
            "INSERT INTO ledger.outbox_cursors (consumer, sequence) VALUES ($1, $2) "
            "ON CONFLICT (consumer) DO UPDATE SET sequence = "
            "GREATEST(ledger.outbox_cursors.sequence, $2)", consumer, sequence)


TOP_UP_THROTTLE_CAUSE: Final = "automatic top-up failed"
