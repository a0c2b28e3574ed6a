"""Roll-ups follow committed usage off the ack path, exactly once: a roll-up worker killed in
the middle of its transaction counts nothing, and after the roll-ups catch up, summaries equal
the receipts equal the ledger's debits."""

from __future__ import annotations

import asyncio

import asyncpg

from tally.kit import db, metrics
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
from tests.metering.test_ingestion import AN_HOUR_AGO, usage

ACCEPTED = mpb.EVENT_STATUS_ACCEPTED


async def blocked_rollup(admin: asyncpg.Connection) -> int:
    """The backend of a roll-up transaction waiting for a lock (polled until there is one)."""
    for _ in range(1000):
        await admin.execute("SELECT pg_stat_clear_snapshot()")
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%WITH picked AS MATERIALIZED%' LIMIT 1")
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError("no roll-up transaction ever waited for the lock")


async def test_a_rollup_killed_mid_transaction_counts_nothing_and_summaries_match_the_ledger(
    suite: Suite,
) -> None:
    for org in ("acme", "globex"):
        await suite.fund(org, 1_000)
    admin = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    locker = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:
        # a lock that stops any roll-up transaction half-way (after it claimed its batches)
        locker_tx = locker.transaction()
        await locker_tx.start()
        await locker.execute("LOCK TABLE metering.usage_daily_labels IN SHARE ROW EXCLUSIVE MODE")
        charged: dict[str, list[int]] = {"acme": [], "globex": []}
        for call in range(6):
            orgs = [("acme", "globex")[i % 2] for i in range(40)]
            reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[
                usage(f"e-{call}-{i}", org=org, labels={"team": "a"},
                      input_tokens=100 + 37 * i, at=AN_HOUR_AGO) for i, org in enumerate(orgs)]))
            assert {r.status for r in reply.results} == {ACCEPTED}
            for org, result in zip(orgs, reply.results, strict=True):
                charged[org].append(result.receipt.cost_micros)
        # the service's roll-up worker is inside its transaction, waiting: kill its backend
        victim = await blocked_rollup(admin)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim)
        await locker_tx.commit()
        assert await admin.fetchval(
            "SELECT count(*) FROM metering.ledger_batches WHERE rolled_up_at IS NULL") > 0
        summaries = {}
        for org in ("acme", "globex"):
            summaries[org] = await suite.client.metering.GetUsageSummary(
                mpb.GetUsageSummaryRequest(org_id=org, year=AN_HOUR_AGO.year,
                                           month=AN_HOUR_AGO.month))
        debited = {r["org_id"]: r["amount"] for r in await admin.fetch(
            "SELECT org_id, sum(amount_micros) AS amount FROM ledger.transfers "
            "WHERE kind = 'USAGE' GROUP BY org_id")}
        labelled = await admin.fetchval(
            "SELECT sum(credits_micros) FROM metering.usage_daily_labels")
        hourly = await admin.fetchval("SELECT sum(credits_micros) FROM metering.usage_hourly")
    finally:
        await locker.close()
        await admin.close()
    for org, summary in summaries.items():
        assert summary.total_credits_micros == sum(charged[org]) == debited[org]
        assert summary.total_event_count == len(charged[org]) == 120
    assert labelled == hourly == sum(debited.values())
    assert metrics.sample("tally_metering_rollup_lag_seconds") == 0
    balance = await suite.client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="acme"))
    assert balance.balance.posted_micros == 1_000 * 1_000_000 - debited["acme"]
