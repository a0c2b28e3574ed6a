"""UsageEventStore: usage events, their roll-ups and the pending-ledger-batch outbox in Postgres.

One `record` transaction per group commit: lock the orgs (advisory, sorted: replicas rating
the same org take turns, so carries and period usage are read and written consistently), find
events already recorded (dedup forever, by primary key), rate the new ones with the persisted
carry and month-to-date usage, insert them, upsert the carries, and write the
ledger batch that will carry their debit (one debit per org) — all or nothing. `mark_posted`
stores the ledger's per-org answer on the batch row (each event's receipt is derived from it and
the event's place in its org's debit, so no event row is updated); `pending_batches` lists
batches a crash left unposted. The roll-ups follow committed batches off this path
(services.metering.rollup).

Month-to-date usage (`period_usage`) is kept only where a price depends on it: a key gets a row
when a line with an allowance or tiers first needs it (counted from the recorded events, under
the org's lock) and every row is kept exact from then on. Flat prices need none, so a batch
priced flat writes no usage rows at all — one row per (org, month, model, meter) rewritten per
commit was the largest statement of the ack path.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from services.metering.ingestion import domain as ing
from services.metering.spend.store import Charge, charge_budgets
from tally.kit.errors import Reason
from tally.rating import Meter, PriceBookHistory, RatingError, UsageMode

if TYPE_CHECKING:
    Row = asyncpg.Record | Mapping[str, Any]

_EVENT_COLUMNS = (
    "org_id", "event_id", "occurred_at", "project_id", "environment", "user_id", "api_key_id",
    "labels", "provider", "model", "resolved_model", "operation", "mode", "region",
    "quantities", "reservation_id", "evidence", "request_hash", "cost_micros",
    "price_book_version", "ledger_batch_id", "batch_cost_before_micros", "meters",
    "meter_quantities", "meter_costs", "line_rates", "line_per_units",
)


@dataclass(slots=True)
class Recorded:
    """Result of one `record`: a result (or None for new events) per input, and the batch."""

    results: list[ing.EventResult | None]
    new_events: list[ing.RatedEvent]
    debits: list[ing.OrgDebit]
    cost_before: list[int]  # per new event: its org's cost before it in the batch
    # Ledger batches of DUPLICATE originals whose debit is not confirmed yet (another commit,
    # or another replica, has them in flight): their receipts are incomplete until posted.
    unposted: set[str] = field(default_factory=set)


# batch id -> (when the ledger confirmed it, org -> its outcome); None if not yet
Outcomes = dict[str, tuple[datetime, dict[str, ing.OrgOutcome]] | None]


def _debits_json(debits: Sequence[ing.OrgDebit]) -> str:
    return json.dumps([[o.org_id, o.amount_micros, o.event_count, o.events_digest,
                        [[c.reservation_id, c.cost_micros, c.cost_before_micros]
                         for c in o.captures], o.lease_id] for o in debits])


def _debits_of(text: str) -> list[ing.OrgDebit]:
    return [ing.OrgDebit(org, amount, count, digest,
                         tuple(ing.Capture(*c) for c in captures), lease[0] if lease else "")
            for org, amount, count, digest, captures, *lease in json.loads(text)]


_ALL_MODELS = ing.ALL_MODELS
_LOOK_UP_AFTER_DUPLICATE_S = 10.0
PeriodKey = tuple[str, date, str, str]
"""Month-to-date usage key: (org, month, model or _ALL_MODELS, meter)."""


def _month(ts: datetime) -> date:
    return ts.astimezone(UTC).date().replace(day=1)


def receipt_from_row(r: Row, outcomes: Outcomes) -> ing.Receipt:
    """The receipt of a recorded event: its price, and its share of its org's debit in its
    batch once the ledger confirmed it (`outcomes` holds its batch's; rows recorded before
    debits were per org carry their receipt columns)."""
    meters = r["meters"]
    lines = tuple(
        ing.ReceiptLine(Meter(m), q, rate, per, cost)
        for m, q, rate, per, cost in (
            json.loads(r["lines"]) if meters is None else zip(
                meters, r["meter_quantities"], r["line_rates"], r["line_per_units"],
                r["meter_costs"], strict=True)))
    receipt = ing.Receipt(
        r["event_id"], r["cost_micros"], r["price_book_version"], r["resolved_model"], lines,
        r["ledger_transfer_id"] or "", r["balance_after_micros"] or 0, r["arrears_micros"] or 0,
        r["recorded_at"])
    cost_before = r["batch_cost_before_micros"]
    if cost_before is None:
        return receipt
    posted = outcomes.get(r["ledger_batch_id"])
    if posted is None:
        return receipt
    posted_at, by_org = posted
    return ing.settled(receipt, by_org[r["org_id"]], cost_before, posted_at)


def _is_posted(r: Row, outcomes: Outcomes) -> bool:
    if r["batch_cost_before_micros"] is None:
        return r["recorded_at"] is not None
    return outcomes.get(r["ledger_batch_id"]) is not None


async def _outcomes(conn: Any, rows: Iterable[Row]) -> Outcomes:
    """The ledger's answers for the batches of `rows` (one read per batch, not per row)."""
    batches = sorted({r["ledger_batch_id"] for r in rows
                      if r["batch_cost_before_micros"] is not None})
    found: Outcomes = dict.fromkeys(batches)
    if batches:
        for b in await conn.fetch(
                "SELECT batch_id, posted_at, org_results FROM metering.ledger_batches "
                "WHERE batch_id = ANY($1::text[]) AND posted_at IS NOT NULL", batches):
            found[b["batch_id"]] = (b["posted_at"], {
                org: ing.OrgOutcome(org, *result)
                for org, result in json.loads(b["org_results"]).items()})
    return found


def event_from_row(r: Row) -> ing.UsageEvent:
    """The event as it was reported."""
    evidence = json.loads(r["evidence"])
    return ing.UsageEvent(
        event_id=r["event_id"], org_id=r["org_id"], occurred_at=r["occurred_at"],
        quantities=tuple((Meter(m), q) for m, q in (
            zip(r["meters"], r["meter_quantities"], strict=True) if r["quantities"] is None
            else json.loads(r["quantities"]))),
        model=r["model"], provider=r["provider"], operation=r["operation"],
        mode=UsageMode(r["mode"]), region=r["region"], reservation_id=r["reservation_id"],
        project_id=r["project_id"], environment=r["environment"], user_id=r["user_id"],
        api_key_id=r["api_key_id"], labels=json.loads(r["labels"]),
        evidence=ing.Evidence(evidence.get("request_id", ""),
                              evidence.get("upstream_request_id", ""),
                              evidence.get("trace_id", ""),
                              tuple(evidence.get("content_hashes", ()))))


# -- binary COPY of event rows -------------------------------------------------------------
# The rows are encoded here, not by asyncpg's copy_records_to_table: its array encoder checks
# every array and element against collections.abc (about 30 isinstance calls an event, most of
# the COPY's Python cost). An event's meters, rates and per-units repeat across a batch (a
# few models, a few meters), so their encoded arrays are remembered; the rest is struct packing.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER: Final = struct.pack("!h", -1)
_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
_TEXT_OID, _INT8_OID = 25, 20
_pack_i, _pack_q, _pack_iq = struct.Struct("!i").pack, struct.Struct("!q").pack, \
    struct.Struct("!iq").pack
_EMPTY_JSON: Final = _pack_i(3) + b"\x01{}"
_INT8_FIELD: Final = _pack_i(8)


def _text(value: str) -> bytes:
    data = value.encode()
    return _pack_i(len(data)) + data


def _jsonb(text: str) -> bytes:
    data = text.encode()
    return _pack_i(len(data) + 1) + b"\x01" + data


def _int8(value: int) -> bytes:
    return _pack_iq(8, value)


def _timestamptz(at: datetime) -> bytes:
    delta = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _UNIX_EPOCH
    return _pack_iq(8, (delta.days * 86_400 + delta.seconds) * 1_000_000
                    + delta.microseconds - _PG_EPOCH_US)


_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _array_header(oid: int, count: int, size: int) -> bytes:
    # field length, then: 1 dimension, no NULLs, element type, its length, lower bound 1
    return struct.pack("!iiiiii", 20 + size, 1, 0, oid, count, 1)


def _int8_array(values: Sequence[int]) -> bytes:
    if not values:
        return struct.pack("!iiii", 12, 0, 0, _INT8_OID)
    body = b"".join([_pack_iq(8, v) for v in values])
    return _array_header(_INT8_OID, len(values), len(body)) + body


def _text_array(values: Sequence[str]) -> bytes:
    if not values:
        return struct.pack("!iiii", 12, 0, 0, _TEXT_OID)
    body = b"".join([_text(v) for v in values])
    return _array_header(_TEXT_OID, len(values), len(body)) + body


_ROW_START: Final = struct.pack("!h", len(_EVENT_COLUMNS))
_NULL: Final = _pack_i(-1)
# (meters, rates, per units) -> their encoded arrays
_encoded_lines: dict[tuple[Any, ...], tuple[bytes, bytes, bytes]] = {}


def _line_arrays(lines: Sequence[ing.ReceiptLine]) -> tuple[bytes, bytes, bytes]:
    """The encoded meters, line_rates and line_per_units of an event's receipt lines."""
    key = tuple([(ln.meter, ln.rate, ln.per_units) for ln in lines])
    found = _encoded_lines.get(key)
    if found is None:
        if len(_encoded_lines) > 10_000:  # books come and go; keep it bounded
            _encoded_lines.clear()
        found = _encoded_lines[key] = (
            _text_array([ln.meter.value for ln in lines]),
            _text_array([ln.rate for ln in lines]),
            _int8_array([ln.per_units for ln in lines]))
    return found


def _copy_rows(batch_id: str, rated: Sequence[ing.RatedEvent], cost_before: Sequence[int]
               ) -> bytes:
    """The binary COPY of the events' rows, in _EVENT_COLUMNS order."""
    parts = [_COPY_HEADER]
    append = parts.append
    batch, no_evidence, empty = _text(batch_id), ing.Evidence(), _text("")
    texts: dict[str, bytes] = {"": empty}  # org ids, models, modes... repeat within a batch
    def cached(value: str) -> bytes:
        found = texts.get(value)
        if found is None:
            found = texts[value] = _text(value)
        return found

    for item, before in zip(rated, cost_before, strict=True):
        e, receipt = item.event, item.receipt
        assert e.occurred_at is not None
        lines = receipt.lines
        # the reported order, when it is not the receipt's (rating's meter order)
        quantities = (None if len(lines) == len(e.quantities) and all(
            m is ln.meter for (m, _), ln in zip(e.quantities, lines, strict=True))
            else json.dumps([[m.value, q] for m, q in e.quantities if m is not None]))
        evidence = e.evidence
        meters, rates, per_units = _line_arrays(lines)
        append(b"".join((
            _ROW_START, cached(e.org_id), _text(e.event_id), _timestamptz(e.occurred_at),
            cached(e.project_id), cached(e.environment), cached(e.user_id),
            cached(e.api_key_id),
            _jsonb(json.dumps(dict(e.labels))) if e.labels else _EMPTY_JSON,
            cached(e.provider), cached(e.model), cached(receipt.resolved_model),
            cached(e.operation), cached(e.mode.value), cached(e.region),
            _NULL if quantities is None else _jsonb(quantities), cached(e.reservation_id),
            _EMPTY_JSON if evidence == no_evidence else _jsonb(json.dumps({
                "request_id": evidence.request_id,
                "upstream_request_id": evidence.upstream_request_id,
                "trace_id": evidence.trace_id,
                "content_hashes": list(evidence.content_hashes)})),
            empty, _int8(receipt.cost_micros), _int8(receipt.price_book_version), batch,
            _int8(before), meters, _int8_array([ln.quantity for ln in lines]),
            _int8_array([ln.cost_micros for ln in lines]), rates, per_units)))
    append(_COPY_TRAILER)
    return b"".join(parts)


class UsageEventStore:
    """Postgres persistence of ingestion."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._look_up_until = 0.0

    async def record(self, batch_id: str, events: Sequence[ing.UsageEvent],
                     history: PriceBookHistory) -> Recorded:
        """Records the events that are new (each (org, event id) once in `events`).

        A commit first assumes every event is new and lets the insert find a duplicate (the
        primary key refuses it, and the transaction rolls back whole); only then is the batch
        recorded again looking each event up first. So the common case pays no lookup, a
        replay pays one more attempt, and the commits that follow a replay look up first for
        a while (replays come in runs: a client resending what it did not see acknowledged).
        """
        if time.monotonic() >= self._look_up_until:
            try:
                return await self._record(batch_id, events, history, look_up=False)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "usage_events_pkey":
                    raise
                self._look_up_until = time.monotonic() + _LOOK_UP_AFTER_DUPLICATE_S
        return await self._record(batch_id, events, history, look_up=True)

    async def _record(self, batch_id: str, events: Sequence[ing.UsageEvent],
                      history: PriceBookHistory, *, look_up: bool) -> Recorded:
        async with self.pool.acquire() as conn, conn.transaction():
            orgs = sorted({e.org_id for e in events})
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('metering:' || o, 0)) "
                "FROM unnest($1::text[]) AS o ORDER BY o", orgs)
            existing = (await self._rows_of(conn, [(e.org_id, e.event_id) for e in events])
                        if look_up else {})
            outcomes = await _outcomes(conn, existing.values()) if existing else {}
            carries: dict[str, int] = {r["org_id"]: int(r["carry_attos"]) for r in await conn.fetch(
                "SELECT org_id, carry_attos FROM metering.rating_carry "
                "WHERE org_id = ANY($1::text[])", orgs)}
            carried = dict(carries)
            periods = await self._period_usage(conn, events)
            before = dict(periods)
            # usage keys this batch's tiers and allowances need that have no row yet: counted
            # from the recorded events once, then kept up to date like every existing row
            missing = self._period_keys_needed(history, [
                e for e in events if (e.org_id, e.event_id) not in existing]) - periods.keys()
            if missing:
                periods.update(await self._usage_so_far(conn, sorted(missing)))
            results: list[ing.EventResult | None] = []
            rated: list[ing.RatedEvent] = []
            unposted: set[str] = set()
            for event in events:
                prior_row = existing.get((event.org_id, event.event_id))
                if prior_row is not None:
                    results.append(self._duplicate(event, prior_row, outcomes))
                    if not _is_posted(prior_row, outcomes):
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
            debits, cost_before = ing.org_debits([
                (r.event.org_id, r.event.event_id, r.receipt.cost_micros, r.event.reservation_id)
                for r in rated])
            if rated:
                await self._insert(conn, batch_id, rated, cost_before)
                # issue 17: each org's credit lease pays its debit first (the ledger's side of
                # what charge_budgets just charged to the lease in this transaction)
                lease_of = await charge_budgets(conn, [
                    Charge(r.event.org_id, r.event.project_id, r.event.labels,
                           r.event.occurred_at, r.receipt.cost_micros, r.event.reservation_id)
                    for r in rated if r.event.occurred_at is not None], datetime.now(UTC))
                # as for the usage rows below: rows read under the locks are updated in place
                changed = [o for o, c in carries.items() if o in carried and carried[o] != c]
                if changed:
                    await conn.execute(
                        "UPDATE metering.rating_carry c SET carry_attos = u.carry_attos "
                        "FROM unnest($1::text[], $2::numeric[]) AS u(org_id, carry_attos) "
                        "WHERE c.org_id = u.org_id", changed, [carries[o] for o in changed])
                first = [o for o in carries if o not in carried]
                if first:
                    await conn.execute(
                        "INSERT INTO metering.rating_carry (org_id, carry_attos) "
                        "SELECT * FROM unnest($1::text[], $2::numeric[])",
                        first, [carries[o] for o in first])
                # rows read above (under the orgs' locks) are updated in place, the others
                # inserted: an upsert would first try, and fail, to insert every one of them
                moved = [k for k, v in periods.items() if k in before and before[k] != v]
                if moved:
                    await conn.execute(
                        "UPDATE metering.period_usage p SET quantity = u.quantity "
                        "FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], "
                        "$5::bigint[]) AS u(org_id, month, model, meter, quantity) "
                        "WHERE p.org_id = u.org_id AND p.month = u.month "
                        "AND p.model = u.model AND p.meter = u.meter",
                        *[[k[i] for k in moved] for i in range(4)], [periods[k] for k in moved])
                new = [k for k in periods if k not in before]
                if new:
                    await conn.execute(
                        "INSERT INTO metering.period_usage (org_id, month, model, meter, "
                        "quantity) SELECT * FROM unnest($1::text[], $2::date[], $3::text[], "
                        "$4::text[], $5::bigint[])",
                        *[[k[i] for k in new] for i in range(4)], [periods[k] for k in new])
            debits = [replace(d, lease_id=lease_of[d.org_id]) if d.org_id in lease_of else d
                      for d in debits]
            if debits:
                await conn.execute(
                    "INSERT INTO metering.ledger_batches (batch_id, org_debits) "
                    "VALUES ($1, $2)", batch_id, _debits_json(debits))
            return Recorded(results, rated, debits, cost_before, unposted)

    @staticmethod
    def _duplicate(event: ing.UsageEvent, row: Row, outcomes: Outcomes) -> ing.EventResult:
        # rows carry no fingerprint (nothing to hash on the ack path): the stored event's is
        # computed here, on the rare replay; rows recorded before carry theirs
        stored = row["request_hash"]
        if not (event.has_fingerprint(stored) if stored
                else event_from_row(row).fingerprint() == event.fingerprint()):
            return ing.rejected(event.event_id, Reason.IDEMPOTENCY_KEY_REUSED, "event_id",
                                "was already recorded with a different payload")
        return ing.EventResult(event.event_id, ing.EventStatus.DUPLICATE,
                               receipt_from_row(row, outcomes))

    _period_keys = ing.PeriodKeys()

    @classmethod
    def _period_keys_needed(cls, history: PriceBookHistory, events: Sequence[ing.UsageEvent]
                            ) -> set[PeriodKey]:
        needed: set[PeriodKey] = set()
        for event in events:
            if event.occurred_at is None:
                continue
            try:
                book = history.book_at(event.occurred_at)
            except RatingError:
                continue
            lines = cls._period_keys.needed(book, event)
            if lines:
                month = _month(event.occurred_at)
                needed.update((event.org_id, month, key_model, meter.value)
                              for meter, _, key_model in lines)
        return needed

    @classmethod
    def _rate(cls, history: PriceBookHistory, event: ing.UsageEvent, carry: int,
              periods: dict[PeriodKey, int]) -> tuple[ing.RatedEvent | ing.EventResult, int]:
        # Month-to-date usage of each line this event touches whose price depends on it:
        # allowances and tiers count per calendar month (UTC) of the event. `periods` holds
        # every key such a line needs (see record) and every key that has a row.
        assert event.occurred_at is not None
        month = None
        prior: dict[str, int] | None = None
        book = None
        try:
            book = history.book_at(event.occurred_at)
            lines = cls._period_keys.needed(book, event)
        except RatingError:
            lines = []
        if lines:
            month = _month(event.occurred_at)
            prior = {line_id: periods[(event.org_id, month, key_model, meter.value)]
                     for meter, line_id, key_model in lines}
        outcome, new_carry = ing.rate_event(history, event, carry, prior, book)
        if isinstance(outcome, ing.RatedEvent) and periods:
            month = month or _month(event.occurred_at)
            resolved = outcome.receipt.resolved_model
            for meter, quantity in event.quantities:
                if meter is None:
                    continue
                for key_model in (resolved, _ALL_MODELS):
                    key = (event.org_id, month, key_model, meter.value)
                    if key in periods:
                        periods[key] += quantity
        return outcome, new_carry

    @staticmethod
    async def _usage_so_far(conn: Any, keys: Sequence[PeriodKey]) -> dict[PeriodKey, int]:
        """Month-to-date usage of keys that have no row, from the recorded events (under the
        orgs' locks, so no event of theirs commits meanwhile)."""
        rows = await conn.fetch(
            "SELECT k.org_id, k.month, k.model, k.meter, coalesce(u.quantity, 0) AS quantity "
            "FROM unnest($1::text[], $2::date[], $3::text[], $4::text[]) "
            "AS k(org_id, month, model, meter) "
            "CROSS JOIN LATERAL (SELECT sum(q.quantity) AS quantity "
            "FROM metering.usage_events e CROSS JOIN LATERAL ("
            "SELECT m, n FROM unnest(e.meters, e.meter_quantities) AS l(m, n) "
            "WHERE e.meters IS NOT NULL UNION ALL "
            "SELECT j->>0, (j->>1)::bigint FROM jsonb_array_elements(e.quantities) j "
            "WHERE e.meters IS NULL) AS q(meter, quantity) "
            "WHERE e.org_id = k.org_id "
            "AND e.occurred_at >= (k.month::timestamp AT TIME ZONE 'UTC') "
            "AND e.occurred_at < ((k.month + interval '1 month')::timestamp AT TIME ZONE 'UTC') "
            "AND (k.model = $5 OR e.resolved_model = k.model) AND q.meter = k.meter) AS u",
            *[[k[i] for k in keys] for i in range(4)], _ALL_MODELS)
        return {(r["org_id"], r["month"], r["model"], r["meter"]): int(r["quantity"])
                for r in rows}

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
                            ) -> dict[PeriodKey, int]:
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
    async def _insert(conn: Any, batch_id: str, rated: Sequence[ing.RatedEvent],
                      cost_before: Sequence[int]) -> None:
        rows = _copy_rows(batch_id, rated, cost_before)

        async def source() -> AsyncIterator[bytes]:  # (bytes alone would be taken for a path)
            yield rows

        await conn.copy_to_table("usage_events", schema_name="metering", columns=_EVENT_COLUMNS,
                                 format="binary", source=source())

    async def mark_posted(self, batch_id: str, outcomes: Sequence[ing.OrgOutcome],
                          now: datetime) -> None:
        """Closes the batch with the ledger's answer per org (the receipts follow from it)."""
        await self.pool.execute(
            "UPDATE metering.ledger_batches SET posted_at = $2, org_results = $3 "
            "WHERE batch_id = $1", batch_id, now, json.dumps({
                o.org_id: [o.transfer_id, o.arrears_transfer_id, o.available_before_micros]
                for o in outcomes}))

    async def batch_debits(self, batch_id: str) -> list[ing.OrgDebit]:
        """The debits a recorded ledger batch carries."""
        return _debits_of(await self.pool.fetchval(
            "SELECT org_debits FROM metering.ledger_batches WHERE batch_id = $1", batch_id))

    async def receipts(self, keys: Sequence[tuple[str, str]]
                       ) -> dict[tuple[str, str], ing.Receipt]:
        """Stored receipts of (org, event id) pairs."""
        async with self.pool.acquire() as conn:
            rows = await self._rows_of(conn, keys)
            outcomes = await _outcomes(conn, rows.values())
        return {key: receipt_from_row(r, outcomes) for key, r in rows.items()}

    async def pending_batches(self) -> list[tuple[str, list[ing.OrgDebit]]]:
        """Batches whose events are durable but whose ledger debit was never confirmed."""
        # (batches of per-event items, left by a version before per-org debits, are not here)
        rows = await self.pool.fetch("SELECT batch_id, org_debits FROM metering.ledger_batches "
                                     "WHERE posted_at IS NULL AND org_debits IS NOT NULL "
                                     "ORDER BY created_at")
        return [(r["batch_id"], _debits_of(r["org_debits"])) for r in rows]

    async def event(self, org_id: str, event_id: str
                    ) -> tuple[ing.UsageEvent, ing.Receipt] | None:
        """One recorded event with its receipt."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM metering.usage_events WHERE org_id = $1 AND event_id = $2",
                org_id, event_id)
            if row is None:
                return None
            return event_from_row(row), receipt_from_row(row, await _outcomes(conn, [row]))

    async def export(self, org_id: str, start: datetime | None, end: datetime | None,
                     after: tuple[datetime, str, str] | None, limit: int
                     ) -> list[tuple[ing.UsageEvent, ing.Receipt]]:
        """Recorded events of an org ("" = every org) in [start, end), in (occurred_at, org,
        event id) order."""
        async with self.pool.acquire() as conn:
            return await self._export(conn, org_id, start, end, after, limit)

    @staticmethod
    async def _export(conn: Any, org_id: str, start: datetime | None, end: datetime | None,
                      after: tuple[datetime, str, str] | None, limit: int
                      ) -> list[tuple[ing.UsageEvent, ing.Receipt]]:
        rows = await conn.fetch(
            "SELECT * FROM metering.usage_events WHERE ($1 = '' OR org_id = $1) "
            "AND ($2::timestamptz IS NULL OR occurred_at >= $2) "
            "AND ($3::timestamptz IS NULL OR occurred_at < $3) "
            "AND ($4::timestamptz IS NULL OR (occurred_at, org_id, event_id) > ($4, $5, $6)) "
            "ORDER BY occurred_at, org_id, event_id LIMIT $7",
            org_id, start, end, after[0] if after else None, after[1] if after else "",
            after[2] if after else "", limit)
        outcomes = await _outcomes(conn, rows)
        return [(event_from_row(r), receipt_from_row(r, outcomes)) for r in rows]
