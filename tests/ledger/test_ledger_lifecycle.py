"""Usage batches, expiry, reversals, billing state, the outbox and tamper evidence."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from services.ledger import domain as d
from services.ledger.store import LedgerStore
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.kit.server import RunningServer
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient

CREDIT = 1_000_000
OPERATOR = d.Caller(actor="user:ops")


async def grant(tally: TallyClient, org: str, amount: int, transfer_id: str) -> None:
    await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id=transfer_id, org_id=org, kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=amount, reason="test"))


def items(org: str, *events: tuple[str, int], reservation: str = "") -> list[pb.UsageItem]:
    return [pb.UsageItem(event_id=e, org_id=org, cost_micros=c, reservation_id=reservation)
            for e, c in events]


async def test_usage_batch_debits_once_per_event_across_batches(tally: TallyClient) -> None:
    await grant(tally, "acme", 10 * CREDIT, "g")
    first = await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b1", items=items("acme", ("e1", CREDIT), ("e2", 2 * CREDIT))))
    assert [r.balance_after_micros for r in first.results] == [9 * CREDIT, 7 * CREDIT]
    assert first.results[0].transfer_id == first.results[1].transfer_id  # one per org per batch
    # e2 arrives again inside another batch: charged once, original receipt returned
    second = await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b2", items=items("acme", ("e2", 2 * CREDIT), ("e3", CREDIT))))
    assert second.results[0].is_duplicate
    assert second.results[0].balance_after_micros == 7 * CREDIT
    assert second.results[1].balance_after_micros == 6 * CREDIT
    replay = await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b1", items=items("acme", ("e1", CREDIT), ("e2", 2 * CREDIT))))
    assert replay == first
    with pytest.raises(TallyError) as caught:
        await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
            batch_id="b1", items=items("acme", ("e1", 5))))
    assert caught.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance
    assert balance.posted_micros == 6 * CREDIT


async def test_usage_beyond_credit_is_arrears_never_lost(tally: TallyClient) -> None:
    await grant(tally, "acme", 3 * CREDIT, "g")
    reply = await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b1", items=items("acme", ("e1", 2 * CREDIT), ("e2", 2 * CREDIT))))
    assert [(r.debited_micros, r.arrears_micros) for r in reply.results] == [
        (2 * CREDIT, 0), (CREDIT, CREDIT)]
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance
    assert (balance.available_micros, balance.arrears_micros) == (0, CREDIT)
    wanted = {pb.OUTBOX_EVENT_TYPE_ARREARS_RECORDED, pb.OUTBOX_EVENT_TYPE_BALANCE_CHANGED}
    kinds: set[int] = set()

    async def read_until_both() -> None:  # the batch's events may be sealed after the grant's
        async for reply in tally.ledger.StreamEvents(pb.StreamEventsRequest()):
            kinds.update(e.type for e in reply.events)
            if wanted <= kinds:
                return

    await asyncio.wait_for(read_until_both(), 30)
    assert wanted <= kinds
    assert (await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())).ok


async def test_usage_item_with_a_reservation_captures_it(tally: TallyClient) -> None:
    await grant(tally, "acme", 10 * CREDIT, "g")
    await tally.ledger.Reserve(pb.ReserveRequest(
        reservation_id="r1", org_id="acme", amount_micros=4 * CREDIT))
    reply = await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b1", items=items("acme", ("e1", CREDIT), reservation="r1")))
    assert reply.results[0].balance_after_micros == 9 * CREDIT  # the hold is gone
    held = await tally.ledger.GetReservation(pb.GetReservationRequest(
        org_id="acme", reservation_id="r1"))
    assert held.reservation.state == pb.RESERVATION_STATE_CAPTURED
    assert held.reservation.captured_micros == CREDIT


async def test_reversal_gives_back_a_debit_once(tally: TallyClient) -> None:
    await grant(tally, "acme", 5 * CREDIT, "g")
    await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="u1", org_id="acme", kind=pb.TRANSFER_KIND_USAGE, amount_micros=2 * CREDIT))
    back = await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="rev1", org_id="acme", kind=pb.TRANSFER_KIND_REVERSAL,
        reverses_transfer_id="u1", reason="billing error"))
    assert back.transfer.amount_micros == 2 * CREDIT
    assert back.balance_after.available_micros == 5 * CREDIT
    with pytest.raises(TallyError):
        await tally.ledger.Transfer(pb.TransferRequest(
            transfer_id="rev2", org_id="acme", kind=pb.TRANSFER_KIND_REVERSAL,
            reverses_transfer_id="u1", reason="again"))
    assert (await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())).ok


async def test_billing_state_is_recorded_and_read_only_blocks_new_holds(
    tally: TallyClient,
) -> None:
    await grant(tally, "acme", 5 * CREDIT, "g")
    changed = await tally.ledger.SetBillingState(pb.SetBillingStateRequest(
        request_id="s1", org_id="acme", state=common_pb2.BILLING_STATE_READ_ONLY,
        cause="invoice overdue"))
    assert changed.previous_state == common_pb2.BILLING_STATE_ACTIVE
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance
    assert balance.billing_state == common_pb2.BILLING_STATE_READ_ONLY
    with pytest.raises(TallyError) as caught:
        await tally.ledger.Reserve(pb.ReserveRequest(
            reservation_id="r1", org_id="acme", amount_micros=CREDIT))
    assert caught.value.reason is Reason.ACCOUNT_READ_ONLY


async def test_list_transactions_filters_and_pages_newest_first(tally: TallyClient) -> None:
    await grant(tally, "acme", 50 * CREDIT, "g")
    for i in range(5):
        await tally.ledger.Transfer(pb.TransferRequest(
            transfer_id=f"u{i}", org_id="acme", kind=pb.TRANSFER_KIND_USAGE,
            amount_micros=CREDIT, context=common_pb2.RequestContext(
                user_id="alice" if i % 2 else "bob", labels={"team": "search"})))
    seen: list[str] = []
    token = ""
    while True:
        page = await tally.ledger.ListTransactions(pb.ListTransactionsRequest(
            org_id="acme", kinds=[pb.TRANSFER_KIND_USAGE], page_size=2, page_token=token))
        seen += [t.transfer_id for t in page.transfers]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["u4", "u3", "u2", "u1", "u0"]
    alice = await tally.ledger.ListTransactions(pb.ListTransactionsRequest(
        org_id="acme", user_id="alice", labels={"team": "search"}))
    assert [t.transfer_id for t in alice.transfers] == ["u3", "u1"]
    with pytest.raises(TallyError) as caught:
        await tally.ledger.ListTransactions(pb.ListTransactionsRequest(
            org_id="acme", page_token="garbage"))
    assert caught.value.field == "page_token"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_holds_past_their_ttl_are_released(pool: asyncpg.Pool) -> None:
    clock = Clock()
    store = LedgerStore(pool, clock)
    await store.transfer(d.TransferCommand("g", "acme", d.TransferKind.PROMOTIONAL_GRANT,
                                           10 * CREDIT), OPERATOR)
    await store.reserve("r1", "acme", 4 * CREDIT, timedelta(seconds=30), OPERATOR)
    assert await store.expire_reservations() == 0
    clock.now += timedelta(seconds=31)
    assert await store.expire_reservations() == 1
    balance = await store.get_balance("acme")
    assert (balance.held_micros, balance.available_micros) == (0, 10 * CREDIT)
    with pytest.raises(TallyError) as caught:
        await store.capture("r1", "acme", CREDIT, OPERATOR)
    assert caught.value.reason is Reason.RESERVATION_EXPIRED


async def test_expired_grants_post_expiry_transfers_for_what_is_left(pool: asyncpg.Pool) -> None:
    clock = Clock()
    store = LedgerStore(pool, clock)
    soon = clock.now + timedelta(days=1)
    await store.transfer(d.TransferCommand(
        "promo", "acme", d.TransferKind.PROMOTIONAL_GRANT, 5 * CREDIT,
        grant=d.GrantSpec(d.GrantKind.PROMOTIONAL, expires_at=soon)), OPERATOR)
    await store.transfer(d.TransferCommand("bonus", "acme", d.TransferKind.BONUS, 5 * CREDIT),
                         OPERATOR)
    await store.post_usage_batch("b1", [d.UsageItem("e1", "acme", 2 * CREDIT)], OPERATOR)
    clock.now = soon + timedelta(seconds=1)
    assert await store.expire_grants() == 1
    assert await store.expire_grants() == 0  # nothing left to expire, nothing posted twice
    balance = await store.get_balance("acme")
    assert balance.posted_micros == 5 * CREDIT
    expiries, _ = await store.list_transactions("acme", kinds=[d.TransferKind.EXPIRY])
    assert [t.amount_micros for t in expiries] == [3 * CREDIT]
    assert (await store.verify()).ok


async def test_a_batch_killed_half_way_leaves_nothing_and_retries_once(
    pool: asyncpg.Pool, db_url: str,
) -> None:
    store = LedgerStore(pool)
    await store.transfer(d.TransferCommand("g", "acme", d.TransferKind.PROMOTIONAL_GRANT,
                                           100 * CREDIT), OPERATOR)
    before = await store.get_balance("acme")
    # A trigger that kills the server process of the connection writing the poisoned receipt:
    # the transaction dies after the receipts are copied and before the balances are written.
    admin = await asyncpg.connect(db.asyncpg_url(db_url))
    await admin.execute("""
        CREATE FUNCTION ledger.die() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.event_id = 'poison' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER die AFTER INSERT ON ledger.usage_receipts
            FOR EACH ROW EXECUTE FUNCTION ledger.die();
    """)
    batch = [d.UsageItem(f"e{i}", "acme", CREDIT) for i in range(50)]
    batch.append(d.UsageItem("poison", "acme", CREDIT))
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await store.post_usage_batch("b1", batch, OPERATOR)
    assert await admin.fetchval("SELECT count(*) FROM ledger.usage_receipts") == 0
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.transfers WHERE kind = 'USAGE'") == 0
    assert await admin.fetchval(
        "SELECT count(*) FROM ledger.idempotency_keys WHERE key = 'usage-batch:b1'") == 0
    after_crash = await store.get_balance("acme")
    assert (after_crash.posted_micros, after_crash.held_micros) == (
        before.posted_micros, before.held_micros)
    await admin.execute("DROP TRIGGER die ON ledger.usage_receipts")
    await admin.close()
    results = await store.post_usage_batch("b1", batch, OPERATOR)
    again = await store.post_usage_batch("b1", batch, OPERATOR)
    assert again == results
    assert (await store.get_balance("acme")).posted_micros == 49 * CREDIT
    assert (await store.verify()).ok


@pytest.mark.ledger_tampered
async def test_tampering_with_an_entry_is_named_by_verify(
    tally: TallyClient, db_url: str,
) -> None:
    await grant(tally, "acme", 5 * CREDIT, "g")
    for i in range(3):
        await tally.ledger.Transfer(pb.TransferRequest(
            transfer_id=f"u{i}", org_id="acme", kind=pb.TRANSFER_KIND_USAGE,
            amount_micros=CREDIT))
    assert (await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())).ok
    admin = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await admin.execute("UPDATE ledger.transfers SET amount_micros = 1 "
                                "WHERE transfer_id = 'u1'")
        # someone with the power to switch the guard off still cannot hide the change
        await admin.execute("ALTER TABLE ledger.transfers DISABLE TRIGGER transfers_append_only;"
                            "UPDATE ledger.transfers SET reason = 'edited' "
                            "WHERE transfer_id = 'u1'")
    finally:
        await admin.close()
    report = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest(org_id="acme"))
    assert not report.ok
    assert report.first_bad_transfer_id == "u1"


async def test_outbox_stream_resumes_after_a_sequence(tally: TallyClient) -> None:
    await grant(tally, "acme", 5 * CREDIT, "g1")
    await grant(tally, "acme", 5 * CREDIT, "g2")
    stream = tally.ledger.StreamEvents(pb.StreamEventsRequest())
    first: list[pb.OutboxEvent] = []
    while len(first) < 2:  # events may arrive over several messages as they are sealed
        first += (await asyncio.wait_for(stream.read(), 10)).events
    stream.cancel()
    assert [e.available_micros_after for e in first] == [5 * CREDIT, 10 * CREDIT]
    assert len({e.event_id for e in first}) == 2
    resumed = tally.ledger.StreamEvents(pb.StreamEventsRequest(
        after_event_sequence=first[0].sequence))
    rest = (await asyncio.wait_for(resumed.read(), 10)).events
    resumed.cancel()
    assert [e.event_id for e in rest] == [first[1].event_id]


async def test_outbox_delivers_every_event_once_in_order_under_32_concurrent_writers(
    tally: TallyClient,
) -> None:
    orgs = [f"org-{i}" for i in range(32)]
    stream = tally.ledger.StreamEvents(pb.StreamEventsRequest())
    received: list[pb.OutboxEvent] = []

    async def consume() -> None:
        while len(received) < 32 * 5:
            received.extend((await stream.read()).events)

    consumer = asyncio.create_task(consume())

    async def writer(org: str) -> None:
        for n in range(5):
            await grant(tally, org, CREDIT, f"{org}-g{n}")

    await asyncio.gather(*(writer(org) for org in orgs))
    await asyncio.wait_for(consumer, 30)
    stream.cancel()
    sequences = [e.sequence for e in received]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert len({e.event_id for e in received}) == 32 * 5
    # a consumer that resumes from any point sees exactly the rest
    middle = received[len(received) // 2].sequence
    resumed = tally.ledger.StreamEvents(pb.StreamEventsRequest(after_event_sequence=middle))
    rest: list[pb.OutboxEvent] = []
    while len(rest) < len([e for e in received if e.sequence > middle]):
        rest += (await asyncio.wait_for(resumed.read(), 10)).events
    resumed.cancel()
    assert [e.event_id for e in rest] == [e.event_id for e in received if e.sequence > middle]


async def test_billing_state_follows_the_money_and_an_operator_pin_holds(
    tally: TallyClient, db_url: str,
) -> None:
    async def state() -> int:
        return (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))
                ).balance.billing_state

    await grant(tally, "acme", 2 * CREDIT, "g1")
    assert await state() == common_pb2.BILLING_STATE_ACTIVE
    # usage beyond credit: arrears -> READ_ONLY, and no new holds
    await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b1", items=items("acme", ("e1", 3 * CREDIT))))
    assert await state() == common_pb2.BILLING_STATE_READ_ONLY
    with pytest.raises(TallyError) as caught:
        await tally.ledger.Reserve(pb.ReserveRequest(
            reservation_id="r1", org_id="acme", amount_micros=1))
    assert caught.value.reason is Reason.ACCOUNT_READ_ONLY
    # a payment settles the arrears first; what is left makes the org ACTIVE again
    await grant(tally, "acme", 5 * CREDIT, "g2")
    assert await state() == common_pb2.BILLING_STATE_ACTIVE
    # prepaid credit used up exactly: THROTTLED (holds are still allowed, for the top-up)
    await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b2", items=items("acme", ("e2", 4 * CREDIT))))
    assert await state() == common_pb2.BILLING_STATE_THROTTLED
    await grant(tally, "acme", CREDIT, "g3")
    assert await state() == common_pb2.BILLING_STATE_ACTIVE
    # an operator's READ_ONLY is pinned: money moving does not lift it ...
    await tally.ledger.SetBillingState(pb.SetBillingStateRequest(
        request_id="pin", org_id="acme", state=common_pb2.BILLING_STATE_READ_ONLY,
        cause="invoice overdue"))
    await grant(tally, "acme", CREDIT, "g4")
    assert await state() == common_pb2.BILLING_STATE_READ_ONLY
    # ... until an operator sets ACTIVE, which hands the org back to the rules
    await tally.ledger.SetBillingState(pb.SetBillingStateRequest(
        request_id="unpin", org_id="acme", state=common_pb2.BILLING_STATE_ACTIVE,
        cause="invoice paid"))
    await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(
        batch_id="b3", items=items("acme", ("e3", 2 * CREDIT))))
    assert await state() == common_pb2.BILLING_STATE_THROTTLED
    # every transition is in the ledger with its cause, and in the outbox
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        changes = await conn.fetch("SELECT state, cause FROM ledger.billing_state_changes "
                                   "WHERE org_id = 'acme' ORDER BY changed_at, state")
        outboxed = await conn.fetchval("SELECT count(*) FROM ledger.outbox WHERE org_id = "
                                       "'acme' AND type = 'BILLING_STATE_CHANGED'")
    finally:
        await conn.close()
    assert [r["state"] for r in changes] == [
        "READ_ONLY", "ACTIVE", "THROTTLED", "ACTIVE", "READ_ONLY", "ACTIVE", "THROTTLED"]
    assert changes[0]["cause"] == "usage beyond available credit is owed (arrears)"
    assert outboxed == len(changes)


async def test_an_open_event_stream_ends_cleanly_when_the_ledger_shuts_down(
    ledger_server: RunningServer, tally: TallyClient,
) -> None:
    await grant(tally, "acme", CREDIT, "g")
    stream = tally.ledger.StreamEvents(pb.StreamEventsRequest())
    first = await stream.read()
    assert first.events  # the grant's BALANCE_CHANGED
    # the grace period is 10 s; an idle event stream must not hold the shutdown that long
    await asyncio.wait_for(ledger_server.stop(), 5)
    assert await asyncio.wait_for(stream.read(), 5) is grpc.aio.EOF
    assert await stream.code() is grpc.StatusCode.OK
