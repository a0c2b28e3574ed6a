"""UsageEventStore: usage events, their roll-ups and the pending-ledger-batch outbox in Postgres.

One `record` transaction per group commit: lock the orgs (advisory, sorted: replicas rating
the same org take turns, so carries and period usage are read and written consistently), find
events already recorded (dedup forever, by primary key), rate the new ones with the persisted
carry and month-to-date usage, insert them, upsert the roll-ups and the carries, and write the
ledger batch that will carry their debit — all or nothing. `mark_posted` fills the receipts once
the ledger confirms; `pending_batches` lists batches a crash left unposted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from services.metering import ingestion as ing
from services.metering.spend.store import Charge, charge_budgets
from tally.kit.errors import Reason
from tally.rating import Meter, PriceBookHistory, RatingError, UsageMode

if TYPE_CHECKING:
    Row = asyncpg.Record | Mapping[str, Any]

_EVENT_COLUMNS = (
    "org_id", "event_id", "occurred_at", "project_id", "environment", "user_id", "api_key_id",
    "labels", "provider", "model", "resolved_model", "operation", "mode", "region",
    "quantities", "reservation_id", "evidence", "request_hash", "cost_micros", "lines",
    "price_book_version", "ledger_batch_id",
)


@dataclass(frozen=True, slots=True)
class LedgerItem:
    """One debit to post: what metering asks the ledger to charge for an event."""

    event_id: str
    org_id: str
    cost_micros: int
    reservation_id: str
    lease_id: str = ""  # issue 17: the org's credit lease that pays it first (ledger side)


@dataclass(frozen=True, slots=True)
class LedgerOutcome:
    """What the ledger answered for one item."""

    org_id: str
    event_id: str
    transfer_id: str
    balance_after_micros: int
    arrears_micros: int


@dataclass(slots=True)
class Recorded:
    """Result of one `record`: a result (or None for new events) per input, and the batch."""

    results: list[ing.EventResult | None]
    new_events: list[ing.RatedEvent]
    ledger_items: list[LedgerItem]
    # Ledger batches of DUPLICATE originals whose debit is not confirmed yet (another commit,
    # or another replica, has them in flight): their receipts are incomplete until posted.
    unposted: set[str] = field(default_factory=set)


_ALL_MODELS = "*"  # period-usage key of lines that price a meter for every model


def _month(ts: datetime) -> date:
    return ts.astimezone(UTC).date().replace(day=1)


def receipt_from_row(r: Row) -> ing.Receipt:
    """The receipt stored with an event."""
    lines = tuple(ing.ReceiptLine(Meter(m), q, rate, per, cost)
                  for m, q, rate, per, cost in json.loads(r["lines"]))
    return ing.Receipt(
        r["event_id"], r["cost_micros"], r["price_book_version"], r["resolved_model"], lines,
        r["ledger_transfer_id"] or "", r["balance_after_micros"] or 0, r["arrears_micros"] or 0,
        r["recorded_at"])


def event_from_row(r: Row) -> ing.UsageEvent:
    """The event as it was reported."""
    evidence = json.loads(r["evidence"])
    return ing.UsageEvent(
        event_id=r["event_id"], org_id=r["org_id"], occurred_at=r["occurred_at"],
        quantities=tuple((Meter(m), q) for m, q in json.loads(r["quantities"])),
        model=r["model"], provider=r["provider"], operation=r["operation"],
        mode=UsageMode(r["mode"]), region=r["region"], reservation_id=r["reservation_id"],
        project_id=r["project_id"], environment=r["environment"], user_id=r["user_id"],
        api_key_id=r["api_key_id"], labels=json.loads(r["labels"]),
        evidence=ing.Evidence(evidence.get("request_id", ""),
                              evidence.get("upstream_request_id", ""),
                              evidence.get("trace_id", ""),
                              tuple(evidence.get("content_hashes", ()))))


class UsageEventStore:
    """Postgres persistence of ingestion."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(self, batch_id: str, events: Sequence[ing.UsageEvent],
                     history: PriceBookHistory) -> Recorded:
        """Records the events that are new (each (org, event id) once in `events`)."""
        async with self.pool.acquire() as conn, conn.transaction():
            orgs = sorted({e.org_id for e in events})
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('metering:' || o, 0)) "
                "FROM unnest($1::text[]) AS o ORDER BY o", orgs)
            existing = await self._rows_of(conn, [(e.org_id, e.event_id) for e in events])
            carries: dict[str, int] = {r["org_id"]: int(r["carry_attos"]) for r in await conn.fetch(
                "SELECT org_id, carry_attos FROM metering.rating_carry "
                "WHERE org_id = ANY($1::text[])", orgs)}
            periods = await self._period_usage(conn, events)
            before = dict(periods)
            results: list[ing.EventResult | None] = []
            rated: list[ing.RatedEvent] = []
            unposted: set[str] = set()
            for event in events:
                prior_row = existing.get((event.org_id, event.event_id))
                if prior_row is not None:
                    results.append(self._duplicate(event, prior_row))
                    if prior_row["recorded_at"] is None:
                        unposted.add(prior_row["ledger_batch_id"])
                    continue
                outcome, carry = self._rate(history, event, carries.get(event.org_id, 0),
                                            periods)
                if isinstance(outcome, ing.EventResult):
                    results.append(outcome)
                    continue
                carries[event.org_id] = carry
                rated.append(outcome)
                results.append(None)
            lease_of: dict[str, str] = {}
            charged: set[str] = set()
            if rated:
                await self._insert(conn, batch_id, rated)
                await self._roll_up(conn, rated)
                # issue 17: the orgs' credit leases (their ledger items name them)
                lease_of = await charge_budgets(conn, [
                    Charge(r.event.org_id, r.event.project_id, r.event.labels,
                           r.event.occurred_at, r.receipt.cost_micros, r.event.reservation_id)
                    for r in rated if r.event.occurred_at is not None], datetime.now(UTC))
                await conn.execute(
                    "INSERT INTO metering.rating_carry (org_id, carry_attos) "
                    "SELECT * FROM unnest($1::text[], $2::numeric[]) "
                    "ON CONFLICT (org_id) DO UPDATE SET carry_attos = EXCLUDED.carry_attos",
                    list(carries), [carries[o] for o in carries])
                moved = [k for k, v in periods.items() if before.get(k) != v]
                await conn.execute(
                    "INSERT INTO metering.period_usage (org_id, month, model, meter, quantity) "
                    "SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], "
                    "$5::bigint[]) ON CONFLICT (org_id, month, model, meter) "
                    "DO UPDATE SET quantity = EXCLUDED.quantity",
                    *[[k[i] for k in moved] for i in range(4)], [periods[k] for k in moved])
                charged = {r.event.event_id for r in rated if r.event.occurred_at is not None}
            items = [LedgerItem(r.event.event_id, r.event.org_id, r.receipt.cost_micros,
                                r.event.reservation_id,
                                lease_of.get(r.event.org_id, "")
                                if r.event.event_id in charged else "") for r in rated]
            if items:
                await conn.execute(
                    "INSERT INTO metering.ledger_batches (batch_id, items) VALUES ($1, $2)",
                    batch_id, json.dumps([[i.event_id, i.org_id, i.cost_micros, i.reservation_id,
                                           i.lease_id] for i in items]))
            return Recorded(results, rated, items, unposted)

    @staticmethod
    def _duplicate(event: ing.UsageEvent, row: Row) -> ing.EventResult:
        if row["request_hash"] != event.fingerprint():
            return ing.rejected(event.event_id, Reason.IDEMPOTENCY_KEY_REUSED, "event_id",
                                "was already recorded with a different payload")
        return ing.EventResult(event.event_id, ing.EventStatus.DUPLICATE, receipt_from_row(row))

    @staticmethod
    def _rate(history: PriceBookHistory, event: ing.UsageEvent, carry: int,
              periods: dict[tuple[str, date, str, str], int]
              ) -> tuple[ing.RatedEvent | ing.EventResult, int]:
        # Month-to-date usage of each line this event touches: allowances and tiers count
        # per calendar month (UTC) of the event.
        assert event.occurred_at is not None
        month = _month(event.occurred_at)
        prior: dict[str, int] = {}
        try:
            book = history.book_at(event.occurred_at)
            model = book.resolve_model(event.model).model if event.model else ""
        except RatingError:
            book, model = None, ""
        if book is not None:
            for meter, _ in event.quantities:
                if meter is None:
                    continue
                line = book.find_line(model, meter, event.mode)
                if line is not None:
                    prior[line.line_id] = periods.get(
                        (event.org_id, month, model if line.model else _ALL_MODELS,
                         meter.value), 0)
        outcome, new_carry = ing.rate_event(history, event, carry, prior)
        if isinstance(outcome, ing.RatedEvent):
            for meter, quantity in event.quantities:
                if meter is None:
                    continue
                resolved = outcome.receipt.resolved_model
                for key_model in (resolved, _ALL_MODELS):
                    key = (event.org_id, month, key_model, meter.value)
                    periods[key] = periods.get(key, 0) + quantity
        return outcome, new_carry

    @staticmethod
    async def _rows_of(conn: Any, keys: Sequence[tuple[str, str]]
                       ) -> dict[tuple[str, str], Row]:
        """Recorded events of (org, event id) pairs: one primary-key probe per pair (LIMIT
        keeps the planner from turning the lateral subquery into a hash join over the table)."""
        return {(r["org_id"], r["event_id"]): r for r in await conn.fetch(
            "SELECT e.* FROM unnest($1::text[], $2::text[]) AS k(org_id, event_id), "
            "LATERAL (SELECT * FROM metering.usage_events e WHERE e.org_id = k.org_id "
            "AND e.event_id = k.event_id LIMIT 1) AS e",
            [k[0] for k in keys], [k[1] for k in keys])}

    @staticmethod
    async def _period_usage(conn: Any, events: Sequence[ing.UsageEvent]
                            ) -> dict[tuple[str, date, str, str], int]:
        """(org, month, model or _ALL_MODELS, meter) -> quantity so far this month."""
        wanted = sorted({(e.org_id, _month(e.occurred_at)) for e in events if e.occurred_at})
        if not wanted:
            return {}
        rows = await conn.fetch(
            "SELECT p.* FROM unnest($1::text[], $2::date[]) AS k(org_id, month), "
            "LATERAL (SELECT * FROM metering.period_usage p WHERE p.org_id = k.org_id "
            "AND p.month = k.month OFFSET 0) AS p",
            [o for o, _ in wanted], [m for _, m in wanted])
        return {(r["org_id"], r["month"], r["model"], r["meter"]): int(r["quantity"])
                for r in rows}

    @staticmethod
    async def _insert(conn: Any, batch_id: str, rated: Sequence[ing.RatedEvent]) -> None:
        records = []
        for item in rated:
            e, receipt = item.event, item.receipt
            assert e.occurred_at is not None
            records.append((
                e.org_id, e.event_id, e.occurred_at, e.project_id, e.environment, e.user_id,
                e.api_key_id, json.dumps(dict(e.labels)), e.provider, e.model,
                receipt.resolved_model, e.operation, e.mode.value, e.region,
                json.dumps([[m.value, q] for m, q in e.quantities if m is not None]),
                e.reservation_id,
                json.dumps({"request_id": e.evidence.request_id,
                            "upstream_request_id": e.evidence.upstream_request_id,
                            "trace_id": e.evidence.trace_id,
                            "content_hashes": list(e.evidence.content_hashes)}),
                item.fingerprint, receipt.cost_micros,
                json.dumps([[ln.meter.value, ln.quantity, ln.rate, ln.per_units, ln.cost_micros]
                            for ln in receipt.lines]),
                receipt.price_book_version, batch_id,
            ))
        await conn.copy_records_to_table("usage_events", schema_name="metering",
                                         columns=_EVENT_COLUMNS, records=records)

    @staticmethod
    async def _roll_up(conn: Any, rated: Sequence[ing.RatedEvent]) -> None:
        """Adds the events to the hourly, daily, daily-event and daily-label roll-ups."""
        hourly: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
        daily: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
        daily_events: dict[tuple[Any, ...], int] = defaultdict(int)
        labels: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
        for item in rated:
            e, receipt = item.event, item.receipt
            assert e.occurred_at is not None
            at = e.occurred_at.astimezone(UTC)
            hour = at.replace(minute=0, second=0, microsecond=0)
            dims = (e.project_id, e.environment, e.user_id, receipt.resolved_model, e.operation)
            daily_events[(e.org_id, at.date(), *dims)] += 1
            cost_of = {ln.meter: ln.cost_micros for ln in receipt.lines}
            for meter, quantity in e.quantities:
                if meter is None:
                    continue
                credits = cost_of.get(meter, 0)
                for sums_by_key, key in ((hourly, (e.org_id, hour, *dims, meter.value)),
                                         (daily, (e.org_id, at.date(), *dims, meter.value))):
                    sums_by_key[key][0] += quantity
                    sums_by_key[key][1] += credits
                    sums_by_key[key][2] += 1
                for label_key, label_value in e.labels.items():
                    sums = labels[(e.org_id, at.date(), label_key, label_value,
                                   receipt.resolved_model, meter.value)]
                    sums[0] += quantity
                    sums[1] += credits
                    sums[2] += 1
        dim_cols = "project_id, environment, user_id, model, operation"
        for table, time_col, rows in (("usage_hourly", "hour", hourly),
                                      ("usage_daily", "day", daily)):
            keys = list(rows)
            await conn.execute(
                f"INSERT INTO metering.{table} (org_id, {time_col}, {dim_cols}, meter, quantity, "
                "credits_micros, event_count) SELECT * FROM unnest($1::text[], "
                f"$2::{'timestamptz' if time_col == 'hour' else 'date'}[], $3::text[], "
                "$4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[], "
                "$10::bigint[], $11::bigint[]) "
                f"ON CONFLICT (org_id, {time_col}, {dim_cols}, meter) DO UPDATE SET "
                f"quantity = {table}.quantity + EXCLUDED.quantity, "
                f"credits_micros = {table}.credits_micros + EXCLUDED.credits_micros, "
                f"event_count = {table}.event_count + EXCLUDED.event_count",
                *[[k[i] for k in keys] for i in range(8)],
                [rows[k][0] for k in keys], [rows[k][1] for k in keys],
                [rows[k][2] for k in keys])
        keys = list(daily_events)
        await conn.execute(
            f"INSERT INTO metering.usage_daily_events (org_id, day, {dim_cols}, event_count) "
            "SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::text[], "
            "$6::text[], $7::text[], $8::bigint[]) "
            f"ON CONFLICT (org_id, day, {dim_cols}) DO UPDATE SET "
            "event_count = usage_daily_events.event_count + EXCLUDED.event_count",
            *[[k[i] for k in keys] for i in range(7)], [daily_events[k] for k in keys])
        if labels:
            keys = list(labels)
            await conn.execute(
                "INSERT INTO metering.usage_daily_labels (org_id, day, label_key, label_value, "
                "model, meter, quantity, credits_micros, event_count) SELECT * FROM unnest("
                "$1::text[], $2::date[], $3::text[], $4::text[], $5::text[], $6::text[], "
                "$7::bigint[], $8::bigint[], $9::bigint[]) ON CONFLICT (org_id, day, label_key, "
                "label_value, model, meter) DO UPDATE SET "
                "quantity = usage_daily_labels.quantity + EXCLUDED.quantity, "
                "credits_micros = usage_daily_labels.credits_micros + EXCLUDED.credits_micros, "
                "event_count = usage_daily_labels.event_count + EXCLUDED.event_count",
                *[[k[i] for k in keys] for i in range(6)], [labels[k][0] for k in keys],
                [labels[k][1] for k in keys], [labels[k][2] for k in keys])

    async def mark_posted(self, batch_id: str, outcomes: Sequence[LedgerOutcome],
                          now: datetime) -> None:
        """Fills the receipts from the ledger's answer and closes the batch."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE metering.usage_events e SET ledger_transfer_id = u.transfer_id, "
                "balance_after_micros = u.balance, arrears_micros = u.arrears, recorded_at = $6 "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) "
                "AS u(org_id, event_id, transfer_id, balance, arrears) "
                "WHERE e.org_id = u.org_id AND e.event_id = u.event_id",
                [o.org_id for o in outcomes], [o.event_id for o in outcomes],
                [o.transfer_id for o in outcomes], [o.balance_after_micros for o in outcomes],
                [o.arrears_micros for o in outcomes], now)
            await conn.execute("UPDATE metering.ledger_batches SET posted_at = $2 "
                               "WHERE batch_id = $1", batch_id, now)

    async def batch_items(self, batch_id: str) -> list[LedgerItem]:
        """The debits a recorded ledger batch carries."""
        items = await self.pool.fetchval(
            "SELECT items FROM metering.ledger_batches WHERE batch_id = $1", batch_id)
        return [LedgerItem(*item) for item in json.loads(items)]

    async def receipts(self, keys: Sequence[tuple[str, str]]
                       ) -> dict[tuple[str, str], ing.Receipt]:
        """Stored receipts of (org, event id) pairs."""
        async with self.pool.acquire() as conn:
            rows = await self._rows_of(conn, keys)
        return {key: receipt_from_row(r) for key, r in rows.items()}

    async def pending_batches(self) -> list[tuple[str, list[LedgerItem]]]:
        """Batches whose events are durable but whose ledger debit was never confirmed."""
        rows = await self.pool.fetch("SELECT batch_id, items FROM metering.ledger_batches "
                                     "WHERE posted_at IS NULL ORDER BY created_at")
        return [(r["batch_id"], [LedgerItem(*item) for item in json.loads(r["items"])])
                for r in rows]

    async def event(self, org_id: str, event_id: str
                    ) -> tuple[ing.UsageEvent, ing.Receipt] | None:
        """One recorded event with its receipt."""
        row = await self.pool.fetchrow(
            "SELECT * FROM metering.usage_events WHERE org_id = $1 AND event_id = $2",
            org_id, event_id)
        return None if row is None else (event_from_row(row), receipt_from_row(row))

    async def export(self, org_id: str, start: datetime | None, end: datetime | None,
                     after: tuple[datetime, str, str] | None, limit: int
                     ) -> list[tuple[ing.UsageEvent, ing.Receipt]]:
        """Recorded events of an org ("" = every org) in [start, end), in (occurred_at, org,
        event id) order."""
        rows = await self.pool.fetch(
            "SELECT * FROM metering.usage_events WHERE ($1 = '' OR org_id = $1) "
            "AND ($2::timestamptz IS NULL OR occurred_at >= $2) "
            "AND ($3::timestamptz IS NULL OR occurred_at < $3) "
            "AND ($4::timestamptz IS NULL OR (occurred_at, org_id, event_id) > ($4, $5, $6)) "
            "ORDER BY occurred_at, org_id, event_id LIMIT $7",
            org_id, start, end, after[0] if after else None, after[1] if after else "",
            after[2] if after else "", limit)
        return [(event_from_row(r), receipt_from_row(r)) for r in rows]


def with_ledger(receipt: ing.Receipt, outcome: LedgerOutcome, now: datetime) -> ing.Receipt:
    """A receipt completed with what the ledger answered."""
    return replace(receipt, ledger_transfer_id=outcome.transfer_id,
                   balance_after_micros=outcome.balance_after_micros,
                   arrears_micros=outcome.arrears_micros, recorded_at=now)
