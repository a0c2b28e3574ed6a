"""The money check, run after every test that had a database of its own (tests/conftest.py
`fresh_database`): what a finance team would check at month end, over everything the test
moved.

- Reconciliation (`Reconcile`'s checks, all time): paid orders <-> invoices <-> credits,
  refunds <-> credit notes <-> reversals, usage results and receipts <-> usage debits, and,
  when the test recorded usage events in metering, metering's events <-> the ledger's usage
  debits batch by batch (read straight from metering's tables in the same database).
- The ledger verifies: hash chains, every account's balance, the zero sum.
- Daily snapshots and stored statements equal the ledger's entries summed independently
  (posted and arrears at the cutoff; held and billing state as of the cutoff too).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.ledger.billing import reconcile
from services.ledger.billing import statements as st
from services.ledger.billing.statement_store import held_and_state_at
from services.ledger.store import LedgerStore
from services.metering.reports.store import BatchUsageStore
from tally.kit import db

ALL_TIME = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))

# posted credit and arrears of an org at $2, from its entries alone (no snapshot as a base)
_POSITION = (
    "SELECT coalesce(sum(CASE WHEN credit_account_id = 'org:' || $1 THEN amount_micros "
    "WHEN debit_account_id = 'org:' || $1 THEN -amount_micros ELSE 0 END), 0) AS posted, "
    "coalesce(sum(CASE WHEN debit_account_id = 'arrears:' || $1 THEN amount_micros "
    "WHEN credit_account_id = 'arrears:' || $1 THEN -amount_micros ELSE 0 END), 0) AS owed "
    "FROM ledger.transfers WHERE org_id = $1 AND created_at < $2")


class SqlItemizer:
    """Metering's events of the ledger's batches, read from metering's schema in the test's
    database (the same query GetBatchUsage answers with); unavailable when the test
    recorded no usage event at all (a ledger-only test posts batches metering never saw)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.store = BatchUsageStore(pool)
        self.pool = pool

    async def batch_usage(self, org_id: str, batch_ids: list[str]) -> st.BatchUsage:
        if not await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM metering.usage_events)"):
            raise st.UsageUnavailable("no usage events recorded")
        found = await self.store.batch_usage(org_id, batch_ids)
        return st.BatchUsage(
            [st.BatchCharge(b.batch_id, b.credits_micros, b.event_count) for b in found.batches],
            [st.UsageRow(r.dimension, r.value, r.credits_micros, r.event_count)
             for r in found.breakdown])


async def money_problems(url: str) -> list[str]:
    """Everything that does not add up in the database at `url` (empty: all is well)."""
    pool = await db.create_pool(url, min_size=1, max_size=2)
    try:
        if not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM ledger.accounts)"):
            return []  # the test never touched the ledger
        problems: list[str] = []
        async with pool.acquire() as conn:
            found = await reconcile.reconcile(conn, *ALL_TIME, itemizer=SqlItemizer(pool))
        problems += [f"money does not reconcile: {m}" for m in found.mismatches]
        report = await LedgerStore(pool).verify()
        if not report.ok:
            problems.append(f"the ledger does not verify: {report}")
        async with pool.acquire() as conn:
            problems += await _snapshot_problems(conn)
            problems += await _statement_problems(conn)
        return problems
    finally:
        await pool.close()


async def _snapshot_problems(conn: Any) -> list[str]:
    problems = []
    # what snapshots read for held and state (the history of holds and states) ends where
    # the accounts are now
    for a in await conn.fetch("SELECT org_id, held_micros, billing_state FROM ledger.accounts "
                              "WHERE kind = 'ORG_CREDIT' ORDER BY org_id"):
        history = await held_and_state_at(conn, a["org_id"], ALL_TIME[1])
        if history != (a["held_micros"], a["billing_state"]):
            problems.append(f"org {a['org_id']}: held and state {history} by their history, "
                            f"{(a['held_micros'], a['billing_state'])} on its account")
    for s in await conn.fetch("SELECT * FROM ledger.daily_snapshots ORDER BY org_id, day"):
        cutoff = st.start_of(s["day"] + timedelta(days=1))
        sums = await conn.fetchrow(_POSITION, s["org_id"], cutoff)
        held, state = await held_and_state_at(conn, s["org_id"], cutoff)
        expected = (int(sums["posted"]), int(sums["owed"]), held, state)
        found = (s["posted_micros"], s["arrears_micros"], s["held_micros"], s["billing_state"])
        if expected != found:
            problems.append(f"snapshot {s['org_id']} {s['day']}: (posted, arrears, held, "
                            f"state) {found}, the ledger says {expected}")
    return problems


async def _statement_problems(conn: Any) -> list[str]:
    problems = []
    for s in await conn.fetch("SELECT org_id, month, body FROM ledger.statements"):
        closing = json.loads(s["body"])["closing"]
        sums = await conn.fetchrow(_POSITION, s["org_id"],
                                   st.start_of(st.next_month(s["month"])))
        if closing != [int(sums["posted"]), int(sums["owed"])]:
            problems.append(f"statement {s['org_id']} {s['month']}: closing {closing}, the "
                            f"ledger says {[int(sums['posted']), int(sums['owed'])]}")
    return problems
