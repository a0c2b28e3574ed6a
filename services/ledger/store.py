"""LedgerStore: the ledger's rules applied inside PostgreSQL transactions.

Every mutating operation follows the same shape (one `_Work` unit per transaction):
1. claim the client-chosen id in `ledger.idempotency_keys` — the first statement, so a
   concurrent duplicate blocks on the unique index until the first commits, then replays;
2. lock the accounts involved with one `SELECT … ORDER BY account_id FOR UPDATE` (a single
   global lock order, so concurrent transactions never deadlock);
3. decide with the domain rules on the locked values — never on a balance read earlier;
4. write entries (COPY), balances, grants, receipts and outbox rows, then commit.

Raw asyncpg rather than SQLAlchemy: this is the hot path (COPY, unnest batches, row locks held
for as short as possible), and the whole store is written in one style.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from services.ledger import domain as d
from tally.kit import metrics, outbox
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid
from tally.kit.log import get_logger
from tally.kit.money import INT64_MAX
from tally.kit.paging import encode_token, page_request

log = get_logger("ledger.store")

_TRANSFER_COLUMNS: Final = (
    "transfer_id", "kind", "debit_account_id", "credit_account_id", "org_id", "amount_micros",
    "actor", "reason", "trace_id", "user_id", "labels", "grant_id", "reservation_id",
    "reverses_transfer_id", "payment_order_id", "created_at", "prev_hash", "entry_hash",
    "org_posted_after", "org_held_after", "org_arrears_after",
)


if TYPE_CHECKING:
    Connection = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )
    Row = asyncpg.Record | Mapping[str, Any]


def utcnow() -> datetime:
    """The store's clock (tests pass their own)."""
    return datetime.now(UTC)


@dataclass(slots=True)
class _Account:
    account_id: str
    kind: d.AccountKind
    org_id: str | None
    balance: int
    held: int
    billing_state: d.BillingState
    last_hash: str
    pinned: bool = False
    dirty: bool = False


class _Work:
    """One transaction's view of the rows it has locked, and what it will write."""

    def __init__(self, conn: Connection, now: datetime, caller: d.Caller) -> None:
        self.conn = conn
        self.now = now
        self.caller = caller
        self.accounts: dict[str, _Account] = {}
        self.entries: list[d.Transfer] = []
        self.grants: dict[str, list[d.Grant]] = {}
        self.dirty_grants: dict[str, d.Grant] = {}
        self.new_grants: list[d.Grant] = []
        self.outbox: list[tuple[Any, ...]] = []
        self.state_changes: list[tuple[Any, ...]] = []
        self.settled: list[tuple[str, str]] = []  # (reservation id, org) settled here

    # -- idempotency ---------------------------------------------------------------------

    async def claim(self, key: str, request_hash: str) -> bool:
        """True if this transaction owns `key`; False if an earlier one did the same request."""
        claimed = await self.conn.fetchval(
            "INSERT INTO ledger.idempotency_keys (key, request_hash) VALUES ($1, $2) "
            "ON CONFLICT (key) DO NOTHING RETURNING true",
            key, request_hash,
        )
        if claimed:
            return True
        stored = await self.conn.fetchval(
            "SELECT request_hash FROM ledger.idempotency_keys WHERE key = $1", key
        )
        if stored != request_hash:
            raise d.reused(key)
        return False

    # -- accounts ------------------------------------------------------------------------

    async def lock(self, account_ids: Iterable[str], *, open_orgs: Iterable[str] = ()) -> None:
        """Locks accounts in the global order; opens the credit/arrears accounts of `open_orgs`."""
        to_open = sorted(set(open_orgs))
        if to_open:  # only orgs without accounts: most batches open none
            known = await self.conn.fetch(
                "SELECT org_id FROM ledger.accounts WHERE account_id = ANY($1::text[])",
                [d.credit_account(o) for o in to_open])
            to_open = sorted(set(to_open) - {r["org_id"] for r in known})
        if to_open:
            await self.conn.execute(
                "INSERT INTO ledger.accounts (account_id, kind, org_id) "
                "SELECT 'org:' || o, 'ORG_CREDIT', o FROM unnest($1::text[]) o "
                "UNION ALL SELECT 'arrears:' || o, 'ARREARS', o FROM unnest($1::text[]) o "
                "ON CONFLICT (account_id) DO NOTHING",
                to_open,
            )
        wanted = sorted(set(account_ids) - self.accounts.keys())
        if not wanted:
            return
        rows = await self.conn.fetch(
            "SELECT account_id, kind, org_id, balance_micros, held_micros, billing_state, "
            "last_hash, billing_state_pinned FROM ledger.accounts "
            "WHERE account_id = ANY($1::text[]) ORDER BY account_id FOR UPDATE",
            wanted,
        )
        opened = set(to_open)
        for r in rows:
            self.accounts[r["account_id"]] = _Account(
                r["account_id"], d.AccountKind(r["kind"]), r["org_id"], r["balance_micros"],
                r["held_micros"], d.BillingState(r["billing_state"]), r["last_hash"],
                r["billing_state_pinned"],
                # a new org's state is decided by the rules at once (no credit: THROTTLED)
                dirty=r["org_id"] in opened and r["kind"] == d.AccountKind.ORG_CREDIT.value,
            )

    async def lock_orgs(self, org_ids: Iterable[str], *, system: Iterable[d.AccountKind] = (),
                        open_missing: bool = False, field: str = "org_id") -> None:
        """Locks each org's credit and arrears accounts (and its shards of `system` accounts)."""
        orgs = sorted(set(org_ids))
        ids = [d.credit_account(o) for o in orgs] + [d.arrears_account(o) for o in orgs]
        ids += [d.system_account(k, o) for k in system for o in orgs]
        await self.lock(ids, open_orgs=orgs if open_missing else ())
        for org in orgs:
            if d.credit_account(org) not in self.accounts:
                raise invalid(field, f"unknown org {org!r}")

    def org(self, org_id: str) -> _Account:
        return self.accounts[d.credit_account(org_id)]

    def balance(self, org_id: str) -> tuple[int, int, int]:
        """(posted, held, arrears) of a locked org."""
        credit = self.org(org_id)
        arrears = -self.accounts[d.arrears_account(org_id)].balance
        return credit.balance, credit.held, arrears

    def available(self, org_id: str) -> int:
        credit = self.org(org_id)
        return credit.balance - credit.held

    # -- entries -------------------------------------------------------------------------

    def post(self, kind: d.TransferKind, debit: str, credit: str, org_id: str, amount: int,
             transfer_id: str, *, reason: str = "", grant_id: str = "",
             reservation_id: str = "", reverses: str = "", payment_order_id: str = "",
             labels: Mapping[str, str] | None = None) -> d.Transfer:
        """Moves `amount` from `debit` to `credit` and appends the entry to the org's chain."""
        debit_acc, credit_acc = self.accounts[debit], self.accounts[credit]
        debit_acc.balance -= amount
        credit_acc.balance += amount
        debit_acc.dirty = credit_acc.dirty = True
        head = self.org(org_id)
        prev = head.last_hash
        actor = self.caller.actor
        entry_hash = d.chain_hash(prev, d.canonical_entry(
            transfer_id, kind.value, debit, credit, org_id, amount, actor, reason, self.now))
        head.last_hash = entry_hash
        head.dirty = True
        posted, held, arrears = self.balance(org_id)
        transfer = d.Transfer(
            transfer_id, kind, debit, credit, org_id, amount, actor, reason,
            self.caller.trace_id, self.caller.user_id,
            dict(self.caller.labels if labels is None else labels), grant_id, reservation_id,
            reverses, payment_order_id, self.now, prev, entry_hash, posted, held, arrears,
        )
        self.entries.append(transfer)
        return transfer

    # -- grants --------------------------------------------------------------------------

    async def preload_grants(self, org_ids: Sequence[str]) -> None:
        """Locks and loads the open grants of many orgs in one query."""
        wanted = [o for o in org_ids if o not in self.grants]
        if not wanted:
            return
        for org in wanted:
            self.grants[org] = []
        for r in await self.conn.fetch(
                "SELECT * FROM ledger.grants WHERE org_id = ANY($1::text[]) "
                "AND remaining_micros > 0 ORDER BY grant_id FOR UPDATE", wanted):
            self.grants[r["org_id"]].append(_grant(r))

    async def grants_of(self, org_id: str) -> list[d.Grant]:
        if org_id not in self.grants:
            rows = await self.conn.fetch(
                "SELECT * FROM ledger.grants WHERE org_id = $1 AND remaining_micros > 0 "
                "FOR UPDATE", org_id)
            self.grants[org_id] = [_grant(r) for r in rows]
        return self.grants[org_id]

    async def burn(self, org_id: str, amount: int) -> None:
        """Takes `amount` from the org's grants in burn order."""
        taken = d.allocate(await self.grants_of(org_id), amount)
        if sum(t for _, t in taken) != amount:
            # posted credit is always the sum of open grants; anything else is a bug
            raise TallyError(Reason.INTERNAL, f"grants of {org_id} do not cover {amount}")
        for grant, take in taken:
            grant.remaining_micros -= take
            self.dirty_grants[grant.grant_id] = grant

    async def add_grant(self, org_id: str, kind: d.GrantKind, spec: d.GrantSpec | None,
                        amount: int, transfer_id: str) -> d.Grant:
        priority = spec.priority if spec and spec.priority else d.DEFAULT_PRIORITY[kind]
        grant = d.Grant(f"grant:{transfer_id}", org_id, kind, priority, amount, amount,
                        spec.expires_at if spec else None, transfer_id, self.now)
        (await self.grants_of(org_id)).append(grant)
        self.new_grants.append(grant)
        return grant

    async def credit_org(self, kind: d.TransferKind, org_id: str, amount: int, transfer_id: str,
                         spec: d.GrantSpec | None, reason: str,
                         payment_order_id: str = "") -> d.Transfer:
        """Adds credit as a new grant, then settles arrears from it first."""
        grant_kind = spec.kind if spec else d.GRANT_OF_KIND[kind]
        if self.org(org_id).balance + amount > INT64_MAX:
            raise invalid("amount_micros", "would overflow the org's int64 balance")
        source = d.system_account(d.CREDIT_SOURCE[kind], org_id)
        await self.lock([source])
        grant = await self.add_grant(org_id, grant_kind, spec, amount, transfer_id)
        transfer = self.post(kind, source, d.credit_account(org_id), org_id, amount,
                             transfer_id, reason=reason, grant_id=grant.grant_id,
                             payment_order_id=payment_order_id)
        await self.settle_arrears(org_id, transfer_id)
        return transfer

    async def settle_arrears(self, org_id: str, cause_id: str) -> None:
        """Usage owed is paid from the next credit that arrives, before anything else."""
        _, _, arrears = self.balance(org_id)
        amount = min(arrears, self.available(org_id))
        if amount > 0:
            await self.burn(org_id, amount)
            self.post(d.TransferKind.USAGE, d.credit_account(org_id), d.arrears_account(org_id),
                      org_id, amount, f"{cause_id}:settle-arrears",
                      reason="arrears settled from new credit")

    async def debit_org(self, kind: d.TransferKind, org_id: str, amount: int, transfer_id: str,
                        reason: str, field: str = "amount_micros") -> d.Transfer:
        """Removes credit that is available now, or refuses (no overdraft, ever)."""
        available = self.available(org_id)
        if amount > available:
            raise d.insufficient(available, amount, field)
        sink = d.system_account(d.DEBIT_SINK[kind], org_id)
        await self.lock([sink])
        await self.burn(org_id, amount)
        return self.post(kind, d.credit_account(org_id), sink, org_id, amount, transfer_id,
                         reason=reason)

    # -- outbox --------------------------------------------------------------------------

    def emit(self, org_id: str, kind: d.OutboxEventType, **attributes: str) -> None:
        _, _, arrears = self.balance(org_id)
        self.outbox.append((
            str(uuid.uuid4()), org_id, kind.value, self.now, self.caller.trace_id,
            self.available(org_id), arrears, self.org(org_id).billing_state.value,
            json.dumps(attributes),
        ))

    def emit_balance_changes(self) -> None:
        """One BALANCE_CHANGED per org whose posted credit moved in this transaction."""
        for org_id in sorted({e.org_id for e in self.entries}):
            self.emit(org_id, d.OutboxEventType.BALANCE_CHANGED)

    # -- billing state ---------------------------------------------------------------------

    def state_of(self, org_id: str) -> str | None:
        """The org's billing state as this transaction leaves it (None if not locked)."""
        account = self.accounts.get(d.credit_account(org_id))
        return account.billing_state.value if account else None

    def follow_the_money(self) -> None:
        """Moves each touched, unpinned org to the state its balances call for, recording the
        transition and its cause (d.automatic_billing_state)."""
        for account in list(self.accounts.values()):
            org = account.org_id
            if (account.kind is not d.AccountKind.ORG_CREDIT or account.pinned or org is None
                    or d.arrears_account(org) not in self.accounts):
                continue
            if not (account.dirty or self.accounts[d.arrears_account(org)].dirty):
                continue
            posted, _, arrears = self.balance(org)
            state, cause = d.automatic_billing_state(posted, arrears)
            if state is account.billing_state:
                continue
            previous = account.billing_state
            account.billing_state = state
            account.dirty = True
            self.state_changes.append((f"auto:{uuid.uuid4()}", org, previous.value,
                                       state.value, cause, self.caller.actor, self.now))
            self.emit(org, d.OutboxEventType.BILLING_STATE_CHANGED,
                      previous_state=previous.value, cause=cause)

    # -- write -----------------------------------------------------------------------------

    async def flush(self, *, follow_the_money: bool = True) -> None:
        conn = self.conn
        if follow_the_money:
            self.follow_the_money()
        if self.state_changes:
            await conn.executemany(
                "INSERT INTO ledger.billing_state_changes (request_id, org_id, previous_state, "
                "state, cause, actor, changed_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                self.state_changes)
        if self.entries:
            await insert_rows(
                conn, "transfers", (*_TRANSFER_COLUMNS, "org_billing_state_after"),
                [(*_transfer_record(e), self.state_of(e.org_id)) for e in self.entries])
        dirty = [a for a in self.accounts.values() if a.dirty]
        if dirty:
            await conn.execute(
                "UPDATE ledger.accounts a SET balance_micros = u.balance, held_micros = u.held, "
                "billing_state = u.state, last_hash = u.last_hash, "
                "billing_state_pinned = u.pinned "
                "FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], "
                "$6::boolean[]) AS u(id, balance, held, state, last_hash, pinned) "
                "WHERE a.account_id = u.id",
                [a.account_id for a in dirty], [a.balance for a in dirty],
                [a.held for a in dirty], [a.billing_state.value for a in dirty],
                [a.last_hash for a in dirty], [a.pinned for a in dirty],
            )
        if self.settled:
            await conn.execute(
                "UPDATE ledger.reservations r SET settled_billing_state = u.state "
                "FROM unnest($1::text[], $2::text[]) AS u(id, state) "
                "WHERE r.reservation_id = u.id",
                [r for r, _ in self.settled], [self.state_of(o) for _, o in self.settled])
        new_ids = {g.grant_id for g in self.new_grants}
        if self.new_grants:
            await insert_rows(
                conn, "grants",
                ("grant_id", "org_id", "kind", "priority", "original_micros",
                 "remaining_micros", "expires_at", "source_transfer_id", "created_at"),
                [(g.grant_id, g.org_id, g.kind.value, g.priority, g.original_micros,
                  g.remaining_micros, g.expires_at, g.source_transfer_id, g.created_at)
                 for g in self.new_grants])
        changed = [g for g in self.dirty_grants.values() if g.grant_id not in new_ids]
        if changed:
            await conn.execute(
                "UPDATE ledger.grants g SET remaining_micros = u.remaining "
                "FROM unnest($1::text[], $2::bigint[]) AS u(id, remaining) "
                "WHERE g.grant_id = u.id",
                [g.grant_id for g in changed], [g.remaining_micros for g in changed])
        if self.outbox:
            await insert_rows(
                conn, "outbox",
                ("event_id", "org_id", "type", "occurred_at", "trace_id",
                 "available_micros_after", "arrears_micros", "billing_state", "attributes"),
                self.outbox)


COPY_FROM_ROWS: Final = 32
"""Fewer rows go in as one pipelined INSERT: COPY's extra round trips (asyncpg introspects
the table, then streams) dominate a single Transfer or Reserve."""


async def insert_rows(conn: Connection, table: str, columns: Sequence[str],
                      records: Sequence[Sequence[Any]]) -> None:
    """Appends rows to ledger.<table>: COPY for a batch, INSERT for a few."""
    if len(records) >= COPY_FROM_ROWS:
        await conn.copy_records_to_table(table, schema_name="ledger", columns=columns,
                                         records=records)
        return
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    await conn.executemany(
        f"INSERT INTO ledger.{table} ({', '.join(columns)}) VALUES ({placeholders})", records)


def _transfer_record(t: d.Transfer) -> tuple[Any, ...]:
    return (t.transfer_id, t.kind.value, t.debit_account_id, t.credit_account_id, t.org_id,
            t.amount_micros, t.actor, t.reason, t.trace_id, t.user_id, json.dumps(t.labels),
            t.grant_id, t.reservation_id, t.reverses_transfer_id, t.payment_order_id,
            t.created_at, t.prev_hash, t.entry_hash, t.org_posted_after, t.org_held_after,
            t.org_arrears_after)


def _transfer(r: Row) -> d.Transfer:
    labels = r["labels"]
    return d.Transfer(
        r["transfer_id"], d.TransferKind(r["kind"]), r["debit_account_id"],
        r["credit_account_id"], r["org_id"], r["amount_micros"], r["actor"], r["reason"],
        r["trace_id"], r["user_id"], json.loads(labels) if isinstance(labels, str) else labels,
        r["grant_id"], r["reservation_id"], r["reverses_transfer_id"], r["payment_order_id"],
        r["created_at"], r["prev_hash"], r["entry_hash"], r["org_posted_after"],
        r["org_held_after"], r["org_arrears_after"],
    )


def _grant(r: Row) -> d.Grant:
    return d.Grant(r["grant_id"], r["org_id"], d.GrantKind(r["kind"]), r["priority"],
                   r["original_micros"], r["remaining_micros"], r["expires_at"],
                   r["source_transfer_id"], r["created_at"])


def _reservation(r: Row) -> d.Reservation:
    return d.Reservation(r["reservation_id"], r["org_id"], r["amount_micros"],
                         d.ReservationState(r["state"]), r["expires_at"], r["captured_micros"],
                         r["arrears_micros"], r["capture_transfer_id"], r["created_at"],
                         r["settled_at"])


def _snapshot_balance(t: d.Transfer, state: d.BillingState) -> d.Balance:
    return d.Balance(t.org_id, t.org_posted_after, t.org_held_after, t.org_arrears_after,
                     state, (), t.created_at)


class LedgerStore:
    """The Postgres implementation of the ledger."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.clock = clock

    # -- transfers -------------------------------------------------------------------------

    async def transfer(self, cmd: d.TransferCommand, caller: d.Caller
                       ) -> tuple[d.Transfer, d.Balance]:
        """Posts one transfer, idempotently on its transfer_id."""
        results = await self.transfer_batch(None, [cmd], caller)
        return results[0]

    async def transfer_batch(self, batch_id: str | None, cmds: Sequence[d.TransferCommand],
                             caller: d.Caller) -> list[tuple[d.Transfer, d.Balance]]:
        """Posts transfers atomically, in order; replays return the original transfers."""
        if batch_id is not None:
            d.raise_if([d.check_id("batch_id", batch_id)])
            if len(cmds) > d.MAX_TRANSFER_BATCH:
                raise TallyError(Reason.BATCH_TOO_LARGE,
                                 f"transfers: at most {d.MAX_TRANSFER_BATCH} per batch",
                                 field="transfers")
            if not cmds:
                raise invalid("transfers", "must not be empty")
        d.raise_if(v for i, cmd in enumerate(cmds) for v in d.validate_transfer(
            cmd, f"transfers[{i}]." if batch_id is not None else ""))
        async with self.pool.acquire() as conn, conn.transaction():
            work = _Work(conn, self.clock(), caller)
            if batch_id is not None and not await work.claim(
                    f"transfer-batch:{batch_id}", d.fingerprint(list(cmds))):
                ids = await conn.fetchval(
                    "SELECT transfer_ids FROM ledger.transfer_batches WHERE batch_id = $1",
                    batch_id)
                return [await self._replay_transfer(conn, tid) for tid in ids]
            results: list[d.Transfer | None] = []
            for i, cmd in enumerate(cmds):
                prefix = f"transfers[{i}]." if batch_id is not None else ""
                if not await work.claim(f"transfer:{cmd.transfer_id}", d.fingerprint(cmd)):
                    results.append(None)
                    continue
                results.append(await self._apply(work, cmd, prefix))
            work.emit_balance_changes()
            await work.flush()
            if batch_id is not None:
                await conn.execute(
                    "INSERT INTO ledger.transfer_batches (batch_id, transfer_ids) "
                    "VALUES ($1, $2)", batch_id, [c.transfer_id for c in cmds])
            out: list[tuple[d.Transfer, d.Balance]] = []
            for cmd, posted in zip(cmds, results, strict=True):
                if posted is None:
                    out.append(await self._replay_transfer(conn, cmd.transfer_id))
                else:
                    posted_now, held, arrears = work.balance(posted.org_id)
                    state = work.org(posted.org_id).billing_state
                    out.append((posted, d.Balance(posted.org_id, posted_now, held, arrears,
                                                  state, (), work.now)))
            return out

    async def _replay_transfer(self, conn: Connection, transfer_id: str
                               ) -> tuple[d.Transfer, d.Balance]:
        # The balance after a transfer includes the arrears it settled (a follow-up entry).
        rows = await conn.fetch(
            "SELECT * FROM ledger.transfers WHERE transfer_id = ANY($1::text[]) ORDER BY seq",
            [transfer_id, f"{transfer_id}:settle-arrears"])
        assert rows, transfer_id
        transfer, last = _transfer(rows[0]), _transfer(rows[-1])
        state = rows[-1]["org_billing_state_after"] or await conn.fetchval(
            "SELECT billing_state FROM ledger.accounts WHERE account_id = $1",
            d.credit_account(transfer.org_id))
        return transfer, _snapshot_balance(last, d.BillingState(state))

    async def _apply(self, work: _Work, cmd: d.TransferCommand, prefix: str) -> d.Transfer:
        kind, org = cmd.kind, cmd.org_id
        field = f"{prefix}amount_micros"
        if kind is d.TransferKind.REVERSAL:
            return await self._reverse(work, cmd, prefix)
        if kind in d.CREDIT_SOURCE and (kind is not d.TransferKind.MANUAL_ADJUSTMENT
                                        or cmd.amount_micros > 0):
            await work.lock_orgs([org], open_missing=True, field=f"{prefix}org_id")
            return await work.credit_org(kind, org, abs(cmd.amount_micros), cmd.transfer_id,
                                         cmd.grant, cmd.reason)
        await work.lock_orgs([org], field=f"{prefix}org_id")
        return await work.debit_org(kind, org, abs(cmd.amount_micros), cmd.transfer_id,
                                    cmd.reason, field)

    async def _reverse(self, work: _Work, cmd: d.TransferCommand, prefix: str) -> d.Transfer:
        row = await work.conn.fetchrow(
            "SELECT * FROM ledger.transfers WHERE transfer_id = $1 AND org_id = $2",
            cmd.reverses_transfer_id, cmd.org_id)
        if row is None:
            raise TallyError(Reason.NOT_FOUND,
                             f"{prefix}reverses_transfer_id: no transfer "
                             f"{cmd.reverses_transfer_id!r} for this org",
                             field=f"{prefix}reverses_transfer_id")
        original = _transfer(row)
        if original.kind is d.TransferKind.REVERSAL:
            raise invalid(f"{prefix}reverses_transfer_id", "a reversal cannot be reversed")
        if cmd.amount_micros not in (0, original.amount_micros):
            raise invalid(f"{prefix}amount_micros",
                          f"must be 0 or the original amount {original.amount_micros}")
        amount = original.amount_micros
        org = cmd.org_id
        await work.lock_orgs([org], field=f"{prefix}org_id")
        await work.lock([original.debit_account_id, original.credit_account_id])
        credit_id = d.credit_account(org)
        if original.credit_account_id == credit_id:
            # Taking back credit that was granted: only what is still unspent and unheld.
            available = work.available(org)
            grant = next((g for g in await work.grants_of(org)
                          if g.grant_id == original.grant_id), None)
            remaining = grant.remaining_micros if grant else 0
            if amount > min(available, remaining):
                raise d.insufficient(min(available, remaining), amount,
                                     f"{prefix}reverses_transfer_id")
            assert grant is not None
            grant.remaining_micros -= amount
            work.dirty_grants[grant.grant_id] = grant
            grant_id = grant.grant_id
        elif original.debit_account_id == credit_id:
            grant_id = (await work.add_grant(org, d.GrantKind.PURCHASED, cmd.grant, amount,
                                             cmd.transfer_id)).grant_id
        else:
            grant_id = ""
        transfer = work.post(d.TransferKind.REVERSAL, original.credit_account_id,
                             original.debit_account_id, org, amount, cmd.transfer_id,
                             reason=cmd.reason, grant_id=grant_id,
                             reverses=original.transfer_id)
        if original.debit_account_id == credit_id:
            await work.settle_arrears(org, cmd.transfer_id)
        return transfer

    # -- reservations ----------------------------------------------------------------------

    async def reserve(self, reservation_id: str, org_id: str, amount: int, ttl: timedelta,
                      caller: d.Caller) -> tuple[d.Reservation, int, d.BillingState]:
        """Holds credit only if available covers it, decided under the org's row lock.
        Returns the hold, available credit after it and the org's billing state."""
        d.raise_if([d.check_id("reservation_id", reservation_id), d.check_id("org_id", org_id),
                    d.check_amount("amount_micros", amount)])
        async with self.pool.acquire() as conn, conn.transaction():
            work = _Work(conn, self.clock(), caller)
            if not await work.claim(f"reserve:{reservation_id}",
                                    d.fingerprint(org_id, amount, ttl.total_seconds())):
                # the original answer: the hold as it was made, and available right after it
                row = await conn.fetchrow(
                    "SELECT * FROM ledger.reservations WHERE reservation_id = $1", reservation_id)
                assert row is not None  # the claim and the row commit together
                made = replace(_reservation(row), state=d.ReservationState.HELD,
                               captured_micros=0, arrears_micros=0, capture_transfer_id="",
                               settled_at=None)
                return (made, row["reserved_available_micros"],
                        d.BillingState(row["reserved_billing_state"] or "ACTIVE"))
            await work.lock_orgs([org_id])
            account = work.org(org_id)
            if account.billing_state is d.BillingState.READ_ONLY:
                raise TallyError(Reason.ACCOUNT_READ_ONLY,
                                 f"org {org_id} is read-only: no new holds",
                                 metadata={"org_id": org_id})
            available = work.available(org_id)
            if amount > available:
                raise d.insufficient(available, amount, "amount_micros")
            account.held += amount
            account.dirty = True
            reservation = d.Reservation(reservation_id, org_id, amount, d.ReservationState.HELD,
                                        work.now + ttl, 0, 0, "", work.now, None)
            await conn.execute(
                "INSERT INTO ledger.reservations (reservation_id, org_id, amount_micros, state, "
                "expires_at, created_at, reserved_available_micros, reserved_billing_state) "
                "VALUES ($1, $2, $3, 'HELD', $4, $5, $6, $7)",
                reservation_id, org_id, amount, reservation.expires_at, work.now,
                work.available(org_id), account.billing_state.value)
            await work.flush()
            return reservation, work.available(org_id), account.billing_state

    async def _reservation(self, conn: Connection, reservation_id: str, org_id: str,
                           *, for_update: bool = False) -> d.Reservation:
        row = await conn.fetchrow(
            "SELECT * FROM ledger.reservations WHERE reservation_id = $1 AND org_id = $2"
            + (" FOR UPDATE" if for_update else ""), reservation_id, org_id)
        if row is None:
            raise TallyError(Reason.RESERVATION_NOT_FOUND,
                             f"reservation_id: no reservation {reservation_id!r} for org "
                             f"{org_id!r}", field="reservation_id")
        return _reservation(row)

    async def capture(self, reservation_id: str, org_id: str, actual: int, caller: d.Caller
                      ) -> tuple[d.Reservation, d.Transfer | None, d.Balance]:
        """Posts the actual cost and frees the hold; the excess beyond credit is arrears."""
        d.raise_if([d.check_id("reservation_id", reservation_id), d.check_id("org_id", org_id),
                    d.check_amount("actual_micros", actual, allow_zero=True)])
        async with self.pool.acquire() as conn, conn.transaction():
            work = _Work(conn, self.clock(), caller)
            await work.lock_orgs([org_id], system=[d.AccountKind.REVENUE])
            held = await self._reservation(conn, reservation_id, org_id, for_update=True)
            if held.state is d.ReservationState.CAPTURED:
                if held.captured_micros != actual:
                    raise TallyError(
                        Reason.RESERVATION_ALREADY_CAPTURED,
                        f"reservation {reservation_id} was captured for "
                        f"{held.captured_micros}, not {actual}",
                        metadata={"captured_micros": str(held.captured_micros)})
                transfer = None
                if held.capture_transfer_id.startswith("capture:"):
                    transfer, _ = await self._replay_transfer(conn, held.capture_transfer_id)
                return held, transfer, await self._settled_balance(conn, held)
            self._refuse_unless_held(held, work.now)
            account = work.org(org_id)
            account.held -= held.amount_micros
            account.dirty = True
            debited, arrears = d.split_debit(work.available(org_id), actual)
            transfer = None
            transfer_id = f"capture:{reservation_id}"
            if debited:
                await work.burn(org_id, debited)
                transfer = work.post(d.TransferKind.USAGE, d.credit_account(org_id),
                                     d.system_account(d.AccountKind.REVENUE, org_id), org_id,
                                     debited,
                                     transfer_id, reservation_id=reservation_id)
            if arrears:
                arrears_transfer = work.post(
                    d.TransferKind.USAGE, d.arrears_account(org_id),
                    d.system_account(d.AccountKind.REVENUE, org_id), org_id, arrears,
                    f"{transfer_id}:arrears", reservation_id=reservation_id,
                    reason="usage beyond available credit")
                transfer = transfer or arrears_transfer
                work.emit(org_id, d.OutboxEventType.ARREARS_RECORDED,
                          arrears_micros=str(arrears), reservation_id=reservation_id)
            captured = replace(held, state=d.ReservationState.CAPTURED, captured_micros=actual,
                               arrears_micros=arrears,
                               capture_transfer_id=transfer.transfer_id if transfer else "",
                               settled_at=work.now)
            posted_after, held_after, arrears_after = work.balance(org_id)
            await conn.execute(
                "UPDATE ledger.reservations SET state = 'CAPTURED', captured_micros = $2, "
                "arrears_micros = $3, capture_transfer_id = $4, settled_at = $5, "
                "settled_posted_micros = $6, settled_held_micros = $7, "
                "settled_arrears_micros = $8 WHERE reservation_id = $1",
                reservation_id, actual, arrears, captured.capture_transfer_id, work.now,
                posted_after, held_after, arrears_after)
            work.settled.append((reservation_id, org_id))
            work.emit_balance_changes()
            await work.flush()
            posted, held_now, arrears_now = work.balance(org_id)
            return captured, transfer, d.Balance(org_id, posted, held_now, arrears_now,
                                                 account.billing_state, (), work.now)

    @staticmethod
    async def _settled_balance(conn: Connection, held: d.Reservation) -> d.Balance:
        """The balance right after a reservation was settled, as its settle answered it."""
        row = await conn.fetchrow(
            "SELECT r.settled_posted_micros, r.settled_held_micros, r.settled_arrears_micros, "
            "coalesce(r.settled_billing_state, a.billing_state) AS billing_state "
            "FROM ledger.reservations r JOIN ledger.accounts a "
            "ON a.account_id = 'org:' || r.org_id WHERE r.reservation_id = $1",
            held.reservation_id)
        assert row is not None
        return d.Balance(held.org_id, row["settled_posted_micros"], row["settled_held_micros"],
                         row["settled_arrears_micros"], d.BillingState(row["billing_state"]), (),
                         held.settled_at)

    @staticmethod
    def _refuse_unless_held(held: d.Reservation, now: datetime) -> None:
        if held.state is d.ReservationState.RELEASED:
            raise TallyError(Reason.RESERVATION_ALREADY_RELEASED,
                             f"reservation {held.reservation_id} was released")
        if held.state is d.ReservationState.EXPIRED or held.is_expired(now):
            raise TallyError(Reason.RESERVATION_EXPIRED,
                             f"reservation {held.reservation_id} expired at "
                             f"{held.expires_at.isoformat()}")

    async def release(self, reservation_id: str, org_id: str, caller: d.Caller
                      ) -> tuple[d.Reservation, int]:
        """Frees a hold; releasing an already released or expired one changes nothing."""
        d.raise_if([d.check_id("reservation_id", reservation_id), d.check_id("org_id", org_id)])
        async with self.pool.acquire() as conn, conn.transaction():
            work = _Work(conn, self.clock(), caller)
            await work.lock_orgs([org_id])
            held = await self._reservation(conn, reservation_id, org_id, for_update=True)
            if held.state is d.ReservationState.CAPTURED:
                raise TallyError(Reason.RESERVATION_ALREADY_CAPTURED,
                                 f"reservation {reservation_id} was captured")
            if held.state is not d.ReservationState.HELD:
                settled = await self._settled_balance(conn, held)
                return held, settled.available_micros
            state = (d.ReservationState.EXPIRED if held.is_expired(work.now)
                     else d.ReservationState.RELEASED)
            released = await self._free_hold(work, held, state)
            await work.flush()
            return released, work.available(org_id)

    async def _free_hold(self, work: _Work, held: d.Reservation, state: d.ReservationState
                         ) -> d.Reservation:
        account = work.org(held.org_id)
        account.held -= held.amount_micros
        account.dirty = True
        posted, held_now, arrears = work.balance(held.org_id)
        await work.conn.execute(
            "UPDATE ledger.reservations SET state = $2, settled_at = $3, "
            "settled_posted_micros = $4, settled_held_micros = $5, settled_arrears_micros = $6 "
            "WHERE reservation_id = $1", held.reservation_id, state.value, work.now,
            posted, held_now, arrears)
        work.settled.append((held.reservation_id, held.org_id))
        return replace(held, state=state, settled_at=work.now)

    async def get_reservation(self, reservation_id: str, org_id: str) -> d.Reservation:
        """One reservation."""
        async with self.pool.acquire() as conn:
            return await self._reservation(conn, reservation_id, org_id)

    async def expire_reservations(self, limit: int = 500) -> int:
        """Releases holds whose ttl has passed (the sweeper); returns how many."""
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT reservation_id, org_id FROM ledger.reservations "
                "WHERE state = 'HELD' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
                now, limit)
            if not rows:
                return 0
            work = _Work(conn, now, d.Caller(actor="service:ledger-sweeper"))
            await work.lock_orgs([r["org_id"] for r in rows])
            expired = 0
            for r in rows:
                held = await self._reservation(conn, r["reservation_id"], r["org_id"],
                                               for_update=True)
                if held.is_expired(now):  # a capture may have won the race
                    await self._free_hold(work, held, d.ReservationState.EXPIRED)
                    work.emit(held.org_id, d.OutboxEventType.RESERVATION_EXPIRED,
                              reservation_id=held.reservation_id)
                    expired += 1
            await work.flush()
            return expired

    # -- grants ----------------------------------------------------------------------------

    async def expire_grants(self, limit: int = 500) -> int:
        """Posts EXPIRY transfers for what is left of expired grants; returns how many.

        Credit held by open reservations is not expired yet: that would let available go
        negative. It stays on the grant and burns first (it expires soonest) or expires on a
        later pass once the hold is released.
        """
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT grant_id, org_id FROM ledger.grants WHERE remaining_micros > 0 "
                "AND expires_at <= $1 ORDER BY expires_at LIMIT $2", now, limit)
            if not rows:
                return 0
            work = _Work(conn, now, d.Caller(actor="service:ledger-expiry"))
            await work.lock_orgs([r["org_id"] for r in rows],
                                 system=[d.AccountKind.EXPIRY])
            expired = 0
            for r in rows:
                org = r["org_id"]
                grant = next(g for g in await work.grants_of(org) if g.grant_id == r["grant_id"])
                amount = min(grant.remaining_micros, work.available(org))
                if amount <= 0:
                    continue
                grant.remaining_micros -= amount
                work.dirty_grants[grant.grant_id] = grant
                work.post(d.TransferKind.EXPIRY, d.credit_account(org),
                          d.system_account(d.AccountKind.EXPIRY, org), org, amount,
                          f"expiry:{grant.grant_id}:{grant.remaining_micros}",
                          reason=f"grant {grant.grant_id} expired", grant_id=grant.grant_id)
                expired += 1
            work.emit_balance_changes()
            await work.flush()
            return expired

    # -- usage -----------------------------------------------------------------------------

    async def post_usage_batch(self, batch_id: str, items: Sequence[d.UsageItem],
                               caller: d.Caller) -> list[d.UsageResult]:
        """Debits a batch of rated usage in one transaction: one USAGE transfer per org.

        Usage already happened, so it is never refused: what available credit cannot cover is
        recorded as arrears. Each event is charged once, forever (receipts are keyed by org and
        event id), whatever batch it arrives in.
        """
        d.validate_usage_batch(batch_id, items)
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction():
            work = _Work(conn, self.clock(), caller)
            request_hash = d.fingerprint([(i.event_id, i.org_id, i.cost_micros, i.reservation_id)
                                          for i in items])
            if not await work.claim(f"usage-batch:{batch_id}", request_hash):
                return await self._replay_usage(conn, batch_id, items)
            orgs = sorted({i.org_id for i in items})
            await work.lock_orgs(orgs, system=[d.AccountKind.REVENUE], open_missing=True)
            earlier = await self._receipts_of(conn, items)
            holds = await self._capturable_holds(work, items)
            results: list[d.UsageResult] = []
            debited_by_org: dict[str, int] = defaultdict(int)
            arrears_by_org: dict[str, int] = defaultdict(int)
            receipts: list[tuple[Any, ...]] = []
            captures: list[tuple[str, str, int, int, str]] = []
            for item in items:
                org = item.org_id
                prior = earlier.get((org, item.event_id))
                if prior is not None:
                    results.append(d.UsageResult(
                        item.event_id, prior["transfer_id"], prior["debited_micros"],
                        prior["arrears_micros"], prior["balance_after_micros"], True))
                    continue
                hold = holds.pop(item.reservation_id, None) if item.reservation_id else None
                account = work.org(org)
                if hold is not None:
                    account.held -= hold.amount_micros
                    account.dirty = True
                available = account.balance - debited_by_org[org] - account.held
                debited, arrears = d.split_debit(available, item.cost_micros)
                debited_by_org[org] += debited
                arrears_by_org[org] += arrears
                transfer_id = (f"usage:{batch_id}:{org}" if debited
                               else f"usage:{batch_id}:{org}:arrears" if arrears else "")
                result = d.UsageResult(item.event_id, transfer_id, debited, arrears,
                                       available - debited)
                results.append(result)
                receipts.append((org, item.event_id, batch_id, transfer_id, item.cost_micros,
                                 debited, arrears, result.balance_after_micros))
                if hold is not None:
                    captures.append((hold.reservation_id, org, item.cost_micros, arrears,
                                     transfer_id))
            await work.preload_grants([o for o in orgs if debited_by_org[o]])
            for org in orgs:
                if debited_by_org[org]:
                    await work.burn(org, debited_by_org[org])
                    work.post(d.TransferKind.USAGE, d.credit_account(org),
                              d.system_account(d.AccountKind.REVENUE, org), org,
                              debited_by_org[org], f"usage:{batch_id}:{org}", labels={})
                if arrears_by_org[org]:
                    work.post(d.TransferKind.USAGE, d.arrears_account(org),
                              d.system_account(d.AccountKind.REVENUE, org), org,
                              arrears_by_org[org], f"usage:{batch_id}:{org}:arrears",
                              reason="usage beyond available credit", labels={})
                    work.emit(org, d.OutboxEventType.ARREARS_RECORDED,
                              arrears_micros=str(arrears_by_org[org]), batch_id=batch_id)
            if receipts:
                await conn.copy_records_to_table(
                    "usage_receipts", schema_name="ledger",
                    columns=("org_id", "event_id", "batch_id", "transfer_id", "cost_micros",
                             "debited_micros", "arrears_micros", "balance_after_micros"),
                    records=receipts)
            if captures:
                # A reservation captured by a batch answers a later Capture replay with the
                # balance after the whole batch.
                # (the batch's transfers are already posted to the locked accounts here)
                await conn.execute(
                    "UPDATE ledger.reservations r SET state = 'CAPTURED', "
                    "captured_micros = u.cost, arrears_micros = u.arrears, settled_at = $8, "
                    "capture_transfer_id = u.transfer_id, settled_posted_micros = u.posted, "
                    "settled_held_micros = u.held, settled_arrears_micros = u.owed "
                    "FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], "
                    "$5::bigint[], $6::bigint[], $7::bigint[]) "
                    "AS u(id, cost, arrears, transfer_id, posted, held, owed) "
                    "WHERE r.reservation_id = u.id",
                    [c[0] for c in captures], [c[2] for c in captures], [c[3] for c in captures],
                    [c[4] for c in captures], [work.balance(c[1])[0] for c in captures],
                    [work.balance(c[1])[1] for c in captures],
                    [work.balance(c[1])[2] for c in captures],
                    work.now)
                work.settled.extend((c[0], c[1]) for c in captures)
            work.emit_balance_changes()
            await work.flush()
        metrics.LEDGER_BATCH_ITEMS.observe(len(items))
        metrics.LEDGER_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.CREDITS_DEBITED.inc(sum(debited_by_org.values()))
        metrics.ARREARS_RECORDED.inc(sum(arrears_by_org.values()))
        return results

    async def _capturable_holds(self, work: _Work, items: Sequence[d.UsageItem]
                                ) -> dict[str, d.Reservation]:
        """HELD, unexpired reservations named by the items (others mean a plain debit)."""
        ids = [i.reservation_id for i in items if i.reservation_id]
        if not ids:
            return {}
        owner = {i.reservation_id: i.org_id for i in items if i.reservation_id}
        rows = await work.conn.fetch(
            "SELECT * FROM ledger.reservations WHERE reservation_id = ANY($1::text[]) "
            "ORDER BY reservation_id FOR UPDATE", ids)
        found = (_reservation(r) for r in rows)
        return {r.reservation_id: r for r in found
                if r.org_id == owner[r.reservation_id] and r.state is d.ReservationState.HELD
                and not r.is_expired(work.now)}

    @staticmethod
    async def _receipts_of(conn: Connection, items: Sequence[d.UsageItem]
                           ) -> dict[tuple[str, str], Row]:
        """Receipts of the items' (org, event id) pairs: one primary-key probe per pair.

        LIMIT keeps the lateral subquery from being flattened into a join the planner may
        hash over the whole table; `org = ANY(..) AND event = ANY(..)` would probe the
        cross product (10^6 probes for 1,000 orgs x 1,000 events).
        """
        return {(r["org_id"], r["event_id"]): r for r in await conn.fetch(
            "SELECT r.* FROM unnest($1::text[], $2::text[]) AS u(org_id, event_id), "
            "LATERAL (SELECT * FROM ledger.usage_receipts r WHERE r.org_id = u.org_id "
            "AND r.event_id = u.event_id LIMIT 1) AS r",
            [i.org_id for i in items], [i.event_id for i in items])}

    async def _replay_usage(self, conn: Connection, batch_id: str,
                            items: Sequence[d.UsageItem]) -> list[d.UsageResult]:
        rows = await self._receipts_of(conn, items)
        results = []
        for item in items:
            r = rows[(item.org_id, item.event_id)]
            results.append(d.UsageResult(item.event_id, r["transfer_id"], r["debited_micros"],
                                         r["arrears_micros"], r["balance_after_micros"],
                                         r["batch_id"] != batch_id))
        return results

    # -- billing state ---------------------------------------------------------------------

    async def set_billing_state(self, request_id: str, org_id: str, state: d.BillingState,
                                cause: str, caller: d.Caller
                                ) -> tuple[d.BillingState, d.BillingState, datetime]:
        """Records a billing-state transition (and its cause) in the ledger."""
        d.raise_if([d.check_id("request_id", request_id), d.check_id("org_id", org_id),
                    None if cause.strip() else FieldViolation("cause", "is required")])
        async with self.pool.acquire() as conn, conn.transaction():
            work = _Work(conn, self.clock(), caller)
            if not await work.claim(f"billing-state:{request_id}",
                                    d.fingerprint(org_id, state.value, cause)):
                row = await conn.fetchrow(
                    "SELECT * FROM ledger.billing_state_changes WHERE request_id = $1",
                    request_id)
                assert row is not None  # the claim and the row commit together
                return (d.BillingState(row["previous_state"]), d.BillingState(row["state"]),
                        row["changed_at"])
            await work.lock_orgs([org_id])
            account = work.org(org_id)
            previous = account.billing_state
            account.billing_state = state
            # THROTTLED/READ_ONLY set by hand stay until set ACTIVE, which hands the org back
            # to the automatic rules at its next balance change.
            account.pinned = state is not d.BillingState.ACTIVE
            account.dirty = True
            await conn.execute(
                "INSERT INTO ledger.billing_state_changes (request_id, org_id, previous_state, "
                "state, cause, actor, changed_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                request_id, org_id, previous.value, state.value, cause, caller.actor, work.now)
            if previous is not state:
                work.emit(org_id, d.OutboxEventType.BILLING_STATE_CHANGED,
                          previous_state=previous.value, cause=cause)
            await work.flush(follow_the_money=False)
            return previous, state, work.now

    # -- queries ---------------------------------------------------------------------------

    async def get_balance(self, org_id: str) -> d.Balance:
        """Posted, held, available, arrears, billing state and open grants in burn order."""
        async with self.pool.acquire() as conn:
            return await self._balance(conn, org_id)

    async def _balance(self, conn: Connection, org_id: str) -> d.Balance:
        rows = await conn.fetch(
            "SELECT account_id, balance_micros, held_micros, billing_state "
            "FROM ledger.accounts WHERE account_id = ANY($1::text[])",
            [d.credit_account(org_id), d.arrears_account(org_id)])
        by_id = {r["account_id"]: r for r in rows}
        credit = by_id.get(d.credit_account(org_id))
        if credit is None:
            raise TallyError(Reason.NOT_FOUND, f"org_id: unknown org {org_id!r}",
                             field="org_id")
        grants = sorted((_grant(r) for r in await conn.fetch(
            "SELECT * FROM ledger.grants WHERE org_id = $1 AND remaining_micros > 0", org_id)),
            key=d.burn_order)
        return d.Balance(org_id, credit["balance_micros"], credit["held_micros"],
                         -by_id[d.arrears_account(org_id)]["balance_micros"],
                         d.BillingState(credit["billing_state"]), grants, self.clock())

    async def get_transfer(self, org_id: str, transfer_id: str) -> d.Transfer:
        """One transfer of an org."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM ledger.transfers WHERE transfer_id = $1 AND org_id = $2",
                transfer_id, org_id)
        if row is None:
            raise TallyError(Reason.NOT_FOUND, f"transfer_id: no transfer {transfer_id!r}",
                             field="transfer_id")
        return _transfer(row)

    async def list_transactions(
        self, org_id: str, *, kinds: Sequence[d.TransferKind] = (),
        start: datetime | None = None, end: datetime | None = None, user_id: str = "",
        labels: Mapping[str, str] | None = None, size: int = 0, token: str = "",
    ) -> tuple[list[d.Transfer], str]:
        """An org's transfers, newest first, filtered; keyset-paged on the entry sequence."""
        page = page_request(size, token, kind="seq")
        limit, before = page.page_size, page.position
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.transfers WHERE org_id = $1 "
            "AND ($2::bigint IS NULL OR seq < $2) "
            "AND (cardinality($3::text[]) = 0 OR kind = ANY($3::text[])) "
            "AND ($4::timestamptz IS NULL OR created_at >= $4) "
            "AND ($5::timestamptz IS NULL OR created_at < $5) "
            "AND ($6 = '' OR user_id = $6) AND labels @> $7::jsonb "
            "ORDER BY seq DESC LIMIT $8",
            org_id, before, [k.value for k in kinds], start, end, user_id,
            json.dumps(dict(labels or {})), limit + 1)
        found = rows[:limit]
        next_token = encode_token("seq", found[-1]["seq"]) if len(rows) > limit else ""
        return [_transfer(r) for r in found], next_token

    async def verify(self, org_id: str = "") -> d.ChainReport:
        """Recomputes every org's hash chain, each account's balance, and the zero sum."""
        checked = 0
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            heads = {r["org_id"]: r["last_hash"] for r in await conn.fetch(
                "SELECT org_id, last_hash FROM ledger.accounts WHERE kind = 'ORG_CREDIT' "
                "AND ($1 = '' OR org_id = $1)", org_id)}
            prev: dict[str, str] = {}
            cursor = conn.cursor(
                "SELECT * FROM ledger.transfers WHERE ($1 = '' OR org_id = $1) ORDER BY seq",
                org_id, prefetch=2000)
            async for row in cursor:
                t = _transfer(row)
                expected_prev = prev.get(t.org_id, d.GENESIS_HASH)
                recomputed = d.chain_hash(t.prev_hash, d.canonical_entry(
                    t.transfer_id, t.kind.value, t.debit_account_id, t.credit_account_id,
                    t.org_id, t.amount_micros, t.actor, t.reason, t.created_at))
                if t.prev_hash != expected_prev or recomputed != t.entry_hash:
                    return d.ChainReport(False, checked, t.transfer_id,
                                         f"entry {t.transfer_id} does not match its hash chain")
                prev[t.org_id] = t.entry_hash
                checked += 1
            for org, head in heads.items():
                if prev.get(org, d.GENESIS_HASH) != head:
                    return d.ChainReport(False, checked, "",
                                         f"org {org}: chain head does not match its last entry")
            mismatch = await conn.fetchrow(
                "WITH moved AS ("
                " SELECT credit_account_id AS id, amount_micros AS delta FROM ledger.transfers"
                " UNION ALL SELECT debit_account_id, -amount_micros FROM ledger.transfers) "
                "SELECT a.account_id, a.balance_micros, coalesce(sum(m.delta), 0) AS derived "
                "FROM ledger.accounts a LEFT JOIN moved m ON m.id = a.account_id "
                "WHERE ($1 = '' OR a.org_id = $1) "
                "GROUP BY a.account_id, a.balance_micros "
                "HAVING a.balance_micros <> coalesce(sum(m.delta), 0) LIMIT 1", org_id)
            if mismatch is not None:
                return d.ChainReport(False, checked, "",
                                     f"account {mismatch['account_id']} holds "
                                     f"{mismatch['balance_micros']} but its entries sum to "
                                     f"{mismatch['derived']}")
            total = await conn.fetchval("SELECT coalesce(sum(balance_micros), 0) "
                                        "FROM ledger.accounts")
            if total != 0:
                return d.ChainReport(False, checked, "", f"balances sum to {total}, not 0")
        return d.ChainReport(True, checked)

    # -- outbox ----------------------------------------------------------------------------

    async def seal_outbox(self, limit: int = 5000) -> int:
        """Gives sequences to the outbox rows that can be delivered (kit.outbox.seal)."""
        return await outbox.seal(self.pool, "ledger.outbox", limit)

    async def outbox_after(self, sequence: int, types: Sequence[d.OutboxEventType],
                           limit: int = 500) -> list[d.OutboxEvent]:
        """Outbox events after `sequence`, oldest first."""
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.outbox WHERE sequence > $1 "  # sealed rows only
            "AND (cardinality($2::text[]) = 0 OR type = ANY($2::text[])) "
            "ORDER BY sequence LIMIT $3", sequence, [t.value for t in types], limit)
        return [d.OutboxEvent(
            r["event_id"], r["sequence"], r["org_id"], d.OutboxEventType(r["type"]),
            r["occurred_at"], r["trace_id"], r["available_micros_after"], r["arrears_micros"],
            d.BillingState(r["billing_state"]), json.loads(r["attributes"]))
            for r in rows]
