"""Group commit of usage batches: concurrent PostUsageBatch calls share one transaction, and
each is still claimed, answered and replayed on its own."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import asyncpg
import pytest

from services.ledger import domain as d
from services.ledger.server import usage_group_commit
from services.ledger.store import LedgerStore
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.kit.money import INT64_MAX
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient
from tests.ledger.support import fund

CREDIT = 1_000_000
METERING = d.Caller(actor="svc:metering")


def batch(batch_id: str, *items: tuple[str, str, int], caller: d.Caller = METERING
          ) -> d.UsageBatch:
    return d.UsageBatch(batch_id, [d.UsageItem(e, o, c) for o, e, c in items], caller)


async def usage_transfers(pool: asyncpg.Pool, org: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT transfer_id, debit_account_id, amount_micros FROM ledger.transfers "
        "WHERE org_id = $1 AND kind = 'USAGE' ORDER BY seq", org)


async def test_batches_applied_together_are_answered_as_if_one_after_the_other(
    pool: asyncpg.Pool,
) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    await fund(store, "globex", CREDIT)
    outcomes = await store.post_usage_batches([
        batch("b1", ("acme", "e1", 2 * CREDIT), ("globex", "e1", CREDIT // 2)),
        batch("b2", ("acme", "e2", 3 * CREDIT), ("globex", "e2", CREDIT)),
    ])
    first, second = outcomes
    assert not isinstance(first, TallyError) and not isinstance(second, TallyError)
    assert [(r.debited_micros, r.arrears_micros, r.balance_after_micros) for r in first] == [
        (2 * CREDIT, 0, 8 * CREDIT), (CREDIT // 2, 0, CREDIT // 2)]
    # the second batch sees the first's debits; globex runs out and owes the rest
    assert [(r.debited_micros, r.arrears_micros, r.balance_after_micros) for r in second] == [
        (3 * CREDIT, 0, 5 * CREDIT), (CREDIT // 2, CREDIT // 2, 0)]
    # one USAGE transfer per org for the group (plus globex's arrears), named after b1
    assert [(t["transfer_id"], t["amount_micros"]) for t in
            await usage_transfers(pool, "acme")] == [("usage:b1:acme", 5 * CREDIT)]
    assert [(t["transfer_id"], t["amount_micros"]) for t in
            await usage_transfers(pool, "globex")] == [
        ("usage:b1:globex", CREDIT), ("usage:b1:globex:arrears", CREDIT // 2)]
    assert [r.transfer_id for r in second] == ["usage:b1:acme", "usage:b1:globex"]
    # each batch is still its own: a replay of b2 alone answers exactly what it got
    assert await store.post_usage_batch("b2", list(batch("b2", ("acme", "e2", 3 * CREDIT),
                                                         ("globex", "e2", CREDIT)).items),
                                        METERING) == second
    changes = await pool.fetch("SELECT org_id FROM ledger.outbox WHERE type = 'BALANCE_CHANGED'")
    # one for the funding, one for the group
    assert Counter(r["org_id"] for r in changes) == {"acme": 2, "globex": 2}
    assert (await store.verify()).ok


async def test_each_batch_of_a_group_is_claimed_on_its_own(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    earlier = await store.post_usage_batch("old", [d.UsageItem("e0", "acme", CREDIT)], METERING)
    outcomes = await store.post_usage_batches([
        batch("old", ("acme", "e0", CREDIT)),  # a replay of a committed batch
        batch("old", ("acme", "e0", 5)),  # the same id for another request
        batch("new", ("acme", "e1", CREDIT), ("acme", "e0", CREDIT)),  # e0 was charged by "old"
        batch("new", ("acme", "e1", CREDIT), ("acme", "e0", CREDIT)),  # sent twice at once
        batch("new", ("acme", "e1", 7)),  # and once more, for something else
        batch("other", ("acme", "e1", CREDIT), ("acme", "e2", CREDIT)),  # e1 is new's
    ])
    replay, reused, new, new_again, new_reused, other = outcomes
    assert replay == earlier
    assert isinstance(reused, TallyError) and reused.reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert isinstance(new_reused, TallyError)
    assert new_reused.reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert not isinstance(new, TallyError) and not isinstance(other, TallyError)
    assert [(r.is_duplicate, r.balance_after_micros) for r in new] == [
        (False, 8 * CREDIT), (True, 9 * CREDIT)]
    assert new_again == new
    # e1 twice in the group: charged at its first, the second answered with that receipt
    assert other[0] == pb_free_duplicate(new[0])
    assert [(r.debited_micros, r.balance_after_micros) for r in other] == [
        (CREDIT, 8 * CREDIT), (CREDIT, 7 * CREDIT)]
    assert (await store.get_balance("acme")).posted_micros == 7 * CREDIT
    receipts = await pool.fetch("SELECT event_id, batch_id FROM ledger.usage_receipts "
                                "ORDER BY event_id")
    assert [(r["event_id"], r["batch_id"]) for r in receipts] == [
        ("e0", "old"), ("e1", "new"), ("e2", "other")]
    # later replays agree with what the group answered
    assert await store.post_usage_batch(
        "other", [d.UsageItem("e1", "acme", CREDIT), d.UsageItem("e2", "acme", CREDIT)],
        METERING) == other
    assert (await store.verify()).ok


def pb_free_duplicate(result: d.UsageResult) -> d.UsageResult:
    """`result` as another batch carrying the same event gets it."""
    return d.UsageResult(result.event_id, result.transfer_id, result.debited_micros,
                         result.arrears_micros, result.balance_after_micros, True)


async def test_a_batch_that_fails_fails_alone(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    groups: list[int] = []

    async def post(batches: Sequence[d.UsageBatch]) -> list[list[d.UsageResult] | TallyError]:
        groups.append(len(batches))
        return await store.post_usage_batches(batches)

    commit = usage_group_commit(post)
    # globex's arrears would pass int64: refused, and so its whole group at first
    broke = [d.UsageItem("x1", "globex", INT64_MAX), d.UsageItem("x2", "globex", INT64_MAX)]
    async with pool.acquire() as blocker, blocker.transaction():
        # the first group waits on acme's account while the rest queue up behind it
        await blocker.execute("SELECT 1 FROM ledger.accounts WHERE account_id = 'org:acme' "
                              "FOR UPDATE")
        first = asyncio.create_task(commit.submit(batch("b0", ("acme", "e0", CREDIT))))
        await wait_until_blocked(pool)
        bad = asyncio.create_task(commit.submit(d.UsageBatch("bad", broke, METERING)))
        good = [asyncio.create_task(commit.submit(batch(f"b{i}", ("acme", f"e{i}", CREDIT))))
                for i in range(1, 4)]
        await asyncio.sleep(0)
    assert len(await first) == 1
    with pytest.raises(TallyError) as refused:
        await bad
    assert refused.value.reason is Reason.INVALID_ARGUMENT and "globex" in str(refused.value)
    assert [len(r) for r in await asyncio.gather(*good)] == [1, 1, 1]
    assert groups[:2] == [1, 4]  # the four queued batches were tried together, then alone
    assert sorted(groups[2:]) == [1, 1, 1, 1]
    assert (await store.get_balance("acme")).posted_micros == 6 * CREDIT
    assert await pool.fetchval("SELECT count(*) FROM ledger.usage_receipts "
                               "WHERE org_id = 'globex'") == 0


async def wait_until_blocked(db: asyncpg.Pool | asyncpg.Connection) -> None:
    """Until some session waits for a row lock (the group commit's transaction)."""
    for _ in range(500):
        # a transaction sees one snapshot of pg_stat_activity unless it is cleared
        await db.execute("SELECT pg_stat_clear_snapshot()")
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity "
                               "WHERE wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no transaction ever waited for the lock")


async def test_batches_audited_otherwise_are_not_grouped(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    commit = usage_group_commit(store.post_usage_batches)
    operator = d.Caller(actor="user:ops", labels={"team": "a"})
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM ledger.accounts WHERE account_id = 'org:acme' "
                              "FOR UPDATE")
        first = asyncio.create_task(commit.submit(batch("b0", ("acme", "e0", CREDIT))))
        await wait_until_blocked(pool)
        queued = [asyncio.create_task(commit.submit(batch(
            f"b{i}", ("acme", f"e{i}", CREDIT), caller=operator if i == 2 else METERING)))
            for i in range(1, 5)]
        await asyncio.sleep(0)
    await asyncio.gather(first, *queued)
    rows = await pool.fetch("SELECT transfer_id, actor, labels::text FROM ledger.transfers "
                            "WHERE kind = 'USAGE'")
    # b1, b3 and b4 went together after b0; b2, audited otherwise, in its own lane
    assert {(r["transfer_id"], r["actor"], r["labels"]) for r in rows} == {
        ("usage:b0:acme", "svc:metering", "{}"), ("usage:b1:acme", "svc:metering", "{}"),
        ("usage:b2:acme", "user:ops", '{"team": "a"}')}


async def test_concurrent_batches_sent_three_times_charge_each_event_once(
    tally: TallyClient, db_url: str,
) -> None:
    """32 callers post 160 batches over 20 orgs that start with little credit, each batch
    three times at once, while a lock makes them pile up into groups: every event is charged
    once, debits never pass the credit, arrears take the rest, and the books balance."""
    orgs = [f"org-{i:02d}" for i in range(20)]
    rng = random.Random(7)
    costs: dict[tuple[str, str], int] = {}  # what each event costs, wherever it is sent
    requests = []
    for b in range(160):
        request = pb.PostUsageBatchRequest(
            batch_id=f"batch-{b}", context=common_pb2.RequestContext(actor="svc:metering"))
        for org in rng.sample(orgs, 8):
            event = f"ev-{rng.randrange(120)}"  # events repeat across batches (retries)
            cost = costs.setdefault((org, event), rng.randrange(1, 5) * CREDIT // 10)
            request.items.add(event_id=event, org_id=org, cost_micros=cost)
        requests.append(request)
    for org in orgs:
        await tally.ledger.Transfer(pb.TransferRequest(
            transfer_id=f"fund:{org}", org_id=org, kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=3 * CREDIT))
    admin = await asyncpg.connect(db.asyncpg_url(db_url))
    pending = asyncio.Queue[pb.PostUsageBatchRequest]()
    for request in requests:
        for _ in range(3):
            pending.put_nowait(request)
    answers: dict[str, list[pb.PostUsageBatchResponse]] = {}

    async def caller() -> None:
        while not pending.empty():
            request = pending.get_nowait()
            reply = await tally.ledger.PostUsageBatch(request)
            answers.setdefault(request.batch_id, []).append(reply)

    try:
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM ledger.accounts WHERE org_id = 'org-00' "
                                "FOR UPDATE")
            callers = [asyncio.create_task(caller()) for _ in range(32)]
            # the group commit waits for org-00 while the other callers queue up
            await wait_until_blocked(admin)
        await asyncio.gather(*callers)
        charged = await admin.fetch(
            "SELECT org_id, event_id, debited_micros + arrears_micros AS cost "
            "FROM ledger.usage_receipts")
        grouped = await admin.fetchval(
            "SELECT count(DISTINCT split_part(transfer_id, ':', 2)) FROM ledger.transfers "
            "WHERE kind = 'USAGE'")
        accounts = await admin.fetch("SELECT account_id, kind, org_id, balance_micros, "
                                     "held_micros FROM ledger.accounts")
    finally:
        await admin.close()
    # every batch got one answer, whichever copy applied it
    assert all(len(set(r.SerializeToString() for r in replies)) == 1
               for replies in answers.values())
    assert len(answers) == len(requests)
    assert Counter((r["org_id"], r["event_id"]) for r in charged) == dict.fromkeys(costs, 1)
    assert all(r["cost"] == costs[(r["org_id"], r["event_id"])] for r in charged)
    assert grouped < len(requests)  # the calls did share transactions
    assert sum(a["balance_micros"] for a in accounts) == 0
    by_id = {a["account_id"]: a for a in accounts}
    for org in orgs:
        spent = sum(r["cost"] for r in charged if r["org_id"] == org)
        posted = by_id[f"org:{org}"]["balance_micros"]
        owed = -by_id[f"arrears:{org}"]["balance_micros"]
        assert posted >= 0
        assert posted + spent - owed == 3 * CREDIT
        assert owed == max(0, spent - 3 * CREDIT)
    verified = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert verified.ok


async def test_bad_input_in_a_group_is_refused_alone(pool: asyncpg.Pool) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 10 * CREDIT)
    empty = d.UsageBatch("empty", [], METERING)
    negative = batch("negative", ("acme", "e1", -1))
    outcomes = await store.post_usage_batches([empty, batch("good", ("acme", "e2", CREDIT)),
                                               negative])
    refused_empty, good, refused_negative = outcomes
    assert isinstance(refused_empty, TallyError)
    assert refused_empty.reason is Reason.INVALID_ARGUMENT and "items" in str(refused_empty)
    assert isinstance(refused_negative, TallyError)
    assert "items[0].cost_micros" in str(refused_negative)
    assert not isinstance(good, TallyError) and good[0].balance_after_micros == 9 * CREDIT
    assert await pool.fetchval("SELECT count(*) FROM ledger.idempotency_keys "
                               "WHERE key LIKE 'usage-batch:%'") == 1
