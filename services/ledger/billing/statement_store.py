"""Statements and daily snapshots in PostgreSQL: sums of an org's entries per period, final
statements stored once, and the snapshot job (one row per org and day, written once whatever
the number of replicas running it, catching up missed days)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from services.ledger import domain as d
from services.ledger.billing import statements as st
from tally.kit.errors import FieldViolation, invalid
from tally.kit.log import get_logger
from tally.kit.paging import decode_token, encode_token

if TYPE_CHECKING:
    import asyncpg

    from services.ledger.store import Connection, Row

SNAPSHOT_ROWS_PER_RUN: Final = 2000
"""Most snapshot rows one run of the job writes (a long outage catches up over several)."""

# $1 org, $2 'org:' account, $3 'arrears:' account, [$4, $5) the period
_SUMS: Final = (
    "SELECT kind, debit_account_id = $2 AS from_credit, credit_account_id = $2 AS to_credit, "
    "debit_account_id = $3 AS from_arrears, credit_account_id = $3 AS to_arrears, "
    "count(*) AS entries, sum(amount_micros) AS amount FROM ledger.transfers "
    "WHERE org_id = $1 AND created_at >= $4 AND created_at < $5 GROUP BY 1, 2, 3, 4, 5")
_POSITION: Final = (
    "SELECT coalesce(sum(CASE WHEN credit_account_id = $2 THEN amount_micros "
    "WHEN debit_account_id = $2 THEN -amount_micros ELSE 0 END), 0) AS posted, "
    "coalesce(sum(CASE WHEN debit_account_id = $3 THEN amount_micros "
    "WHEN credit_account_id = $3 THEN -amount_micros ELSE 0 END), 0) AS owed "
    "FROM ledger.transfers WHERE org_id = $1 AND created_at >= $4 AND created_at < $5")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
log = get_logger("ledger.statements")


def _accounts(org_id: str) -> tuple[str, str]:
    return d.credit_account(org_id), d.arrears_account(org_id)


def _entry_sums(rows: Sequence[Row]) -> list[st.EntrySum]:
    return [st.EntrySum(d.TransferKind(r["kind"]), r["from_credit"], r["to_credit"],
                        r["from_arrears"], r["to_arrears"], r["entries"], int(r["amount"]))
            for r in rows]


async def movements(conn: Connection, org_id: str, start: datetime, end: datetime
                    ) -> st.Movements:
    """What the org's entries stamped in [start, end) did."""
    rows = await conn.fetch(_SUMS, org_id, *_accounts(org_id), start, end)
    return st.fold(_entry_sums(rows))


async def position_at(conn: Connection, org_id: str, at: datetime) -> st.Position:
    """The org's posted credit and arrears at `at`: the newest daily snapshot ending by then
    (itself a sum of entries), plus the entries after it."""
    base = await conn.fetchrow(
        "SELECT day, posted_micros, arrears_micros FROM ledger.daily_snapshots "
        "WHERE org_id = $1 AND day < $2 ORDER BY day DESC LIMIT 1",
        org_id, at.astimezone(UTC).date())  # a day < at's date ended by `at`
    since, posted, owed = _EPOCH, 0, 0
    if base is not None:
        since = st.start_of(base["day"] + timedelta(days=1))
        posted, owed = base["posted_micros"], base["arrears_micros"]
    row = await conn.fetchrow(_POSITION, org_id, *_accounts(org_id), since, at)
    assert row is not None
    return st.Position(posted + int(row["posted"]), owed + int(row["owed"]))


# $1 org, [$2, $3) the period: the org's usage batches posted in it, with their debits
_BATCHES: Final = (
    "SELECT b.batch_id, x.debited + x.owed AS micros FROM ledger.usage_batch_results b, "
    "unnest(b.org_ids, b.debited_micros, b.arrears_micros) AS x(org_id, debited, owed) "
    "WHERE b.created_at >= $2 AND b.created_at < $3 AND x.org_id = $1 "
    "ORDER BY b.created_at, b.batch_id")
BATCHES_PER_CALL: Final = 1000
"""Batch ids per GetBatchUsage call (metering's bound)."""


async def usage_batches(conn: Connection, org_id: str, start: datetime, end: datetime
                        ) -> list[st.BatchCharge]:
    """The org's usage batches posted in [start, end) and what each debited (credit +
    arrears)."""
    return [st.BatchCharge(r["batch_id"], int(r["micros"]))
            for r in await conn.fetch(_BATCHES, org_id, start, end)]


async def metering_usage(itemizer: st.UsageItemizer, org_id: str,
                         batches: list[st.BatchCharge]) -> st.BatchUsage:
    """Metering's events of `batches`, asked BATCHES_PER_CALL ids at a time and summed."""
    charges: list[st.BatchCharge] = []
    rows: dict[tuple[str, str], list[int]] = {}
    for first in range(0, len(batches), BATCHES_PER_CALL):
        part = await itemizer.batch_usage(
            org_id, [b.batch_id for b in batches[first:first + BATCHES_PER_CALL]])
        charges += part.batches
        for r in part.breakdown:
            sums = rows.setdefault((r.dimension, r.value), [0, 0])
            sums[0] += r.credits_micros
            sums[1] += r.event_count
    return st.BatchUsage(charges, [st.UsageRow(k[0], k[1], v[0], v[1])
                                   for k, v in sorted(rows.items())])


# $1 org, $2 the cutoff: held credit (open reservations + the leases' hold changes) and the
# billing state as of the cutoff, from when holds and states changed, not from entries. Sums
# and the write order (seq, under the org's lock), never "the row stamped last": a
# transaction stamped earlier can commit after one stamped later (migration holds_as_of_a_cutoff).
_HELD_AT: Final = (
    "SELECT (SELECT coalesce(sum(amount_micros), 0) FROM ledger.reservations "
    "WHERE org_id = $1 AND coalesce(settled_at, 'infinity'::timestamptz) >= $2 "
    "AND created_at < $2) + (SELECT coalesce(sum(delta_micros), 0) FROM ledger.lease_holds "
    "WHERE org_id = $1 AND at < $2) AS held, "
    "(SELECT state FROM ledger.billing_state_changes WHERE org_id = $1 AND changed_at < $2 "
    "ORDER BY seq DESC LIMIT 1) AS state")


async def held_and_state_at(conn: Connection, org_id: str, at: datetime) -> tuple[int, str]:
    """What the org held and its billing state at `at` (ACTIVE before any change)."""
    row = await conn.fetchrow(_HELD_AT, org_id, at)
    assert row is not None
    return int(row["held"]), row["state"] or d.BillingState.ACTIVE.value


def _statement_body(s: st.Statement) -> str:
    m = s.movements
    return json.dumps({
        "usage": None if s.usage is None else {
            "itemized_micros": s.usage.itemized_micros,
            "rows": [[r.dimension, r.value, r.credits_micros, r.event_count]
                     for r in s.usage.rows]},
        "opening": [s.opening.posted_micros, s.opening.arrears_micros],
        "closing": [s.closing.posted_micros, s.closing.arrears_micros],
        "lines": [[x.category.value, x.amount_micros, x.entry_count] for x in m.lines],
        "usage_arrears_micros": m.usage_arrears_micros,
        "arrears_settled_micros": m.arrears_settled_micros, "entry_count": m.entry_count})


def _stored_statement(r: Row) -> st.Statement:
    body = json.loads(r["body"])
    m = st.Movements([st.Line(st.Category(c), a, n) for c, a, n in body["lines"]],
                     body["usage_arrears_micros"], body["arrears_settled_micros"],
                     body["entry_count"])
    usage = body.get("usage")  # absent in statements stored before the breakdown
    return st.Statement(r["org_id"], r["month"], True, r["generated_at"],
                        st.Position(*body["opening"]), m, st.Position(*body["closing"]),
                        None if usage is None else st.UsageItems(
                            usage["itemized_micros"],
                            [st.UsageRow(*x) for x in usage["rows"]]))


class StatementStore:
    """Statements and daily snapshots of orgs, on the ledger's pool and clock."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], datetime],
                 itemizer: st.UsageItemizer | None = None) -> None:
        self.pool = pool
        self.clock = clock
        self.itemizer = itemizer or st.NoItemizer()

    async def statement(self, org_id: str, month_text: str) -> st.Statement:
        """The statement of `month_text` (YYYY-MM). A final one is stored the first time and
        served as stored afterwards (ON CONFLICT: two first readers store it once)."""
        d.raise_if([d.check_id("org_id", org_id)])
        now = self.clock()
        month = st.parse_month(month_text, now)
        async with self.pool.acquire() as conn:
            return await self._statement(conn, org_id, month, now)

    async def _statement(self, conn: Connection, org_id: str, month: date, now: datetime
                         ) -> st.Statement:
        row = await conn.fetchrow(
            "SELECT * FROM ledger.statements WHERE org_id = $1 AND month = $2", org_id, month)
        if row is not None:
            return _stored_statement(row)
        start, end = st.start_of(month), st.start_of(st.next_month(month))
        # one snapshot of the database for the three reads, so an entry committed meanwhile
        # cannot make a sound statement look unbalanced
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            computed = st.statement(org_id, month, await position_at(conn, org_id, start),
                                    await movements(conn, org_id, start, end), now)
            st.check_closing(computed, await position_at(conn, org_id, end))
            batches = await usage_batches(conn, org_id, start, end)
        computed = dataclasses.replace(computed, usage=await self._itemize(org_id, batches))
        is_empty = (computed.closing == computed.opening == st.Position()
                    and not computed.movements.entry_count)
        if not computed.is_final or is_empty:
            return computed  # an empty month (before the org's first entry): nothing to keep
        if computed.usage is None and not isinstance(self.itemizer, st.NoItemizer):
            # metering could not be asked: kept once its usage is itemized (a ledger run
            # without metering, TALLY_LEDGER_ITEMIZE_USAGE=false, keeps it as it is)
            return computed
        await conn.execute(
            "INSERT INTO ledger.statements (org_id, month, body, generated_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (org_id, month) DO NOTHING",
            org_id, month, _statement_body(computed), now)
        stored = await conn.fetchrow(
            "SELECT * FROM ledger.statements WHERE org_id = $1 AND month = $2", org_id, month)
        assert stored is not None
        return _stored_statement(stored)

    async def _itemize(self, org_id: str, batches: list[st.BatchCharge]
                       ) -> st.UsageItems | None:
        if not batches:
            return st.UsageItems(0, [])
        if isinstance(self.itemizer, st.NoItemizer):
            return None
        try:
            found = await metering_usage(self.itemizer, org_id, batches)
        except st.UsageUnavailable as exc:
            log.warning("statement_usage_unavailable", org_id=org_id, error=str(exc))
            return None
        items = st.usage_items(batches, found)
        if items is None:
            log.error("statement_usage_does_not_reconcile", org_id=org_id,
                      batches=[b for b, _, _ in st.batch_mismatches(batches, found.batches)][:20])
        return items

    async def list_statements(self, org_id: str, size: int, token: str
                              ) -> tuple[list[st.Statement], str]:
        """Statements from the current month back to the org's first entry's, newest first."""
        problems: list[FieldViolation | None] = [d.check_id("org_id", org_id)]
        if not 0 <= size <= st.MAX_STATEMENT_PAGE:
            problems.append(FieldViolation(
                "page_size", f"must be between 0 and {st.MAX_STATEMENT_PAGE}"))
        try:
            before = decode_token(token, "statements")
        except ValueError:
            raise invalid("page_token", "is not a token this service issued") from None
        d.raise_if(problems)
        now = self.clock()
        async with self.pool.acquire() as conn:
            first_at = await conn.fetchval(
                "SELECT min(created_at) FROM ledger.transfers WHERE org_id = $1", org_id)
            if first_at is None:
                return [], ""
            first = first_at.astimezone(UTC).date().replace(day=1)
            month = now.astimezone(UTC).date().replace(day=1)
            if before is not None:
                month = st.previous_month(date(before // 100, before % 100, 1))
            found: list[st.Statement] = []
            while month >= first and len(found) < (size or st.DEFAULT_STATEMENT_PAGE):
                found.append(await self._statement(conn, org_id, month, now))
                month = st.previous_month(month)
        last = found[-1].month if found and month >= first else None
        return found, (encode_token("statements", last.year * 100 + last.month)
                       if last else "")

    async def snapshots(self, org_id: str, from_day: str, to_day: str
                        ) -> list[st.DailySnapshot]:
        """The org's snapshots of [from_day, to_day], oldest first."""
        d.raise_if([d.check_id("org_id", org_id)])
        first = st.parse_day(from_day, "from_day")
        last = st.parse_day(to_day, "to_day")
        st.check_day_range(first, last)
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.daily_snapshots WHERE org_id = $1 AND day BETWEEN $2 AND $3 "
            "ORDER BY day", org_id, first, last)
        return [_snapshot(r) for r in rows]

    async def write_daily_snapshots(self) -> int:
        """The snapshot job: for every org, the days since its last snapshot (or its first
        entry) up to the last final day, at most SNAPSHOT_ROWS_PER_RUN rows a run. Safe on
        several replicas: an org is written under a transaction-scoped advisory lock that
        others skip, and rows are inserted ON CONFLICT DO NOTHING."""
        now = self.clock()
        last_day = st.last_final_day(now)
        written = 0
        orgs = await self.pool.fetch(
            "SELECT a.org_id FROM ledger.accounts a WHERE a.kind = 'ORG_CREDIT' "
            "AND NOT EXISTS (SELECT 1 FROM ledger.daily_snapshots s "
            "WHERE s.org_id = a.org_id AND s.day >= $1) ORDER BY a.org_id", last_day)
        for org in orgs:
            if written >= SNAPSHOT_ROWS_PER_RUN:
                break
            written += await self._snapshot_org(org["org_id"], last_day, now,
                                                SNAPSHOT_ROWS_PER_RUN - written)
        return written

    async def _snapshot_org(self, org_id: str, last_day: date, now: datetime, budget: int
                            ) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))",
                                       f"ledger.daily_snapshots:{org_id}"):
                return 0  # another replica is writing this org's days
            # read under the lock: a replica that held it before may have written days since
            # this run listed the org
            newest = await conn.fetchrow(
                "SELECT day, posted_micros, arrears_micros FROM ledger.daily_snapshots "
                "WHERE org_id = $1 ORDER BY day DESC LIMIT 1", org_id)
            if newest is None:
                first_at = await conn.fetchval(
                    "SELECT min(created_at) FROM ledger.transfers WHERE org_id = $1", org_id)
                if first_at is None:
                    return 0
                first = first_at.astimezone(UTC).date()
                position = st.Position()
            else:
                first = newest["day"] + timedelta(days=1)
                position = st.Position(newest["posted_micros"], newest["arrears_micros"])
            last = min(last_day, first + timedelta(days=budget - 1))
            if last < first:
                return 0
            holds = {}
            day = first
            while day <= last:
                holds[day] = await held_and_state_at(conn, org_id,
                                                     st.start_of(day + timedelta(days=1)))
                day += timedelta(days=1)
            rows = _snapshot_rows(org_id, first, last, position, now,
                                  await self._days(conn, org_id, first, last), holds,
                                  await self._grants(conn, org_id, last)
                                  if last == last_day else {})
            inserted = await conn.fetchval(
                "WITH put AS (INSERT INTO ledger.daily_snapshots (org_id, day, posted_micros, "
                "held_micros, arrears_micros, billing_state, credits_bought_micros, "
                "usage_micros, net_change_micros, grants_by_expiry, written_at) "
                "SELECT * FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[], "
                "$5::bigint[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], "
                "$10::jsonb[], $11::timestamptz[]) "
                "ON CONFLICT (org_id, day) DO NOTHING RETURNING 1) SELECT count(*) FROM put",
                *(list(column) for column in zip(*rows, strict=True)))
            return int(inserted)

    @staticmethod
    async def _days(conn: Connection, org_id: str, first: date, last: date
                    ) -> dict[date, list[st.EntrySum]]:
        """Per UTC day of [first, last]: the entry sums."""
        start, end = st.start_of(first), st.start_of(last + timedelta(days=1))
        credit, arrears = _accounts(org_id)
        rows = await conn.fetch(
            "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, kind, "
            "debit_account_id = $2 AS from_credit, credit_account_id = $2 AS to_credit, "
            "debit_account_id = $3 AS from_arrears, credit_account_id = $3 AS to_arrears, "
            "count(*) AS entries, sum(amount_micros) AS amount FROM ledger.transfers "
            "WHERE org_id = $1 AND created_at >= $4 AND created_at < $5 "
            "GROUP BY 1, 2, 3, 4, 5, 6", org_id, credit, arrears, start, end)
        days: dict[date, list[st.EntrySum]] = {}
        for r in rows:
            days.setdefault(r["day"], []).extend(_entry_sums([r]))
        return days

    @staticmethod
    async def _grants(conn: Connection, org_id: str, day: date) -> dict[str, int]:
        end = st.start_of(day + timedelta(days=1))
        rows = await conn.fetch(
            "SELECT coalesce(to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 'never') "
            "AS expiry, sum(remaining_micros) AS micros FROM ledger.grants "
            "WHERE org_id = $1 AND is_open AND created_at < $2 "
            "AND (expires_at IS NULL OR expires_at > $2) GROUP BY 1", org_id, end)
        return {r["expiry"]: int(r["micros"]) for r in rows}


def _snapshot_rows(org_id: str, first: date, last: date, position: st.Position,
                   now: datetime, days: dict[date, list[st.EntrySum]],
                   holds: dict[date, tuple[int, str]], grants: dict[str, int]
                   ) -> list[tuple[Any, ...]]:
    rows = []
    day = first
    while day <= last:
        m = st.fold(days.get(day, []))
        position = st.moved(position, m)
        held, state = holds[day]
        rows.append((org_id, day, position.posted_micros, held, position.arrears_micros, state,
                     m.line(st.Category.PURCHASES).amount_micros, m.usage_total_micros,
                     m.posted_change_micros, json.dumps(grants if day == last else {}), now))
        day += timedelta(days=1)
    return rows


def _snapshot(r: Row) -> st.DailySnapshot:
    return st.DailySnapshot(
        r["org_id"], r["day"], r["posted_micros"], r["held_micros"], r["arrears_micros"],
        r["billing_state"], r["credits_bought_micros"], r["usage_micros"],
        r["net_change_micros"], r["written_at"], dict(json.loads(r["grants_by_expiry"])))
