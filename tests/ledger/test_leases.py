"""Credit leases: a slice of an org's credit held for metering, exact in the balance, paid
from by usage, given back at its ttl, and shrunk or revoked by the ledger itself when the
org's credit can no longer back it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.ledger import domain as d
from services.ledger import leases
from services.ledger.store import LedgerStore
from tally.kit.errors import Reason, TallyError
from tests.ledger.support import fund

CREDIT = 1_000_000
METERING = d.Caller(actor="svc:metering")
TTL = timedelta(seconds=60)


def extend(request_id: str, org: str, add: int, *, lease_id: str = "L1", give_back: int = 0,
           in_flight: int = 0, ttl: timedelta = TTL) -> leases.ExtendLease:
    return leases.ExtendLease(request_id, lease_id, org, "metering", add, give_back, ttl,
                              in_flight, METERING)


async def test_a_lease_holds_at_most_the_available_credit_and_shows_as_held(
        pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 5 * CREDIT)
    first = await store.leases.extend(extend("x1", "acme", 3 * CREDIT, in_flight=7))
    assert (first.added_micros, first.lease.hold_micros) == (3 * CREDIT, 3 * CREDIT)
    more = await store.leases.extend(extend("x2", "acme", 4 * CREDIT))
    assert (more.added_micros, more.available_micros) == (2 * CREDIT, 0)
    balance = await store.get_balance("acme")
    assert (balance.held_micros, balance.leased_micros, balance.available_micros) == (
        5 * CREDIT, 5 * CREDIT, 0)
    # a replay of a request changes nothing
    again = await store.leases.extend(extend("x2", "acme", 4 * CREDIT))
    assert again.added_micros == 0 and again.lease.hold_micros == 5 * CREDIT
    with pytest.raises(TallyError) as reused:
        await store.leases.extend(extend("x2", "acme", CREDIT))
    assert reused.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    back = await store.leases.extend(extend("x3", "acme", 0, give_back=2 * CREDIT))
    assert back.lease.hold_micros == 3 * CREDIT and back.available_micros == 2 * CREDIT


async def test_usage_naming_the_lease_is_paid_from_its_hold_and_the_rest_plainly(
        pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    await store.leases.extend(extend("x1", "acme", 2 * CREDIT))
    await store.post_usage_batch("b1", [
        d.UsageItem("e1", "acme", CREDIT, lease_id="L1"),
        d.UsageItem("e2", "acme", 3 * CREDIT // 2, lease_id="L1"),
        d.UsageItem("e3", "acme", CREDIT)], METERING)
    lease = await store.leases.get("L1")
    assert lease is not None
    assert (lease.charged_micros, lease.consumed_micros, lease.hold_micros) == (
        5 * CREDIT // 2, 2 * CREDIT, 0)
    balance = await store.get_balance("acme")
    assert (balance.posted_micros, balance.held_micros) == (10 * CREDIT - 7 * CREDIT // 2, 0)
    # a replayed batch pays nothing twice
    await store.post_usage_batch("b1", [
        d.UsageItem("e1", "acme", CREDIT, lease_id="L1"),
        d.UsageItem("e2", "acme", 3 * CREDIT // 2, lease_id="L1"),
        d.UsageItem("e3", "acme", CREDIT)], METERING)
    assert (await store.leases.get("L1")) == lease
    assert (await store.verify()).ok


async def test_read_only_revokes_the_lease_and_refuses_to_grow_it(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 5 * CREDIT)
    await store.leases.extend(extend("x1", "acme", 3 * CREDIT))
    await store.set_billing_state("freeze", "acme", d.BillingState.READ_ONLY, "test", METERING)
    lease = await store.leases.get("L1")
    assert lease is not None and lease.hold_micros == 0 and lease.returned_micros == 3 * CREDIT
    assert (await store.get_balance("acme")).held_micros == 0
    with pytest.raises(TallyError) as refused:
        await store.leases.extend(extend("x2", "acme", CREDIT))
    assert refused.value.reason is Reason.ACCOUNT_READ_ONLY
    await store.seal_outbox()
    changed = await store.outbox_after(0, [d.OutboxEventType.LEASE_CHANGED])
    assert [e.attributes["returned_micros"] for e in changed] == [str(3 * CREDIT)]


async def test_taking_credit_back_shrinks_the_lease_first(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 5 * CREDIT)
    await store.leases.extend(extend("x1", "acme", 4 * CREDIT))
    # a negative adjustment of 3 credits: 1 is available, 2 come back from the lease
    await store.transfer(d.TransferCommand(
        "adj-1", "acme", d.TransferKind.MANUAL_ADJUSTMENT, -3 * CREDIT, reason="correction"),
        METERING)
    lease = await store.leases.get("L1")
    assert lease is not None and lease.hold_micros == 2 * CREDIT
    balance = await store.get_balance("acme")
    assert (balance.posted_micros, balance.held_micros) == (2 * CREDIT, 2 * CREDIT)
    assert (await store.verify()).ok


async def test_grant_expiry_takes_the_leased_credit_back_first(pool: asyncpg.Pool) -> None:
    now = [datetime.now(UTC)]
    store = LedgerStore(pool, clock=lambda: now[0])
    await fund(store, "acme", 2 * CREDIT)  # never expires
    soon = now[0] + timedelta(hours=1)
    await store.transfer(d.TransferCommand(
        "promo", "acme", d.TransferKind.PROMOTIONAL_GRANT, 5 * CREDIT,
        grant=d.GrantSpec(d.GrantKind.PROMOTIONAL, expires_at=soon)), METERING)
    await store.leases.extend(extend("x1", "acme", 6 * CREDIT, ttl=timedelta(hours=2)))
    now[0] = soon + timedelta(seconds=1)
    # 5 credits expire: 1 is available, 4 come back from the lease, which keeps 2
    assert await store.expire_grants() == 1
    lease = await store.leases.get("L1")
    assert lease is not None and (lease.returned_micros, lease.hold_micros) == (
        4 * CREDIT, 2 * CREDIT)
    balance = await store.get_balance("acme")
    assert (balance.posted_micros, balance.held_micros, balance.available_micros) == (
        2 * CREDIT, 2 * CREDIT, 0)
    await store.seal_outbox()
    changed = await store.outbox_after(0, [d.OutboxEventType.LEASE_CHANGED])
    assert [e.attributes["returned_micros"] for e in changed] == [str(4 * CREDIT)]
    assert (await store.verify()).ok


async def test_a_lease_not_extended_before_its_ttl_ends_and_gives_its_hold_back(
        pool: asyncpg.Pool) -> None:
    now = [datetime.now(UTC)]
    store = LedgerStore(pool, clock=lambda: now[0])
    await fund(store, "acme", 5 * CREDIT)
    await store.leases.extend(extend("x1", "acme", 3 * CREDIT, ttl=timedelta(seconds=5)))
    assert await store.leases.expire() == 0
    now[0] += timedelta(seconds=6)
    assert await store.leases.expire() == 1
    assert (await store.get_balance("acme")).held_micros == 0
    with pytest.raises(TallyError) as ended:
        await store.leases.extend(extend("x2", "acme", CREDIT))
    assert ended.value.reason is Reason.RESERVATION_EXPIRED


async def test_parallel_extensions_never_lease_more_than_the_balance(
        pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    answers = await asyncio.gather(*(
        store.leases.extend(extend(f"x{i}", "acme", CREDIT, lease_id=f"L{i % 3}"))
        for i in range(32)))
    assert sum(a.added_micros for a in answers) == 10 * CREDIT
    balance = await store.get_balance("acme")
    assert (balance.held_micros, balance.leased_micros, balance.available_micros) == (
        10 * CREDIT, 10 * CREDIT, 0)


async def test_bad_extensions_name_the_field(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", CREDIT)
    with pytest.raises(TallyError) as bad:
        await store.leases.extend(extend("x1", "acme", -1, ttl=timedelta(0)))
    assert {v.field for v in bad.value.violations} == {"add_micros", "ttl_seconds"}
    await store.leases.extend(extend("x2", "acme", 1))
    await fund(store, "other", CREDIT)
    with pytest.raises(TallyError) as other:
        await store.leases.extend(extend("x3", "other", 1))
    assert other.value.reason is Reason.INVALID_ARGUMENT
