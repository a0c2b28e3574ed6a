"""PostUsageBatch with one debit per org (what metering sends): one transfer per org per
batch, no per-event rows, replayed by batch id, safe under many concurrent writers."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import timedelta

import asyncpg
import pytest

from services.ledger import domain as d
from services.ledger import usage_work
from services.ledger.store import LedgerStore
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient
from tests.ledger.support import fund

CREDIT = 1_000_000
METERING = common_pb2.RequestContext(actor="svc:metering")


def request(batch_id: str, *debits: tuple[str, int, int]) -> pb.PostUsageBatchRequest:
    return pb.PostUsageBatchRequest(batch_id=batch_id, context=METERING, org_debits=[
        pb.OrgUsageDebit(org_id=o, amount_micros=a, event_count=n, events_digest="ab" * 32)
        for o, a, n in debits])


async def test_an_org_debit_is_one_transfer_answered_per_org_and_replayed_by_batch(
    tally: TallyClient, pool: asyncpg.Pool,
) -> None:
    for org in ("acme", "globex"):
        await tally.ledger.Transfer(pb.TransferRequest(
            transfer_id=f"fund:{org}", org_id=org, kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=CREDIT))
    sent = request("b1", ("acme", 300_000, 3), ("globex", 1_500_000, 7), ("initech", 5, 1))
    reply = await tally.ledger.PostUsageBatch(sent)
    assert [(r.org_id, r.transfer_id, r.arrears_transfer_id, r.debited_micros,
             r.arrears_micros, r.available_before_micros, r.balance_after_micros)
            for r in reply.org_results] == [
        ("acme", "usage:b1:acme", "", 300_000, 0, CREDIT, 700_000),
        ("globex", "usage:b1:globex", "usage:b1:globex:arrears", CREDIT, 500_000, CREDIT, 0),
        # an org the ledger never saw is opened; it has no credit, so it all is owed
        ("initech", "", "usage:b1:initech:arrears", 0, 5, 0, 0)]
    assert not reply.results and not any(r.is_duplicate for r in reply.org_results)
    again = await tally.ledger.PostUsageBatch(sent)
    assert [r.is_duplicate for r in again.org_results] == [True, True, True]
    for r in again.org_results:
        r.is_duplicate = False
    assert list(again.org_results) == list(reply.org_results)
    with pytest.raises(TallyError) as reused:
        await tally.ledger.PostUsageBatch(request("b1", ("acme", 1, 1)))
    assert reused.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    balance = await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="globex"))
    assert (balance.balance.posted_micros, balance.balance.arrears_micros) == (0, 500_000)
    assert balance.balance.billing_state == common_pb2.BILLING_STATE_READ_ONLY
    assert (await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())).ok
    assert await pool.fetchval("SELECT count(*) FROM ledger.usage_receipts") == 0


async def test_items_and_org_debits_in_one_batch_are_refused(tally: TallyClient) -> None:
    mixed = request("b1", ("acme", 1, 1))
    mixed.items.add(event_id="e1", org_id="acme", cost_micros=1)
    with pytest.raises(TallyError) as refused:
        await tally.ledger.PostUsageBatch(mixed)
    assert refused.value.reason is Reason.INVALID_ARGUMENT
    assert "org_debits" in str(refused.value)


async def test_a_captured_reservation_frees_its_hold_before_the_debit(
    pool: asyncpg.Pool,
) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", CREDIT)
    caller = d.Caller(actor="svc:metering")
    await store.reserve("r1", "acme", 800_000, timedelta(minutes=5), caller)
    debit = d.OrgUsageDebit("acme", 900_000, 2, "", [
        d.UsageCapture("r1", 600_000, cost_before_micros=300_000)])
    (outcome,) = await usage_work.post_org_debits(store, [
        d.UsageBatch("b1", [], caller, [debit])])
    assert not isinstance(outcome, TallyError)
    (result,) = outcome
    # the hold is freed first, so the whole credit is available to the batch
    assert (result.available_before_micros, result.debited_micros, result.arrears_micros) == (
        CREDIT, 900_000, 0)
    held = await store.get_reservation("r1", "acme")
    assert held.state is d.ReservationState.CAPTURED
    assert (held.captured_micros, held.capture_transfer_id) == (600_000, "usage:b1:acme")
    balance = await store.get_balance("acme")
    assert (balance.posted_micros, balance.held_micros) == (100_000, 0)


async def test_concurrent_writers_over_the_same_orgs_charge_each_batch_once(
    pool: asyncpg.Pool,
) -> None:
    """16 writers post 120 batches over 30 orgs (each batch a random 10..30 of them, in
    random order, sent twice at once) against little credit: no deadlock, every batch is
    charged once, credit never goes negative, arrears take the rest, the books balance and
    every org's chain verifies."""
    store = LedgerStore(pool)
    orgs = [f"org-{i:02d}" for i in range(30)]
    for org in orgs:
        await fund(store, org, 2 * CREDIT)
    rng = random.Random(11)
    caller = d.Caller(actor="svc:metering")
    batches = []
    owed_by_org: dict[str, int] = defaultdict(int)
    for b in range(120):
        chosen = rng.sample(orgs, rng.randrange(10, 31))
        debits = [d.OrgUsageDebit(o, rng.randrange(0, 200_000), 1) for o in chosen]
        for debit in debits:
            owed_by_org[debit.org_id] += debit.amount_micros
        batches.append(d.UsageBatch(f"batch-{b}", [], caller, debits))
    queue = asyncio.Queue[d.UsageBatch]()
    for batch in batches:
        queue.put_nowait(batch)
        queue.put_nowait(batch)
    answers: dict[str, list[list[d.OrgUsageResult]]] = defaultdict(list)

    async def writer() -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            group = [batch]
            while len(group) < 3 and not queue.empty():  # a group commit of a few
                group.append(queue.get_nowait())
            for b, outcome in zip(group, await usage_work.post_org_debits(store, group),
                                  strict=True):
                assert not isinstance(outcome, TallyError), outcome
                answers[b.batch_id].append(outcome)

    await asyncio.gather(*(writer() for _ in range(16)))
    for replies in answers.values():
        assert len(replies) == 2
        first, second = replies
        assert [(r.debited_micros, r.arrears_micros) for r in first] == [
            (r.debited_micros, r.arrears_micros) for r in second]
    accounts = {r["account_id"]: r for r in await pool.fetch(
        "SELECT account_id, balance_micros, held_micros FROM ledger.accounts")}
    assert sum(a["balance_micros"] for a in accounts.values()) == 0
    for org in orgs:
        posted = accounts[f"org:{org}"]["balance_micros"]
        owed = -accounts[f"arrears:{org}"]["balance_micros"]
        spent = owed_by_org[org]
        assert posted >= 0
        assert (posted, owed) == (max(0, 2 * CREDIT - spent), max(0, spent - 2 * CREDIT))
    transfers = await pool.fetchval(
        "SELECT count(*) FROM ledger.transfers WHERE kind = 'USAGE'")
    assert transfers == sum((r.debited_micros > 0) + (r.arrears_micros > 0)
                            for replies in answers.values() for r in replies[0])
    assert (await store.verify()).ok
