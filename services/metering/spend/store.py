"""SpendStore: authorizations and the holds they place on budgets and on the org's credit
lease, in Postgres.

The common case is one statement (`hold`, metering.authorize_holds): replay check, every
budget up to its plain-ALLOW cap, the lease's free credit, and the authorization inserted
HELD with its holds, group-committed per org. A budget past its cap is decided under its
row lock (`decide`: judge_budgets, DOWNGRADE or DENY), the lease locked after it; an answer
the lease cannot cover is NeedsCredit (nothing recorded). Holds leave the budgets and the
lease when the usage event captures the reservation (`charge_budgets`, in the ingestion
transaction) or when the sweeper finds them past their ttl. Authorizations recorded PENDING
by the previous version are treated like HELD.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from tally.kit import audit, outbox
from tally.kit.background import Deadline
from tally.kit.group_commit import GroupCommit
from tally.kit.telemetry import current_traceparent

from ..policies import (
    Budget,
    BudgetEnforcement,
    BudgetPeriod,
    BudgetScope,
    Quota,
    QuotaEnforcement,
    QuotaKind,
    QuotaScope,
    SpendPolicy,
)
from .domain import (
    Answer,
    AuthorizeRequest,
    BudgetState,
    Decision,
    Headroom,
    crossed_thresholds,
)
from .lease_store import move_leases

Decide = Callable[[list[BudgetState]], Answer]
# Inserts into the outbox NOTIFY OUTBOX_CHANNEL (a trigger, migration 0004); sealing them
# NOTIFYs SEALED_CHANNEL (every replica's StreamEvents wake on it).
OUTBOX_CHANNEL = "metering_outbox"
SEALED_CHANNEL = "metering_outbox_sealed"


class Replayed(Exception):
    """Another call with the same request id got there first."""


class NeedsCredit(Exception):
    """The org's credit lease cannot cover this request now: the ledger must be asked."""

    def __init__(self, needed_micros: int) -> None:
        super().__init__(f"the credit lease cannot cover {needed_micros} micro-credits")
        self.needed_micros = needed_micros


@dataclass(frozen=True, slots=True)
class Decided:
    """A recorded answer, the org's billing state as its lease knew it and the lease's free
    credit after it (what sizes the lease; the answer's balance headroom also counts what the
    ledger could still lease)."""

    answer: Answer
    billing_state: str = "ACTIVE"
    lease_free: int = 0


@dataclass(frozen=True, slots=True)
class Hold:
    """One Authorize for the single statement: the plain ALLOW it gets if every budget and
    the lease take it (its headroom so far: the quotas')."""

    request: AuthorizeRequest
    request_hash: str
    answer: Answer
    budgets: Sequence[tuple[Budget, datetime, int]]  # budget, period start, allow_cap
    audit: audit.PendingRecord | None = None  # the call's audit record, written with it


class Outcome(enum.Enum):
    """What the single statement did with a Hold."""

    HELD = "HELD"  # recorded with its holds: the answer is final
    REPLAY = "REPLAY"  # the request id is recorded already
    BUDGET = "BUDGET"  # a budget would not give a plain ALLOW: decide under its lock
    LEASE = "LEASE"  # the lease cannot cover it: ask the ledger


@dataclass(frozen=True, slots=True)
class HoldResult:
    """The single statement's answer to one Hold."""

    outcome: Outcome
    decided: Decided | None = None


def answer_to_json(answer: Answer) -> str:
    body = asdict(answer)
    body["decision"] = answer.decision.value
    body["expires_at"] = answer.expires_at.isoformat() if answer.expires_at else None
    return json.dumps(body)


def answer_from_json(raw: str) -> Answer:
    body = json.loads(raw)
    return Answer(
        decision=Decision(body["decision"]), model=body["model"],
        reservation_id=body["reservation_id"], reserved_micros=body["reserved_micros"],
        deny_reason=body["deny_reason"], retry_after_ms=body["retry_after_ms"],
        message=body["message"], price_book_version=body["price_book_version"],
        expires_at=datetime.fromisoformat(body["expires_at"]) if body["expires_at"] else None,
        headroom=tuple(Headroom(**h) for h in body["headroom"]))


def answer_of_row(row: Any) -> Answer:
    """The recorded answer: JSON, or (held by the single statement) its columns."""
    if row["response"] is not None:
        return answer_from_json(row["response"])
    return Answer(
        Decision(row["decision"]), model=row["model"], reservation_id=row["reservation_id"],
        reserved_micros=row["reserved_micros"], price_book_version=row["price_book_version"],
        expires_at=row["expires_at"], headroom=tuple(
            Headroom(*h) for h in zip(row["headroom_scopes"], row["headroom_units"],
                                      row["headroom_limits"], row["headroom_remaining"],
                                      strict=True)))


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One sealed event of metering's outbox (a budget alarm)."""

    event_id: str
    sequence: int
    org_id: str
    type: str
    occurred_at: datetime
    trace_id: str
    attributes: Mapping[str, Any]


def budget_from_row(r: Any) -> Budget:
    """A budget as stored in metering.budgets."""
    return Budget(
        budget_id=r["budget_id"], org_id=r["org_id"], name=r["name"],
        scope=BudgetScope(r["scope"]), scope_value=r["scope_value"],
        period=BudgetPeriod(r["period"]), limit_micros=r["limit_micros"],
        enforcement=BudgetEnforcement(r["enforcement"]),
        alarm_thresholds_percent=tuple(r["alarm_thresholds_percent"]),
        downgrade_at_percent=r["downgrade_at_percent"], period_start=r["period_start"],
        period_end=r["period_end"], created_at=r["created_at"], updated_at=r["updated_at"])


def quota_from_row(r: Any) -> Quota:
    """A quota as stored in metering.quotas."""
    return Quota(r["quota_id"], r["org_id"], QuotaScope(r["scope"]), r["scope_value"],
                 QuotaKind(r["kind"]), r["limit_value"], QuotaEnforcement(r["enforcement"]),
                 r["burst"], r["long_context_threshold_tokens"], r["created_at"],
                 r["updated_at"])


def policy_from_row(org_id: str, r: Any | None) -> SpendPolicy:
    """An org's spend policy as stored in metering.spend_policies; no limits without a row."""
    if r is None:
        return SpendPolicy(org_id)
    return SpendPolicy(org_id, r["max_context_tokens"], r["max_upload_bytes"],
                       r["long_context_threshold_tokens"], r["throttled_requests_per_second"],
                       r["updated_at"], r["updated_by"])


@dataclass(frozen=True, slots=True)
class _Decision:
    """One Authorize waiting to be decided under its budgets' locks (SpendStore.decide)."""

    request: AuthorizeRequest
    request_hash: str
    budgets: Sequence[tuple[Budget, datetime]]
    decide: Decide
    audit: audit.PendingRecord | None = None  # the call's audit record, written with it


class SpendStore:
    """Postgres persistence of Authorize."""

    def __init__(self, pool: asyncpg.Pool, *, decisions_per_group: int = 256,
                 database_url: str = "") -> None:
        self.pool = pool
        # the pool's database: calls' audit records audited there are written with their
        # decisions (tally.kit.audit.pending); "" = never (the kit writes them itself)
        self.database_url = database_url
        # An org's Authorize calls against budgets that arrive while its decision's
        # transaction runs are decided together in the next one: a hot budget costs a lock
        # per group, not per call (and one org's lock waits are not another's).
        self._decisions = GroupCommit("metering.authorize", self._decide_many,
                                      max_size=decisions_per_group,
                                      key=lambda decision: decision.request.org_id)
        # The common case: concurrent calls of an org decided by one statement (one commit).
        self._holds = GroupCommit("metering.authorize_hold", self._hold_many,
                                  max_size=decisions_per_group,
                                  key=lambda hold: hold.request.org_id)
        self.hold_expiry = Deadline()  # when the sweeper next has work (holds move it earlier)
        # replay lookups before the quota limiter: concurrent ones of an org share one query
        self._lookups: GroupCommit[tuple[str, str], tuple[str, str, Answer] | None] = (
            GroupCommit("metering.authorize_replay", self._authorizations_many,
                        max_size=decisions_per_group, key=lambda ident: ident[0]))

    async def next_hold_expiry(self) -> datetime | None:
        """When the next open hold reaches its ttl."""
        found: datetime | None = await self.pool.fetchval(
            "SELECT min(expires_at) FROM metering.authorizations "
            "WHERE state IN ('HELD', 'PENDING')")
        return found

    async def hold(self, hold: Hold) -> HoldResult:
        """Records `hold` as a plain ALLOW with its budget and lease holds if they all take
        it, in one statement shared with the calls of its org queued meanwhile. The call's
        audit record (tally.kit.audit.pending), if any, is written by that statement too: the
        hold and its record commit together or not at all."""
        record = audit.pending(self.database_url) if self.database_url else None
        if record is not None:
            hold = replace(hold, audit=record)
        return await self._holds.submit(hold)

    async def _hold_many(self, holds: Sequence[Hold]) -> list[HoldResult | Exception]:
        calls: list[tuple[Any, ...]] = []
        budgets: list[tuple[Any, ...]] = []
        quotas: list[tuple[Any, ...]] = []
        audited: list[tuple[Any, ...]] = []
        for n, h in enumerate(holds, 1):
            a = h.answer
            if h.audit is not None:
                audited.extend((n, *row) for row in h.audit.rows())
            calls.append((h.request.org_id, h.request.request_id, h.request_hash, a.model,
                          a.reservation_id, a.reserved_micros, a.price_book_version,
                          a.expires_at))
            budgets.extend((n, b.budget_id, start, cap, b.limit_micros)
                           for b, start, cap in h.budgets)
            quotas.extend((n, q.scope, q.unit, q.limit, q.remaining) for q in a.headroom)
        rows = await self.pool.fetch(_HOLD_SQL if audited else _HOLD_SQL_UNAUDITED,
                                     *_columns(calls, 8), *_columns(budgets, 5),
                                     *_columns(quotas, 5), datetime.now(UTC),
                                     *(_columns(audited, 3) if audited else ()))
        results: list[HoldResult | Exception] = []
        for h, row in zip(holds, rows, strict=True):
            outcome = Outcome(row["outcome"])
            if outcome is not Outcome.HELD:
                results.append(HoldResult(outcome))
                continue
            if h.audit is not None:
                h.audit.written()  # committed by the statement, with the hold
            a = h.answer
            if a.expires_at is not None:
                self.hold_expiry.due(a.expires_at)
            room = list(a.headroom)
            room.extend(Headroom(f"budget:{b.budget_id}", "micros", b.limit_micros, left)
                        for (b, _, _), left in zip(h.budgets, row["budget_left"], strict=True))
            free = 0
            if a.reserved_micros > 0:
                free = row["lease_free"]
                spendable = free + row["ledger_available"]
                room.append(Headroom("balance", "micros", spendable + a.reserved_micros,
                                     spendable))
            results.append(HoldResult(outcome, Decided(replace(a, headroom=tuple(room)),
                                                       row["billing_state"], free)))
        return results

    async def budget_states(self, budgets: Sequence[tuple[Budget, datetime]]
                            ) -> list[BudgetState]:
        """What each budget has spent and holds in its period now (no lock: for the headroom
        of an answer that holds nothing)."""
        rows = await self.pool.fetch(
            "SELECT u.budget_id, u.period_start, u.spent_micros, u.reserved_micros "
            "FROM metering.budget_usage u JOIN unnest($1::text[], $2::timestamptz[]) "
            "AS k(id, start) ON u.budget_id = k.id AND u.period_start = k.start",
            [b.budget_id for b, _ in budgets], [start for _, start in budgets])
        found = {(r["budget_id"], r["period_start"]): (r["spent_micros"], r["reserved_micros"])
                 for r in rows}
        return [BudgetState(b, start, *found.get((b.budget_id, start), (0, 0)))
                for b, start in budgets]

    async def budgets_of(self, org_id: str) -> list[Budget]:
        """The org's live budgets."""
        rows = await self.pool.fetch(
            "SELECT * FROM metering.budgets WHERE org_id = $1 AND deleted_at IS NULL "
            "ORDER BY budget_id", org_id)
        return [budget_from_row(r) for r in rows]

    async def policy_for(self, org_id: str) -> SpendPolicy:
        """The org's spend policy; no limits when never set."""
        return policy_from_row(org_id, await self.pool.fetchrow(
            "SELECT * FROM metering.spend_policies WHERE org_id = $1", org_id))

    async def quotas_for(self, org_id: str) -> list[Quota]:
        """The org's live quotas."""
        rows = await self.pool.fetch(
            "SELECT * FROM metering.quotas WHERE org_id = $1 AND deleted_at IS NULL "
            "ORDER BY quota_id", org_id)
        return [quota_from_row(r) for r in rows]

    async def recorded(self, org_id: str, request_id: str) -> tuple[str, str, Answer] | None:
        """`authorization`, in one query with the org's lookups queued meanwhile."""
        return await self._lookups.submit((org_id, request_id))

    async def _authorizations_many(self, idents: Sequence[tuple[str, str]]
                                   ) -> list[tuple[str, str, Answer] | Exception | None]:
        rows = await self.pool.fetch(
            "SELECT a.org_id, a.request_id, request_hash, state, response, decision, model, "
            "reservation_id, reserved_micros, price_book_version, expires_at, headroom_scopes, "
            "headroom_units, headroom_limits, headroom_remaining FROM metering.authorizations a "
            "JOIN unnest($1::text[], $2::text[]) AS k(o, q) ON a.org_id = k.o "
            "AND a.request_id = k.q", [i[0] for i in idents], [i[1] for i in idents])
        found = {(r["org_id"], r["request_id"]): (r["request_hash"], r["state"], answer_of_row(r))
                 for r in rows}
        return [found.get(ident) for ident in idents]

    async def budget_usage(self, keys: Sequence[UsageKey]) -> dict[UsageKey, tuple[int, int]]:
        """(spent, reserved) per (budget, period start) found, read without locking: the
        rate-limit check's view, which holds nothing."""
        rows = await self.pool.fetch(
            "SELECT u.budget_id, u.period_start, u.spent_micros, u.reserved_micros "
            "FROM metering.budget_usage u JOIN unnest($1::text[], $2::timestamptz[]) "
            "AS k(id, start) ON u.budget_id = k.id AND u.period_start = k.start",
            [k[0] for k in keys], [k[1] for k in keys])
        return {(r["budget_id"], r["period_start"]): (r["spent_micros"], r["reserved_micros"])
                for r in rows}

    async def authorization(self, org_id: str, request_id: str
                            ) -> tuple[str, str, Answer] | None:
        """(request hash, state, answer) of an earlier Authorize with this id, if any."""
        row = await self.pool.fetchrow(
            "SELECT request_hash, state, response, decision, model, reservation_id, "
            "reserved_micros, price_book_version, expires_at, headroom_scopes, headroom_units, "
            "headroom_limits, headroom_remaining FROM metering.authorizations "
            "WHERE org_id = $1 AND request_id = $2", org_id, request_id)
        if row is None:
            return None
        return row["request_hash"], row["state"], answer_of_row(row)

    async def decide(self, request: AuthorizeRequest, request_hash: str,
                     budgets: Sequence[tuple[Budget, datetime]], decide: Decide) -> Decided:
        """Locks the budgets' usage rows for their periods and the org's credit lease, lets
        `decide` answer, and records the answer with its holds on both (HELD) or as DENIED —
        one transaction, shared with the calls that queued up meanwhile (each decided on the
        holds of the ones before it).

        Raises Replayed if the same request id was recorded meanwhile, NeedsCredit (nothing
        recorded) if the answer holds more than the lease has free.
        """
        # the call's audit record: written with its answer
        record = audit.pending(self.database_url) if self.database_url else None
        if not budgets and decide([]).decision is Decision.DENY:  # nothing to lock
            return Decided(await self._record_without_budgets(request, request_hash,
                                                              decide([]), record))
        return await self._decisions.submit(_Decision(request, request_hash, budgets, decide,
                                                      record))

    async def _decide_many(self, decisions: Sequence[_Decision]) -> list[Decided | Exception]:
        keys = sorted({(b.budget_id, start) for x in decisions for b, start in x.budgets})
        for _ in range(2):
            async with self.pool.acquire() as conn, conn.transaction():
                locked = await lock_existing_usage(conn, keys)
                if len(locked) == len(keys):
                    lease = await conn.fetchrow(
                        "SELECT granted_micros - returned_micros - charged_micros - held_micros "
                        "AS free, billing_state, expires_at, ledger_available_micros "
                        "FROM metering.credit_leases "
                        "WHERE org_id = $1 FOR UPDATE", decisions[0].request.org_id)
                    answers = await self._record_many(conn, decisions, locked, lease)
                    break
            # A period's first request: create its usage rows outside any lock, then retry
            # (creating them while holding others' locks could deadlock with another creator).
            await create_usage_rows(self.pool, keys)
        else:
            raise RuntimeError("budget usage rows vanished")  # nothing deletes them
        for x, answer in zip(decisions, answers, strict=True):
            if x.audit is not None and isinstance(answer, Decided):
                x.audit.written()  # committed with the answer (_record_many)
        return answers

    async def _record_many(self, conn: Any, decisions: Sequence[_Decision],
                           locked: dict[UsageKey, tuple[int, int]], lease: Any
                           ) -> list[Decided | Exception]:
        """Decides each in order, on the locked usage plus the holds of the ones before it,
        and records them. One whose id is recorded already (before the locks, or earlier in
        the group) is Replayed, undecided. A copy's transaction holds the same budget locks,
        so none can record it meanwhile, unless its budgets changed in between (a policy
        cache refresh): then its insert finds it, it is Replayed too and its holds are not
        kept; counted for the ones after it, they may have refused one for nothing, never
        admitted one too many."""
        usage = dict(locked)
        # the org's credit lease (all of a group are one org's): what is free, if usable
        now = datetime.now(UTC)
        usable = (lease is not None and lease["billing_state"] != "READ_ONLY"
                  and lease["expires_at"] > now)
        free = lease["free"] if usable else 0
        billing_state = lease["billing_state"] if lease is not None else "ACTIVE"
        beyond = lease["ledger_available_micros"] if usable else 0
        leased = 0
        answers: list[Decided | Exception] = []
        rows: list[tuple[Any, ...]] = []
        holds: list[list[tuple[UsageKey, int]]] = []
        # copies of a call recorded before these locks were granted: their holds are in the
        # locked usage already (alone, a call finds that out from its insert)
        seen: set[tuple[str, str]] = set() if len(decisions) == 1 else {
            (r[0], r[1]) for r in await conn.fetch(
                "SELECT a.org_id, a.request_id FROM metering.authorizations a "
                "JOIN unnest($1::text[], $2::text[]) AS k(o, q) "
                "ON a.org_id = k.o AND a.request_id = k.q",
                [x.request.org_id for x in decisions],
                [x.request.request_id for x in decisions])}
        for x in decisions:
            request = x.request
            ident = (request.org_id, request.request_id)
            if ident in seen:
                answers.append(Replayed(request.request_id))
                continue
            states = [BudgetState(b, start, *usage[(b.budget_id, start)])
                      for b, start in x.budgets]
            try:
                answer = x.decide(states)
            except Exception as refused:  # this call's answer, not the group's
                answers.append(refused)
                continue
            cost = answer.reserved_micros if answer.decision is not Decision.DENY else 0
            if cost > 0:
                if cost > free:
                    answers.append(NeedsCredit(cost))
                    continue
                free -= cost
                leased += cost
                answer = replace(answer, headroom=(
                    *answer.headroom,
                    Headroom("balance", "micros", free + beyond + cost, free + beyond)))
            seen.add(ident)
            held = _holds(answer, states)
            if held and answer.expires_at is not None:
                self.hold_expiry.due(answer.expires_at)
            for key, amount in held:
                spent, reserved = usage[key]
                usage[key] = (spent, reserved + amount)
            holds.append(held)
            rows.append(_authorization_row(request, x.request_hash, answer, held))
            answers.append(Decided(answer, billing_state, free))
        if not rows:
            return answers
        inserted = {(r[0], r[1]) for r in await conn.fetch(
            "INSERT INTO metering.authorizations (org_id, request_id, request_hash, decision, "
            "reservation_id, reserved_micros, budget_holds, state, expires_at, response, "
            "lease_held_micros) SELECT o, q, h, d, r, m, b::jsonb, s, e, a::jsonb, "
            "CASE WHEN s = 'HELD' THEN m ELSE 0 END FROM unnest($1::text[], "
            "$2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], "
            "$8::text[], $9::timestamptz[], $10::text[]) AS k(o, q, h, d, r, m, b, s, e, a) "
            "ON CONFLICT DO NOTHING RETURNING org_id, request_id",
            *(list(column) for column in zip(*rows, strict=True)))}
        await _write_audit(conn, [x.audit for x in decisions if x.audit is not None
                                  and (x.request.org_id, x.request.request_id) in inserted])
        # the lease holds what was inserted (a copy recorded meanwhile holds its own)
        leased -= sum(row[5] for row in rows if row[7] == "HELD" and (row[0], row[1])
                      not in inserted)
        if leased:
            await conn.execute("UPDATE metering.credit_leases SET held_micros = held_micros + $2 "
                               "WHERE org_id = $1", decisions[0].request.org_id, leased)
        added: dict[UsageKey, int] = {}
        for row, held in zip(rows, holds, strict=True):
            if (row[0], row[1]) in inserted:
                for key, amount in held:
                    added[key] = added.get(key, 0) + amount
        if added:
            ordered = sorted(added)
            await conn.execute(
                "UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros + k.held "
                "FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) AS k(id, start, held) "
                "WHERE u.budget_id = k.id AND u.period_start = k.start",
                [k[0] for k in ordered], [k[1] for k in ordered], [added[k] for k in ordered])
        return [Replayed(x.request.request_id)
                if isinstance(a, Decided) and (x.request.org_id, x.request.request_id)
                not in inserted else a for a, x in zip(answers, decisions, strict=True)]

    async def _record_without_budgets(self, request: AuthorizeRequest, request_hash: str,
                                      answer: Answer, record: audit.PendingRecord | None
                                      ) -> Answer:
        """Inserts an authorization no budget applies to (so it holds none), and the call's
        audit record if it is inserted: one statement."""
        rows = record.rows() if record is not None else []
        inserted = await self.pool.fetchval(
            "WITH a AS (INSERT INTO metering.authorizations (org_id, request_id, request_hash, "
            "decision, reservation_id, reserved_micros, budget_holds, state, expires_at, "
            "response) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING "
            "RETURNING true AS inserted), r AS (INSERT INTO metering.audit_outbox "
            "(record_id, record) SELECT k.id, k.rec FROM unnest($11::text[], $12::jsonb[]) "
            "AS k(id, rec), a ON CONFLICT DO NOTHING) SELECT inserted FROM a",
            *_authorization_row(request, request_hash, answer, []),
            [r[0] for r in rows], [r[1] for r in rows])
        if not inserted:
            raise Replayed(request.request_id)
        if record is not None:
            record.written()
        return answer

    async def refuse(self, org_id: str, request_id: str, answer: Answer) -> None:
        """A held authorization turned out refused (a THROTTLED org past its rate): its holds
        on budgets and on the lease are given back and the DENY is recorded."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE metering.authorizations SET state = 'DENIED', decision = 'DENY', "
                "response = $3 WHERE org_id = $1 AND request_id = $2 "
                "AND state IN ('PENDING', 'HELD') "
                "RETURNING org_id, budget_holds, lease_held_micros", org_id, request_id,
                answer_to_json(answer))
            if rows:
                await give_back(conn, [json.loads(r["budget_holds"]) for r in rows])
                await move_leases(conn, {}, _lease_holds(rows))

    async def seal_outbox(self) -> int:
        """Gives sequences to the outbox rows that can be delivered (kit.outbox.seal)."""
        return await outbox.seal(self.pool, "metering.outbox", announce=SEALED_CHANNEL)

    async def outbox_after(self, sequence: int, types: Sequence[str], limit: int = 1000
                           ) -> list[OutboxEvent]:
        """Sealed outbox events after `sequence`, oldest first (types: empty = all)."""
        rows = await self.pool.fetch(
            "SELECT * FROM metering.outbox WHERE sequence > $1 "
            "AND (cardinality($2::text[]) = 0 OR type = ANY($2::text[])) "
            "ORDER BY sequence LIMIT $3", sequence, list(types), limit)
        return [OutboxEvent(r["event_id"], r["sequence"], r["org_id"], r["type"],
                            r["occurred_at"], r["trace_id"], json.loads(r["attributes"]))
                for r in rows]

    async def expire_holds(self, now: datetime, limit: int = 500) -> int:
        """Frees the budget holds of authorizations past their ttl that nothing captured."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE metering.authorizations SET state = 'RELEASED' WHERE (org_id, request_id) "
                "IN (SELECT org_id, request_id FROM metering.authorizations WHERE state IN "
                "('HELD', 'PENDING') AND expires_at < $1 ORDER BY expires_at LIMIT $2 "
                "FOR UPDATE SKIP LOCKED) RETURNING org_id, budget_holds, lease_held_micros",
                now, limit)
            await give_back(conn, [json.loads(r["budget_holds"]) for r in rows])
            await move_leases(conn, {}, _lease_holds(rows))
            return len(rows)


UsageKey = tuple[str, datetime]

_HOLD_SQL_UNAUDITED = (
    "SELECT idx, outcome, lease_free, billing_state, budget_left, ledger_available FROM "
    "metering.authorize_holds($1::text[], $2::text[], $3::text[], $4::text[], "
    "$5::text[], $6::bigint[], $7::bigint[], $8::timestamptz[], $9::int[], "
    "$10::text[], $11::timestamptz[], $12::bigint[], $13::bigint[], $14::int[], "
    "$15::text[], $16::text[], $17::bigint[], $18::bigint[], $19)")
# The same, writing the audit record of each call HELD (call index, record id, record) in the
# same statement: a data-modifying CTE runs once, in the statement's transaction.
_HOLD_SQL = (
    "WITH h AS (" + _HOLD_SQL_UNAUDITED + "), "
    "a AS (INSERT INTO metering.audit_outbox (record_id, record) SELECT k.id, k.rec "
    "FROM unnest($20::int[], $21::text[], $22::jsonb[]) AS k(idx, id, rec) "
    "JOIN h ON h.idx = k.idx AND h.outcome = 'HELD' ON CONFLICT DO NOTHING) "
    "SELECT * FROM h ORDER BY idx")


async def _write_audit(conn: Any, records: Sequence[audit.PendingRecord]) -> None:
    """Calls' audit records, in the transaction of their answers (`conn`'s)."""
    rows = [row for record in records for row in record.rows()]
    if rows:
        await conn.execute(
            "INSERT INTO metering.audit_outbox (record_id, record) SELECT * FROM "
            "unnest($1::text[], $2::jsonb[]) ON CONFLICT DO NOTHING",
            [r[0] for r in rows], [r[1] for r in rows])


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as `width` column lists (unnest's arguments)."""
    return [[r[i] for r in rows] for i in range(width)]


def _holds(answer: Answer, states: Sequence[BudgetState]) -> list[tuple[UsageKey, int]]:
    """What an answer holds on each budget it was decided on: its reservation, unless denied."""
    if answer.decision is Decision.DENY or answer.reserved_micros <= 0:
        return []
    return [((s.budget.budget_id, s.period_start), answer.reserved_micros) for s in states]


def _authorization_row(request: AuthorizeRequest, request_hash: str, answer: Answer,
                       held: Sequence[tuple[UsageKey, int]]) -> tuple[Any, ...]:
    """The metering.authorizations values of an answer holding `held` on budgets (and, if it
    holds anything, as much on the org's credit lease)."""
    return (request.org_id, request.request_id, request_hash, answer.decision.value,
            answer.reservation_id, answer.reserved_micros,
            json.dumps([[key[0], key[1].isoformat(), amount] for key, amount in held]),
            "DENIED" if answer.decision is Decision.DENY else "HELD",
            answer.expires_at, answer_to_json(answer))


async def lock_existing_usage(conn: Any, keys: Sequence[UsageKey]
                              ) -> dict[UsageKey, tuple[int, int]]:
    """Locks the budget_usage rows of `keys` that exist, in (budget, period) order; returns
    (spent, reserved) per key found."""
    rows = await conn.fetch(
        "SELECT u.budget_id, u.period_start, u.spent_micros, u.reserved_micros "
        "FROM metering.budget_usage u JOIN unnest($1::text[], $2::timestamptz[]) "
        "AS k(id, start) ON u.budget_id = k.id AND u.period_start = k.start "
        "ORDER BY u.budget_id, u.period_start FOR UPDATE OF u",
        [k[0] for k in keys], [k[1] for k in keys])
    return {(r["budget_id"], r["period_start"]): (r["spent_micros"], r["reserved_micros"])
            for r in rows}


async def lock_usage(conn: Any, keys: Sequence[UsageKey]) -> dict[UsageKey, tuple[int, int]]:
    """Creates missing budget_usage rows and locks them all, in (budget, period) order — the
    one order every writer uses, so Authorize, ingestion and the sweeper never deadlock.
    Returns (spent, reserved) per key."""
    if not keys:
        return {}
    ordered = sorted(set(keys))
    await create_usage_rows(conn, ordered)
    return await lock_existing_usage(conn, ordered)


async def create_usage_rows(conn: Any, keys: Sequence[UsageKey]) -> None:
    """Creates the budget_usage rows of `keys` that do not exist yet (in key order)."""
    await conn.execute(
        "INSERT INTO metering.budget_usage (budget_id, period_start) "
        "SELECT * FROM unnest($1::text[], $2::timestamptz[]) ORDER BY 1, 2 "
        "ON CONFLICT DO NOTHING", [k[0] for k in keys], [k[1] for k in keys])


async def move_usage(conn: Any, spent: dict[UsageKey, int], freed: dict[UsageKey, int]
                     ) -> dict[UsageKey, tuple[int, int]]:
    """Adds spend and frees holds on budget_usage rows (locked first, in order); returns the
    spent amount before and after per key."""
    keys = sorted(set(spent) | set(freed))
    before = await lock_usage(conn, keys)
    if not keys:
        return {}
    await conn.execute(
        "UPDATE metering.budget_usage u SET spent_micros = u.spent_micros + k.spent, "
        "reserved_micros = u.reserved_micros - k.freed "
        "FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[]) "
        "AS k(id, start, spent, freed) WHERE u.budget_id = k.id AND u.period_start = k.start",
        [k[0] for k in keys], [k[1] for k in keys], [spent.get(k, 0) for k in keys],
        [freed.get(k, 0) for k in keys])
    return {k: (before[k][0], before[k][0] + spent.get(k, 0)) for k in keys}


def holds_by_key(holds_of_each: Sequence[Sequence[Sequence[Any]]]) -> dict[UsageKey, int]:
    """Sums authorizations' budget holds ([budget_id, period_start iso, micros]) per key."""
    totals: dict[UsageKey, int] = {}
    for holds in holds_of_each:
        for budget_id, start, micros in holds:
            key = (budget_id, datetime.fromisoformat(start))
            totals[key] = totals.get(key, 0) + micros
    return totals


async def give_back(conn: Any, holds_of_each: Sequence[Sequence[Sequence[Any]]]) -> None:
    """Removes authorizations' holds from their budgets' reserved amounts."""
    await move_usage(conn, {}, holds_by_key(holds_of_each))


@dataclass(frozen=True, slots=True)
class Charge:
    """Usage as budgets see it: who spent how much, when, and which hold it captures."""

    org_id: str
    project_id: str
    labels: Mapping[str, str]
    occurred_at: datetime
    cost_micros: int
    reservation_id: str = ""


async def charge_budgets(conn: Any, charges: Sequence[Charge], now: datetime) -> dict[str, str]:
    """Inside the ingestion transaction: captured authorizations give their holds back (on
    budgets and on the org's credit lease), the usage is added to every budget it counts
    against and charged to the org's lease, and each alarm threshold crossed is recorded once
    per budget and period (and put in the outbox). Returns the lease id of each org that has
    one: its ledger items name it (the ledger pays them from the lease's hold)."""
    captured = sorted({c.reservation_id for c in charges if c.reservation_id})
    freed: dict[UsageKey, int] = {}
    lease_freed: dict[str, int] = {}
    if captured:
        rows = await conn.fetch(
            "UPDATE metering.authorizations SET state = 'CAPTURED' "
            "WHERE reservation_id = ANY($1::text[]) AND state IN ('HELD', 'PENDING') "
            "RETURNING org_id, budget_holds, lease_held_micros", captured)
        freed = holds_by_key([json.loads(r["budget_holds"]) for r in rows])
        lease_freed = _lease_holds(rows)
    lease_charged: dict[str, int] = {}
    for c in charges:
        lease_charged[c.org_id] = lease_charged.get(c.org_id, 0) + c.cost_micros
    await _charge_budgets(conn, charges, freed, now)
    # after the budgets' rows: the one lock order (budgets, then leases)
    return await move_leases(conn, lease_charged, lease_freed)


def _lease_holds(rows: Sequence[Any]) -> dict[str, int]:
    """Sums authorizations' lease holds per org."""
    freed: dict[str, int] = {}
    for r in rows:
        if r["lease_held_micros"]:
            freed[r["org_id"]] = freed.get(r["org_id"], 0) + r["lease_held_micros"]
    return freed


async def _charge_budgets(conn: Any, charges: Sequence[Charge], freed: dict[UsageKey, int],
                          now: datetime) -> int:
    """charge_budgets' budget half. Returns alarms fired."""
    orgs = sorted({c.org_id for c in charges})
    budgets = [budget_from_row(r) for r in await conn.fetch(
        "SELECT * FROM metering.budgets WHERE org_id = ANY($1::text[]) AND deleted_at IS NULL",
        orgs)]
    if not budgets and not freed:
        return 0
    of_org: dict[str, list[Budget]] = {}
    for budget in budgets:
        of_org.setdefault(budget.org_id, []).append(budget)
    spent: dict[UsageKey, int] = {}
    for charge in charges:
        for budget in of_org.get(charge.org_id, ()):
            window = budget.window(charge.occurred_at)
            if window is not None and budget.applies_to(charge.project_id, charge.labels):
                key = (budget.budget_id, window[0])
                spent[key] = spent.get(key, 0) + charge.cost_micros
    moved = await move_usage(conn, spent, freed)
    by_id = {b.budget_id: b for b in budgets}
    alarms = [(budget_id, start, threshold, after)
              for (budget_id, start), (before, after) in moved.items()
              if budget_id in by_id
              for threshold in crossed_thresholds(by_id[budget_id], before, after)]
    if not alarms:
        return 0
    fired = await conn.fetch(
        "INSERT INTO metering.budget_alarms (budget_id, period_start, threshold_percent, "
        "spent_micros, fired_at) SELECT k.*, $5 FROM unnest($1::text[], $2::timestamptz[], "
        "$3::int[], $4::bigint[]) AS k ON CONFLICT DO NOTHING "
        "RETURNING budget_id, period_start, threshold_percent, spent_micros",
        [a[0] for a in alarms], [a[1] for a in alarms], [a[2] for a in alarms],
        [a[3] for a in alarms], now)
    await conn.copy_records_to_table(
        "outbox", schema_name="metering",
        columns=("event_id", "org_id", "type", "occurred_at", "trace_id", "attributes"),
        # the full traceparent: the notifier's span becomes a child of the span that wrote it
        records=[(str(uuid.uuid4()), by_id[r["budget_id"]].org_id, "BUDGET_THRESHOLD", now,
                  current_traceparent(),
                  json.dumps({"budget_id": r["budget_id"],
                              "period_start": r["period_start"].isoformat(),
                              "threshold_percent": r["threshold_percent"],
                              "spent_micros": r["spent_micros"],
                              "limit_micros": by_id[r["budget_id"]].limit_micros,
                              "scope": by_id[r["budget_id"]].scope.value,
                              "scope_value": by_id[r["budget_id"]].scope_value}))
                 for r in fired])
    return len(fired)
