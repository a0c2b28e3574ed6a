"""Monthly statements and daily snapshots from the ledger's entries: a month of activity with
entries straddling midnight (explicit timestamps, a clock the test sets), usage beyond credit
and its settlement, expiry, adjustment and reversal; opening + movements = closing to the
micro-credit, equal to the ledger's balances; final statements stored once and immutable;
snapshots written once per org and day, by many concurrent writers, catching up missed days."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from services.ledger import domain as d
from services.ledger import usage_work
from services.ledger.billing import statements as st
from services.ledger.billing.statement_store import StatementStore
from services.ledger.leases import ExtendLease
from services.ledger.store import LedgerStore
from tally.kit.errors import Reason, TallyError

C = 1_000_000
OPS = d.Caller(actor="user:finance")
LAST_MICRO = timedelta(microseconds=1)


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def post(store: LedgerStore, clock: Clock, when: datetime, transfer_id: str,
               kind: d.TransferKind, amount: int, **fields: object) -> None:
    clock.now = when
    await store.transfer(d.TransferCommand(transfer_id, "acme", kind, amount, **fields), OPS)


async def a_month_of_activity(store: LedgerStore, clock: Clock) -> None:
    """October's grant, then November: bonus at its first instant, usage, an adjustment,
    usage beyond credit (arrears), a grant that settles them, expiry, a reversal, usage in its
    last micro-second, and usage at December's first instant."""
    k = d.TransferKind
    await post(store, clock, at("2026-10-31T12:00:00"), "grant", k.PROMOTIONAL_GRANT, 10 * C)
    await post(store, clock, at("2026-11-01T00:00:00"), "bonus", k.BONUS, 2 * C)
    await post(store, clock, at("2026-11-05T09:00:00"), "use-1", k.USAGE, 3 * C)
    await post(store, clock, at("2026-11-10T09:00:00"), "adjust", k.MANUAL_ADJUSTMENT, -C,
               reason="goodwill correction")
    clock.now = at("2026-11-15T09:00:00")
    await usage_work.post_usage_batches(store, [d.UsageBatch("b1", [], OPS, [
        d.OrgUsageDebit("acme", 10 * C, 4, "ab" * 32)])])  # 8 from credit, 2 owed
    await post(store, clock, at("2026-11-20T09:00:00"), "grant-2", k.PROMOTIONAL_GRANT, 5 * C)
    await post(store, clock, at("2026-11-25T09:00:00"), "expire", k.EXPIRY, C // 2,
               reason="promo lapsed")
    await post(store, clock, at("2026-11-26T09:00:00"), "undo-use-1", k.REVERSAL, 0,
               reason="charged twice", reverses_transfer_id="use-1")
    await post(store, clock, at("2026-12-01T00:00:00") - LAST_MICRO, "use-late", k.USAGE, C)
    await post(store, clock, at("2026-12-01T00:00:00"), "use-dec", k.USAGE, C)


@pytest.fixture
def clock() -> Clock:
    return Clock(at("2026-10-01T00:00:00"))


@pytest.fixture
def ledger(pool: asyncpg.Pool, clock: Clock) -> LedgerStore:
    return LedgerStore(pool, clock=clock)


@pytest.fixture
def statements(pool: asyncpg.Pool, clock: Clock) -> StatementStore:
    return StatementStore(pool, clock)


def amounts(s: st.Statement) -> dict[str, int]:
    return {x.category.value: x.amount_micros for x in s.movements.lines if x.amount_micros}


async def test_a_month_statement_reconciles_to_the_micro_credit_across_midnight(
    ledger: LedgerStore, statements: StatementStore, clock: Clock,
) -> None:
    await a_month_of_activity(ledger, clock)
    clock.now = at("2026-12-01T00:20:00")
    nov = await statements.statement("acme", "2026-11")
    assert nov.is_final
    assert nov.opening == st.Position(10 * C, 0)
    assert amounts(nov) == {
        "BONUSES": 2 * C, "USAGE": -3 * C - 8 * C - C, "ADJUSTMENTS": -C, "GRANTS": 5 * C,
        "ARREARS_SETTLED": -2 * C, "EXPIRATIONS": -C // 2, "REVERSALS": 3 * C}
    assert (nov.movements.usage_arrears_micros, nov.movements.arrears_settled_micros) == (
        2 * C, 2 * C)
    assert nov.closing == st.Position(10 * C + 2 * C - 12 * C - C + 5 * C - 2 * C - C // 2
                                      + 3 * C, 0)
    assert nov.movements.usage_total_micros == 14 * C  # 12 from credit + 2 owed
    dec = await statements.statement("acme", "2026-12")
    assert not dec.is_final and dec.opening == nov.closing
    assert amounts(dec) == {"USAGE": -C}
    balance = await ledger.get_balance("acme")
    assert (balance.posted_micros, balance.arrears_micros) == (
        dec.closing.posted_micros, dec.closing.arrears_micros)


async def test_a_final_statement_is_stored_once_and_never_changes(
    ledger: LedgerStore, statements: StatementStore, clock: Clock, pool: asyncpg.Pool,
) -> None:
    await a_month_of_activity(ledger, clock)
    clock.now = at("2026-12-01T00:05:00")  # within the settle margin: provisional
    assert not (await statements.statement("acme", "2026-11")).is_final
    assert await pool.fetchval("SELECT count(*) FROM ledger.statements") == 0
    clock.now = at("2026-12-01T01:00:00")
    first = await asyncio.gather(*(statements.statement("acme", "2026-11") for _ in range(8)))
    clock.now = at("2027-02-01T00:00:00")
    again = await statements.statement("acme", "2026-11")
    assert all(x == again for x in first) and again.generated_at == at("2026-12-01T01:00:00")
    assert await pool.fetchval("SELECT count(*) FROM ledger.statements") == 1
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await pool.execute("UPDATE ledger.statements SET body = '{}'")
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await pool.execute("DELETE FROM ledger.statements")


async def test_statements_list_every_month_from_the_first_entry_newest_first(
    ledger: LedgerStore, statements: StatementStore, clock: Clock,
) -> None:
    await a_month_of_activity(ledger, clock)
    clock.now = at("2027-01-10T00:00:00")
    page, token = await statements.list_statements("acme", 2, "")
    assert [st.month_text(s.month) for s in page] == ["2027-01", "2026-12"] and token
    rest, end = await statements.list_statements("acme", 2, token)
    assert [st.month_text(s.month) for s in rest] == ["2026-11", "2026-10"] and end == ""
    for newer, older in zip([*page, *rest], [*page, *rest][1:], strict=False):
        assert newer.opening == older.closing


async def test_daily_snapshots_match_the_ledger_at_each_midnight_and_are_written_once(
    ledger: LedgerStore, statements: StatementStore, clock: Clock, pool: asyncpg.Pool,
) -> None:
    await a_month_of_activity(ledger, clock)
    clock.now = at("2026-12-02T00:20:00")  # Dec 1 is final, Dec 2 is not
    writers = [StatementStore(pool, clock) for _ in range(8)]
    written = await asyncio.gather(*(w.write_daily_snapshots() for w in writers))
    days = (at("2026-12-01T00:00:00") - at("2026-10-31T00:00:00")).days + 1
    assert sum(written) == days  # Oct 31 .. Dec 1, each once whoever wrote it
    assert await statements.write_daily_snapshots() == 0
    rows = await statements.snapshots("acme", "2026-10-01", "2026-12-31")
    assert (rows[0].day.isoformat(), rows[-1].day.isoformat()) == ("2026-10-31", "2026-12-01")
    assert len(rows) == days
    by_day = {r.day.isoformat(): r for r in rows}
    nov = await statements.statement("acme", "2026-11")
    # the usage stamped in November's last micro-second is November's, the next is December's
    assert by_day["2026-11-30"].posted_micros == nov.closing.posted_micros
    assert by_day["2026-11-30"].usage_micros == C
    assert by_day["2026-12-01"].usage_micros == C
    assert by_day["2026-12-01"].posted_micros == nov.closing.posted_micros - C
    assert by_day["2026-11-15"].arrears_micros == 2 * C
    assert by_day["2026-11-15"].billing_state == "READ_ONLY"
    assert by_day["2026-11-20"].arrears_micros == 0
    assert by_day["2026-11-16"].posted_micros == by_day["2026-11-15"].posted_micros  # no entry
    for r in rows:
        exact = await ledger_position(pool, st.start_of(r.day + timedelta(days=1)))
        assert (r.posted_micros, r.arrears_micros) == exact, r.day
    balance = await ledger.get_balance("acme")
    assert by_day["2026-12-01"].posted_micros == balance.posted_micros
    assert by_day["2026-12-01"].grants_by_expiry_micros == {"never": balance.posted_micros}
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await pool.execute("UPDATE ledger.daily_snapshots SET posted_micros = 0")


async def ledger_position(pool: asyncpg.Pool, day_end: datetime) -> tuple[int, int]:
    """The org's posted and owed after its last entry before midnight (balance-after columns,
    read independently of the statement's sums)."""
    row = await pool.fetchrow(
        "SELECT org_posted_after, org_arrears_after FROM ledger.transfers WHERE org_id = 'acme' "
        "AND created_at < $1 ORDER BY seq DESC LIMIT 1", day_end)
    return (row["org_posted_after"], row["org_arrears_after"]) if row else (0, 0)


async def test_the_snapshot_job_catches_up_the_days_it_missed(
    ledger: LedgerStore, statements: StatementStore, clock: Clock,
) -> None:
    await post(ledger, clock, at("2026-11-01T10:00:00"), "grant", d.TransferKind.BONUS, C)
    clock.now = at("2026-11-03T00:30:00")
    assert await statements.write_daily_snapshots() == 2  # Nov 1, Nov 2
    clock.now = at("2026-11-09T12:00:00")  # down for six days
    assert await statements.write_daily_snapshots() == 6  # Nov 3 .. Nov 8
    rows = await statements.snapshots("acme", "2026-11-01", "2026-11-30")
    assert [r.day.day for r in rows] == list(range(1, 9))
    assert {r.posted_micros for r in rows} == {C}
    assert [r.credits_bought_micros + r.net_change_micros for r in rows] == [C] + [0] * 7


@pytest.mark.parametrize(("month", "reason"), [
    ("2026-13", "YYYY-MM"), ("26-11", "YYYY-MM"), ("", "YYYY-MM"), ("2027-05", "not begun")])
async def test_a_bad_month_is_refused_naming_the_field(
    statements: StatementStore, clock: Clock, pool: asyncpg.Pool, month: str, reason: str,
) -> None:
    clock.now = at("2026-12-10T00:00:00")
    with pytest.raises(TallyError) as caught:
        await statements.statement("acme", month)
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, "month")
    assert reason in caught.value.message
    assert await pool.fetchval("SELECT count(*) FROM ledger.statements") == 0


@pytest.mark.parametrize(("first", "last", "field"), [
    ("2026-11-31", "2026-12-01", "from_day"), ("2026-11-01", "tomorrow", "to_day"),
    ("2026-11-02", "2026-11-01", "to_day"), ("2020-01-01", "2026-01-01", "to_day")])
async def test_a_bad_snapshot_range_is_refused_naming_the_field(
    statements: StatementStore, first: str, last: str, field: str,
) -> None:
    with pytest.raises(TallyError) as caught:
        await statements.snapshots("acme", first, last)
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, field)


async def test_a_generated_month_of_activity_matches_the_ledger_every_midnight(
    ledger: LedgerStore, statements: StatementStore, clock: Clock, pool: asyncpg.Pool,
) -> None:
    """300 random operations over October to December (seeded): grants, bonuses, usage that
    may run past the credit into arrears, expiries, adjustments both ways, reversals; every
    snapshot and every monthly statement equals the ledger's own balance-after columns."""
    rng = random.Random(20261207)
    k = d.TransferKind
    when = at("2026-10-03T00:00:00")
    posted: list[tuple[str, int]] = []  # grants that may be reversed
    await post(ledger, clock, at("2026-10-02T12:00:00"), "seed", k.PROMOTIONAL_GRANT, 10 * C)
    for n in range(300):
        when += timedelta(seconds=rng.randrange(1, 9 * 3600), microseconds=rng.randrange(10**6))
        clock.now = when
        choice = rng.random()
        balance = await ledger.get_balance("acme")
        amount = rng.randrange(1, 5 * C)
        if choice < 0.25:
            await post(ledger, clock, when, f"g{n}", rng.choice([k.PROMOTIONAL_GRANT, k.BONUS]),
                       amount)
        elif choice < 0.65:
            await usage_work.post_usage_batches(ledger, [d.UsageBatch(f"b{n}", [], OPS, [
                d.OrgUsageDebit("acme", amount, 1, "ab" * 32)])])
        elif choice < 0.75 and balance.available_micros > 0:
            await post(ledger, clock, when, f"e{n}", k.EXPIRY,
                       min(amount, balance.available_micros), reason="lapsed")
        elif choice < 0.85:
            signed = amount if rng.random() < 0.5 or balance.available_micros < amount else -amount
            await post(ledger, clock, when, f"a{n}", k.MANUAL_ADJUSTMENT, signed,
                       reason="correction")
        elif posted and balance.available_micros >= posted[-1][1]:
            target, _ = posted.pop()
            with contextlib.suppress(TallyError):  # its grant was partly spent: refused
                await post(ledger, clock, when, f"r{n}", k.REVERSAL, 0, reason="undo",
                           reverses_transfer_id=target)
            continue
        else:
            continue
        if choice < 0.25:
            posted.append((f"g{n}", amount))
    clock.now = when + timedelta(days=2)
    assert await statements.write_daily_snapshots() > 45
    rows = await statements.snapshots("acme", "2026-10-01", "2027-01-31")
    kinds = {r["kind"] for r in await pool.fetch("SELECT DISTINCT kind FROM ledger.transfers")}
    assert kinds == {x.value for x in k} - {"PURCHASE", "REFUND"}
    assert any(r.arrears_micros for r in rows) and any(not r.arrears_micros for r in rows)
    for r in rows:
        assert (r.posted_micros, r.arrears_micros) == await ledger_position(
            pool, st.start_of(r.day + timedelta(days=1))), r.day
    month = date(2026, 10, 1)
    while st.start_of(month) <= when:
        s = await statements.statement("acme", st.month_text(month))
        assert (s.opening.posted_micros, s.opening.arrears_micros) == await ledger_position(
            pool, s.period_start)
        assert (s.closing.posted_micros, s.closing.arrears_micros) == await ledger_position(
            pool, s.period_end)
        month = st.next_month(month)


async def test_a_month_before_an_orgs_first_entry_is_all_zero_and_not_stored(
    statements: StatementStore, clock: Clock, pool: asyncpg.Pool,
) -> None:
    clock.now = at("2026-12-10T00:00:00")
    s = await statements.statement("nobody", "2026-01")
    assert s.is_final and s.closing == s.opening == st.Position()
    assert {x.amount_micros for x in s.movements.lines} == {0}
    assert await pool.fetchval("SELECT count(*) FROM ledger.statements") == 0


async def test_a_snapshot_holds_what_was_held_and_the_state_at_its_midnight(
    ledger: LedgerStore, statements: StatementStore, clock: Clock,
) -> None:
    """Holds and billing states change without entries: a day's snapshot shows the holds
    open and the state in force at its midnight, not those recorded with its last entry."""
    await post(ledger, clock, at("2026-11-10T09:00:00"), "grant", d.TransferKind.BONUS, 10 * C)
    clock.now = at("2026-11-10T22:00:00")
    await ledger.reserve("r1", "acme", 2 * C, timedelta(hours=1), OPS)
    clock.now = at("2026-11-10T23:00:00")
    await ledger.leases.extend(ExtendLease("l-1", "lease-1", "acme", "metering", 3 * C, 0,
                                           timedelta(hours=4), 0, OPS))
    clock.now = at("2026-11-10T23:59:59.999999")
    await ledger.set_billing_state("s-1", "acme", d.BillingState.THROTTLED, "overdue", OPS)
    # after midnight: everything undone before the day's first entry
    clock.now = at("2026-11-11T00:00:00")
    await ledger.release("r1", "acme", OPS)
    clock.now = at("2026-11-11T01:00:00")
    await ledger.leases.extend(ExtendLease("l-2", "lease-1", "acme", "metering", 0, 3 * C,
                                           timedelta(hours=4), 0, OPS))
    clock.now = at("2026-11-11T02:00:00")
    await ledger.set_billing_state("s-2", "acme", d.BillingState.ACTIVE, "paid", OPS)
    await post(ledger, clock, at("2026-11-11T03:00:00"), "use", d.TransferKind.USAGE, C)
    clock.now = at("2026-11-12T10:00:00")  # a day without entries, a hold left open
    await ledger.reserve("r2", "acme", C, timedelta(hours=1), OPS)
    clock.now = at("2026-11-13T00:30:00")
    assert await statements.write_daily_snapshots() == 3
    rows = await statements.snapshots("acme", "2026-11-10", "2026-11-12")
    assert [(r.day.day, r.posted_micros, r.held_micros, r.billing_state) for r in rows] == [
        (10, 10 * C, 5 * C, "THROTTLED"),
        (11, 9 * C, 0, "ACTIVE"),
        (12, 9 * C, C, "ACTIVE")]
    assert [r.available_micros for r in rows] == [5 * C, 9 * C, 8 * C]
