"""The local provider's webhooks as the ledger runs it (state in PostgreSQL): an event is kept
with the payment change that made it, and sent until delivered even when the process that made
it dies first. The chaos suite SIGKILLs a real ledger; here the crash is a provider stopped
with its event unsent, and the next provider on the same database picks it up."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.ledger.payments.local_provider import LocalProvider
from services.ledger.payments.local_store import PostgresPayments
from tests.ledger.payments_support import RECEIVER_SECRET as SECRET
from tests.ledger.payments_support import Receiver, eventually
from tests.ledger.test_local_provider import charge_request


async def provider_on(pool: asyncpg.Pool, webhook_url: str, **options: object) -> LocalProvider:
    provider = LocalProvider(webhook_url=webhook_url, secrets=[SECRET], retry_first_s=0.01,
                             retry_max_s=0.05, max_attempts=50, seed=3,
                             **options)  # type: ignore[arg-type]
    provider.keep_state_in(PostgresPayments(pool))
    await provider.start()
    return provider


async def pending_events(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT event_id, attempts FROM ledger.local_provider_events "
                            "WHERE NOT delivered AND NOT gave_up")


async def test_a_payment_taken_by_a_provider_that_died_before_sending_is_sent_by_the_next(
        pool: asyncpg.Pool, receiver: Receiver) -> None:
    # no webhook url yet: the charge succeeds and its event is made, but nothing is sent
    crashed = await provider_on(pool, "")
    await crashed.charge(charge_request("po_crash"))
    [made] = crashed.events
    await crashed.stop()  # gone with the event unsent, as a SIGKILL leaves it
    assert [r["event_id"] for r in await pending_events(pool)] == [made["id"]]
    assert receiver.accepted == []

    survivor = await provider_on(pool, receiver.url)
    try:
        await eventually(lambda: asyncio.sleep(0, receiver.accepted), "the resumed event")
        await survivor.settled()
    finally:
        await survivor.stop()
    assert [(e["id"], e["type"]) for e in receiver.accepted] == [
        (made["id"], "payment_intent.succeeded")]
    assert receiver.accepted[0]["data"]["object"]["metadata"]["payment_order_id"] == "po_crash"
    assert await pending_events(pool) == []


async def test_the_attempt_count_of_a_dead_sender_carries_on(
        pool: asyncpg.Pool, receiver: Receiver) -> None:
    receiver.failures = -1  # the receiver is down: every attempt fails
    crashed = await provider_on(pool, receiver.url)
    await crashed.charge(charge_request("po_retrying"))
    await eventually(lambda: asyncio.sleep(0, len(crashed.deliveries) >= 3),
                     "three failed attempts")
    await crashed.stop()
    [(event_id, attempts)] = [tuple(r) for r in await pending_events(pool)]
    assert attempts >= 3

    receiver.failures = 0
    survivor = await provider_on(pool, receiver.url)
    try:
        await eventually(lambda: asyncio.sleep(0, receiver.accepted), "the resumed event")
        await survivor.settled()
    finally:
        await survivor.stop()
    [resumed] = [d for d in survivor.deliveries if d.delivered]
    assert (resumed.event_id, resumed.attempt) == (event_id, attempts + 1)
    assert [e["id"] for e in receiver.accepted] == [event_id]


async def test_two_live_providers_on_one_database_send_each_event_once(
        pool: asyncpg.Pool, receiver: Receiver) -> None:
    first = await provider_on(pool, receiver.url)
    second = await provider_on(pool, receiver.url)
    try:
        await asyncio.gather(*(provider.charge(charge_request(f"po_{n}"))
                               for n in range(12) for provider in (first, second)))
        made = {e["id"] for e in first.events} | {e["id"] for e in second.events}
        assert len(made) == 12  # each order charged once, by whichever provider came first
        await eventually(lambda: asyncio.sleep(0, len(receiver.accepted) >= 12),
                         "twelve events")
        await asyncio.gather(first.settled(), second.settled())
    finally:
        await first.stop()
        await second.stop()
    assert sorted(e["id"] for e in receiver.accepted) == sorted(made)
    assert await pending_events(pool) == []


async def test_a_change_that_fails_sends_nothing(pool: asyncpg.Pool, receiver: Receiver) -> None:
    provider = await provider_on(pool, receiver.url)
    try:
        await provider.charge(charge_request("po_once", method="pm_card_pending"))
        [payment_id] = [r["session_id"] for r in await pool.fetch(
            "SELECT session_id FROM ledger.local_provider_payments")]
        # the payment settles, then the change fails before it is kept: no event is kept or sent
        with pytest.raises(ZeroDivisionError):
            async with provider._changing(payment_id) as payment:
                assert payment is not None
                provider._mark_paid(payment)
                raise ZeroDivisionError
        await provider.settled()
        assert provider.events == [] and receiver.accepted == []
        assert await pool.fetchval("SELECT count(*) FROM ledger.local_provider_events") == 0
        # the same change kept: one event, sent
        await provider.complete_pending(payment_id, succeed=True)
        await eventually(lambda: asyncio.sleep(0, receiver.accepted), "the kept event")
        await provider.settled()
    finally:
        await provider.stop()
    assert receiver.types() == ["payment_intent.succeeded"]
