"""LedgerStore: the ledger's rules applied inside PostgreSQL transactions.

Every mutating operation follows the same shape (one `Work` unit per transaction):
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

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

import asyncpg

from services.ledger import domain as d
from services.ledger import leases
from services.ledger.postings import TRANSFER_COLUMNS
from tally.kit import metrics, outbox
from tally.kit.background import Deadline
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid
from tally.kit.log import get_logger
from tally.kit.money import INT64_MAX
from tally.kit.paging import encode_token, page_request
from tally.kit.telemetry import current_traceparent

log = get_logger("ledger.store")
T = TypeVar("T")

_TRANSFER_COLUMNS: Final = TRANSFER_COLUMNS  # one row shape for every writer
_ENTRY_ORG: Final = _TRANSFER_COLUMNS.index("org_id")
_ENTRY_HASH: Final = _TRANSFER_COLUMNS.index("entry_hash")
_SEALED_COLUMNS: Final = ("org_billing_state_after", "state_seal")
"""What Work's flush adds to each transfer row (Work._sealed_entries)."""


if TYPE_CHECKING:
    Connection = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )
    Row = asyncpg.Record | Mapping[str, Any]


# Sealing announces itself here (every replica's event streams wake on it); every outbox
# insert NOTIFYs OUTBOX_CHANNEL (a trigger, migration 0006), which the sealer waits on.
SEALED_CHANNEL: Final = "ledger_outbox_sealed"
OUTBOX_CHANNEL: Final = "ledger_outbox"


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
    last_seal: str = d.GENESIS_HASH  # the head of the org's state chain (d.state_seal)


_ACCOUNT_KINDS: Final = {k.value: k for k in d.AccountKind}
_BILLING_STATES: Final = {s.value: s for s in d.BillingState}
_GRANT_KINDS: Final = {k.value: k for k in d.GrantKind}

# The credit and arrears accounts of orgs $1 (domain.credit_account, arrears_account) and the
# accounts $2, locked in the global order. Joined to unnest(), not `= ANY(...)`: a generic plan
# made while the table was small filters a seq scan with ANY, a linear search of the array for
# every row (tens of ms for 2,000 ids); a join is a hash or an index probe per id whatever plan
# the statement settled on. The ids are one array (an init plan), not a UNION ALL of unnests:
# a row locked after waiting for another transaction is rechecked against the joined row, and
# that recheck found no row in a UNION ALL (the account was silently left out).
_LOCK_ACCOUNTS: Final = (
    "SELECT a.account_id, a.kind, a.org_id, a.balance_micros, a.held_micros, a.billing_state, "
    "a.last_hash, a.billing_state_pinned, a.last_seal FROM ledger.accounts a "
    "JOIN unnest($2::text[] || ARRAY(SELECT p || o FROM unnest($1::text[]) o, "
    "unnest('{org:,arrears:}'::text[]) p)) AS u(id) ON a.account_id = u.id "
    "ORDER BY a.account_id FOR UPDATE OF a"
)


class Work:
    """One transaction's view of the rows it has locked, and what it will write."""

    def __init__(self, conn: Connection, now: datetime, caller: d.Caller) -> None:
        self.conn = conn
        self.now = now
        self.caller = caller
        self.accounts: dict[str, _Account] = {}
        self.now_iso = now.isoformat()  # as the hash chain spells it
        self.entries: list[tuple[Any, ...]] = []  # transfer rows, in _TRANSFER_COLUMNS order
        self.grants: dict[str, list[d.Grant]] = {}
        self.dirty_grants: dict[str, d.Grant] = {}
        self.new_grants: list[d.Grant] = []
        self.outbox: list[tuple[Any, ...]] = []
        self.state_changes: list[tuple[Any, ...]] = []
        self.settled: list[tuple[str, str]] = []  # (reservation id, org) settled here
        self.event_ids: list[str] = []  # outbox event ids drawn ahead (time_ordered_uuids)
        self.pending: list[asyncio.Future[Any]] = []  # statements sent with `meanwhile`

    # -- idempotency ---------------------------------------------------------------------

    async def claim(self, key: str, request_hash: str) -> bool:
        """True if this transaction owns `key`; False if an earlier one did the same request."""
        (claimed,) = await self.claim_many([(key, request_hash)])
        if isinstance(claimed, TallyError):
            raise claimed
        return bool(claimed)

    async def claim_many(self, requests: Sequence[tuple[str, str] | None]
                         ) -> list[bool | TallyError | None]:
        """`claim` for many (key, request hash) pairs in one statement, inserted in key order
        (so concurrent claims never deadlock). Per request: True if this transaction owns
        its key (the first of those here with that key), False if an earlier one, or the
        first here, is the same request, IDEMPOTENCY_KEY_REUSED if it is another; None where
        no request was given."""
        owner: dict[str, int] = {}
        hash_of: dict[str, str] = {}  # the owner's, then what is stored
        for i, request in enumerate(requests):
            if request is not None and request[0] not in owner:
                owner[request[0]], hash_of[request[0]] = i, request[1]
        keys = sorted(owner)
        claimed = {r[0] for r in await self.conn.fetch(
            "INSERT INTO ledger.idempotency_keys (key, request_hash) "
            "SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (key) DO NOTHING "
            "RETURNING key", keys, [hash_of[k] for k in keys])}
        if len(claimed) < len(keys):
            hash_of.update((r["key"], r["request_hash"]) for r in await self.conn.fetch(
                "SELECT key, request_hash FROM ledger.idempotency_keys WHERE key = ANY($1)",
                [k for k in keys if k not in claimed]))
        claims: list[bool | TallyError | None] = []
        for i, request in enumerate(requests):
            if request is None:
                claims.append(None)
            elif hash_of[request[0]] != request[1]:
                claims.append(d.reused(request[0]))
            else:
                claims.append(owner[request[0]] == i and request[0] in claimed)
        return claims

    # -- accounts ------------------------------------------------------------------------

    async def lock(self, account_ids: Iterable[str] = (), *, orgs: Iterable[str] = (),
                   open_missing: bool = False) -> None:
        """Locks, in the global order, `account_ids` and the credit and arrears accounts of
        `orgs`; with `open_missing`, opens those of orgs that have none.

        Accounts that exist are locked first, in one statement; only orgs found without
        accounts (rare: most batches open none) are then created and their new rows loaded.
        """
        accounts = self.accounts
        wanted_orgs = [o for o in set(orgs) if d.credit_account(o) not in accounts]
        wanted = [a for a in set(account_ids) if a not in accounts]
        if wanted_orgs or wanted:
            self._load(await self.conn.fetch(_LOCK_ACCOUNTS, wanted_orgs, wanted))
        to_open = sorted(o for o in wanted_orgs if d.credit_account(o) not in accounts)
        if not (open_missing and to_open):
            return
        await self.conn.execute(
            "INSERT INTO ledger.accounts (account_id, kind, org_id) "
            "SELECT 'org:' || o, 'ORG_CREDIT', o FROM unnest($1::text[]) o "
            "UNION ALL SELECT 'arrears:' || o, 'ARREARS', o FROM unnest($1::text[]) o "
            "ON CONFLICT (account_id) DO NOTHING",
            to_open,
        )
        self._load(await self.conn.fetch(_LOCK_ACCOUNTS, to_open, []), opened=set(to_open))

    def _load(self, rows: Iterable[asyncpg.Record], opened: Set[str] = frozenset()) -> None:
        kinds, states, accounts = _ACCOUNT_KINDS, _BILLING_STATES, self.accounts
        credit = d.AccountKind.ORG_CREDIT
        for account_id, kind, org_id, balance, held, state, last_hash, pinned, seal in rows:
            account_kind = kinds[kind]
            accounts[account_id] = _Account(
                account_id, account_kind, org_id, balance, held, states[state], last_hash, pinned,
                # a new org's state is decided by the rules at once (no credit: THROTTLED)
                dirty=account_kind is credit and org_id in opened, last_seal=seal,
            )

    async def lock_orgs(self, org_ids: Iterable[str], *, system: Iterable[d.AccountKind] = (),
                        open_missing: bool = False, field: str = "org_id") -> None:
        """Locks each org's credit and arrears accounts (and its shards of `system` accounts)."""
        orgs = sorted(set(org_ids))
        await self.lock({d.system_account(k, o) for k in system for o in orgs}, orgs=orgs,
                        open_missing=open_missing)
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
        caller = self.caller
        labels = dict(caller.labels if labels is None else labels)
        prev, entry_hash, posted, held, arrears = self.append_entry(
            kind, debit, credit, org_id, amount, transfer_id, reason, labels, grant_id,
            reservation_id, reverses, payment_order_id)
        return d.Transfer(
            transfer_id, kind, debit, credit, org_id, amount, caller.actor, reason,
            caller.trace_id, caller.user_id, labels, grant_id, reservation_id, reverses,
            payment_order_id, self.now, prev, entry_hash, posted, held, arrears,
            d.HASH_VERSION,
        )

    def append_entry(self, kind: d.TransferKind, debit: str, credit: str, org_id: str,
                     amount: int, transfer_id: str, reason: str = "",
                     labels: Mapping[str, str] | None = None, grant_id: str = "",
                     reservation_id: str = "", reverses: str = "", payment_order_id: str = ""
                     ) -> tuple[str, str, int, int, int]:
        """`post` without building the Transfer (a batch posts one per org and returns none):
        moves the amount, chains the entry and queues its row. Returns the entry's previous
        and own hash and the org's (posted, held, arrears) after it."""
        accounts, caller = self.accounts, self.caller
        debit_acc, credit_acc = accounts[debit], accounts[credit]
        debit_acc.balance -= amount
        credit_acc.balance += amount
        debit_acc.dirty = credit_acc.dirty = True
        head = accounts[d.credit_account(org_id)]
        prev = head.last_hash
        kind_value, actor = kind.value, caller.actor
        trace_id, user_id = caller.trace_id, caller.user_id
        posted, held = head.balance, head.held
        arrears = -accounts[d.arrears_account(org_id)].balance
        entry_hash = d.chain_hash(prev, d.canonical_entry(
            transfer_id, kind_value, debit, credit, org_id, amount, actor, reason, self.now_iso,
            trace_id=trace_id, user_id=user_id, labels=labels, grant_id=grant_id,
            reservation_id=reservation_id, reverses_transfer_id=reverses,
            payment_order_id=payment_order_id, org_posted_after=posted, org_held_after=held,
            org_arrears_after=arrears))
        head.last_hash = entry_hash
        head.dirty = True
        self.entries.append((
            transfer_id, kind_value, debit, credit, org_id, amount, actor, reason,
            trace_id, user_id, json.dumps(labels) if labels else "{}", grant_id,
            reservation_id, reverses, payment_order_id, self.now, prev, entry_hash, posted,
            held, arrears, d.HASH_VERSION,
        ))
        return prev, entry_hash, posted, held, arrears

    # -- grants --------------------------------------------------------------------------

    async def preload_grants(self, org_ids: Sequence[str]) -> None:
        """Locks and loads the open grants of many orgs in one query."""
        wanted = [o for o in org_ids if o not in self.grants]
        if not wanted:
            return
        grants, kinds, grant = self.grants, _GRANT_KINDS, d.Grant
        for org in wanted:
            grants[org] = []
        for (grant_id, org_id, kind, priority, original, remaining, expires_at, source,
             created_at) in await self.conn.fetch(
                "SELECT g.grant_id, g.org_id, g.kind, g.priority, g.original_micros, "
                "g.remaining_micros, g.expires_at, g.source_transfer_id, g.created_at "
                "FROM unnest($1::text[]) AS u(org_id) JOIN ledger.grants g "
                "ON g.org_id = u.org_id WHERE g.is_open "
                "ORDER BY g.grant_id FOR UPDATE OF g", wanted):
            grants[org_id].append(grant(grant_id, org_id, kinds[kind], priority, original,
                                        remaining, expires_at, source, created_at))

    async def grants_of(self, org_id: str) -> list[d.Grant]:
        if org_id not in self.grants:
            rows = await self.conn.fetch(
                "SELECT * FROM ledger.grants WHERE org_id = $1 AND is_open "
                "FOR UPDATE", org_id)
            self.grants[org_id] = [_grant(r) for r in rows]
        return self.grants[org_id]

    async def burn(self, org_id: str, amount: int) -> None:
        """Takes `amount` from the org's grants in burn order."""
        self.burn_loaded(org_id, await self.grants_of(org_id), amount)

    def burn_loaded(self, org_id: str, grants: list[d.Grant], amount: int) -> None:
        """`burn` from grants already locked and loaded (preload_grants)."""
        if len(grants) == 1 and grants[0].remaining_micros >= amount:  # the usual case
            taken = [(grants[0], amount)]
        else:
            taken = d.allocate(grants, amount)
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
        await leases.reclaim(self, org_id, amount)  # leased credit is the org's to take back
        available = self.available(org_id)
        if amount > available:
            raise d.insufficient(available, amount, field)
        sink = d.system_account(d.DEBIT_SINK[kind], org_id)
        await self.lock([sink])
        await self.burn(org_id, amount)
        return self.post(kind, d.credit_account(org_id), sink, org_id, amount, transfer_id,
                         reason=reason)

    # -- outbox --------------------------------------------------------------------------

    async def mark_captured(self, rows: Sequence[tuple[str, int, int, str, int, int, int]]
                            ) -> None:
        """Closes reservations captured by usage: (reservation id, cost, its arrears, the
        transfer carrying it, and the org's posted / held / arrears after), so a later Capture
        replay answers with them."""
        await self.conn.execute(
            "UPDATE ledger.reservations r SET state = 'CAPTURED', "
            "captured_micros = u.cost, arrears_micros = u.arrears, settled_at = $8, "
            "capture_transfer_id = u.transfer_id, settled_posted_micros = u.posted, "
            "settled_held_micros = u.held, settled_arrears_micros = u.owed "
            "FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], "
            "$5::bigint[], $6::bigint[], $7::bigint[]) "
            "AS u(id, cost, arrears, transfer_id, posted, held, owed) "
            "WHERE r.reservation_id = u.id",
            *[[row[i] for row in rows] for i in range(7)], self.now)

    def emit(self, org_id: str, kind: d.OutboxEventType, **attributes: str) -> None:
        credit = self.accounts[d.credit_account(org_id)]
        self.outbox.append((
            self.event_ids.pop() if self.event_ids else str(uuid.uuid4()), org_id, kind.value,
            # the full traceparent: the notifier's span becomes a child of this one
            self.now, current_traceparent() or self.caller.trace_id, credit.balance - credit.held,
            -self.accounts[d.arrears_account(org_id)].balance, credit.billing_state.value,
            json.dumps(attributes) if attributes else "{}",
        ))

    def emit_balance_changes(self) -> None:
        """One BALANCE_CHANGED per org whose posted credit moved in this transaction."""
        orgs = sorted({e[_ENTRY_ORG] for e in self.entries})
        if len(orgs) > 1:
            self.event_ids.extend(time_ordered_uuids(len(orgs)))
        for org_id in orgs:
            self.emit(org_id, d.OutboxEventType.BALANCE_CHANGED)

    # -- billing state ---------------------------------------------------------------------

    def state_of(self, org_id: str) -> str | None:
        """The org's billing state as this transaction leaves it (None if not locked)."""
        account = self.accounts.get(d.credit_account(org_id))
        return account.billing_state.value if account else None

    def follow_the_money(self) -> None:
        """Moves each touched, unpinned org to the state its balances call for, recording the
        transition and its cause (d.automatic_billing_state)."""
        accounts, credit_kind = self.accounts, d.AccountKind.ORG_CREDIT
        for account in list(accounts.values()):
            org = account.org_id
            if account.kind is not credit_kind or account.pinned or org is None:
                continue
            arrears_account = accounts.get(d.arrears_account(org))
            if arrears_account is None or not (account.dirty or arrears_account.dirty):
                continue
            state, cause = d.automatic_billing_state(account.balance, -arrears_account.balance)
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

    async def flush(self, *, follow_the_money: bool = True,
                    after: Awaitable[object] | None = None) -> None:
        """Writes what the transaction changed. Everything is computed first: with `after`, a
        statement sent earlier (`meanwhile`), the server runs it while this is done."""
        if follow_the_money:
            self.follow_the_money()
        short = leases.short_of_credit(self)
        if short:  # a lease never holds credit the org no longer has (rare: a query)
            if after is not None:
                await after
                after = None
            await leases.fit(self, short)
        writes = self._writes()
        if after is not None:
            await after
        for write in writes:
            await write()

    def _writes(self) -> list[Callable[[], Awaitable[object]]]:
        """The statements that write this transaction's changes, in order, arguments built."""
        conn = self.conn
        writes: list[Callable[[], Awaitable[object]]] = []
        if state_changes := self.state_changes:
            writes.append(lambda: conn.executemany(
                "INSERT INTO ledger.billing_state_changes (request_id, org_id, previous_state, "
                "state, cause, actor, changed_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                state_changes))
        if self.entries:
            transfers = self._sealed_entries()
            writes.append(lambda: insert_rows(
                conn, "transfers", (*_TRANSFER_COLUMNS, *_SEALED_COLUMNS), transfers))
        dirty = [a for a in self.accounts.values() if a.dirty]
        if dirty:
            ids, balances, held, states, hashes, pinned, seals = [], [], [], [], [], [], []
            for a in dirty:
                ids.append(a.account_id)
                balances.append(a.balance)
                held.append(a.held)
                states.append(a.billing_state.value)
                hashes.append(a.last_hash)
                pinned.append(a.pinned)
                seals.append(a.last_seal)
            writes.append(lambda: conn.execute(
                "UPDATE ledger.accounts a SET balance_micros = u.balance, held_micros = u.held, "
                "billing_state = u.state, last_hash = u.last_hash, "
                "billing_state_pinned = u.pinned, last_seal = u.last_seal "
                "FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], "
                "$6::boolean[], $7::text[]) AS u(id, balance, held, state, last_hash, pinned, "
                "last_seal) WHERE a.account_id = u.id",
                ids, balances, held, states, hashes, pinned, seals,
            ))
        if self.settled:
            settled = [r for r, _ in self.settled]
            settled_states = [self.state_of(o) for _, o in self.settled]
            writes.append(lambda: conn.execute(
                "UPDATE ledger.reservations r SET settled_billing_state = u.state "
                "FROM unnest($1::text[], $2::text[]) AS u(id, state) "
                "WHERE r.reservation_id = u.id", settled, settled_states))
        writes += self._grant_writes()
        if outbox_rows := self.outbox:
            writes.append(lambda: insert_rows(
                conn, "outbox",
                ("event_id", "org_id", "type", "occurred_at", "trace_id",
                 "available_micros_after", "arrears_micros", "billing_state", "attributes"),
                outbox_rows))
        return writes

    def _sealed_entries(self) -> list[tuple[Any, ...]]:
        """The transaction's transfer rows with what only its end knows: each org's billing
        state after it, and the state chain's link over that state and the entry's hash
        (d.state_seal), chained from the org's `last_seal`, which moves on with it."""
        rows = []
        for entry in self.entries:
            account = self.org(entry[_ENTRY_ORG])
            state = account.billing_state.value
            account.last_seal = d.state_seal(account.last_seal, entry[_ENTRY_HASH], state)
            account.dirty = True
            rows.append((*entry, state, account.last_seal))
        return rows

    def _grant_writes(self) -> list[Callable[[], Awaitable[object]]]:
        """The statements that write the grants made and burned so far (then taken as
        written)."""
        conn = self.conn
        writes: list[Callable[[], Awaitable[object]]] = []
        new_ids = {g.grant_id for g in self.new_grants}
        if self.new_grants:
            new_grants = [(g.grant_id, g.org_id, g.kind.value, g.priority, g.original_micros,
                           g.remaining_micros, g.expires_at, g.source_transfer_id, g.created_at)
                          for g in self.new_grants]
            writes.append(lambda: insert_rows(
                conn, "grants",
                ("grant_id", "org_id", "kind", "priority", "original_micros",
                 "remaining_micros", "expires_at", "source_transfer_id", "created_at"),
                new_grants))
        changed = [g for g in self.dirty_grants.values() if g.grant_id not in new_ids]
        if changed:
            grant_ids = [g.grant_id for g in changed]
            remaining = [g.remaining_micros for g in changed]
            writes.append(lambda: conn.execute(
                "UPDATE ledger.grants g SET remaining_micros = u.remaining "
                "FROM unnest($1::text[], $2::bigint[]) AS u(id, remaining) "
                "WHERE g.grant_id = u.id", grant_ids, remaining))
        self.new_grants, self.dirty_grants = [], {}
        return writes

    async def write_grants(self) -> None:
        """Writes the grants made and burned so far, ahead of `flush`."""
        for write in self._grant_writes():
            await write()

    # -- overlapping Python with the server ------------------------------------------------

    async def meanwhile(self, statement: Awaitable[T]) -> asyncio.Future[T]:
        """Sends `statement` and returns while the server runs it, so that Python work goes on
        in the meantime. The caller awaits the result before its next statement (a connection
        runs one at a time), yields (asyncio.sleep(0)) now and then in long loops for a
        statement that takes more than one exchange (COPY), and ends the transaction only after
        `settle`, however it ends."""
        future = asyncio.ensure_future(statement)
        self.pending.append(future)
        await asyncio.sleep(0)
        return future

    async def settle(self) -> None:
        """Waits for the statements sent with `meanwhile` (their errors are raised where they
        are awaited; here, only an earlier error is on its way out)."""
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


def _sort_claims(claims: Sequence[bool | TallyError | None], outcomes: list[Any]
                 ) -> tuple[list[int], list[int]]:
    """Work.claim_many's answers as (the requests to apply, those to answer as applied
    before); an id used for another request is refused in `outcomes`."""
    new, replayed = [], []
    for i, claim in enumerate(claims):
        if isinstance(claim, TallyError):
            outcomes[i] = claim
        elif claim is True:
            new.append(i)
        elif claim is False:
            replayed.append(i)
    return new, replayed


_UUID_VARIANT: Final = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def time_ordered_uuids(n: int) -> list[str]:
    """`n` time-ordered (version 7, RFC 9562) UUIDs from one read of the OS's random source:
    the current millisecond, then 74 random bits. Cheaper than n uuid4() (a system call and a
    UUID object each), and rows keyed by them land together at the right edge of a unique
    index instead of on n random pages."""
    head = f"{time.time_ns() // 1_000_000:012x}"
    head = f"{head[:8]}-{head[8:]}-7"
    h = os.urandom(10 * n).hex()
    return [f"{head}{h[i:i + 3]}-{_UUID_VARIANT[h[i + 3]]}{h[i + 4:i + 7]}-{h[i + 7:i + 19]}"
            for i in range(0, 20 * n, 20)]


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


def _transfer(r: Row) -> d.Transfer:
    labels = r["labels"]
    return d.Transfer(
        r["transfer_id"], d.TransferKind(r["kind"]), r["debit_account_id"],
        r["credit_account_id"], r["org_id"], r["amount_micros"], r["actor"], r["reason"],
        r["trace_id"], r["user_id"], json.loads(labels) if isinstance(labels, str) else labels,
        r["grant_id"], r["reservation_id"], r["reverses_transfer_id"], r["payment_order_id"],
        r["created_at"], r["prev_hash"], r["entry_hash"], r["org_posted_after"],
        r["org_held_after"], r["org_arrears_after"], r["hash_version"],
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
        self.leases = leases.LeaseStore(self)  # credit leases: their own module
        # when the sweepers next have work: the request path moves these earlier
        self.reservation_expiry = Deadline()
        self.lease_expiry = Deadline()

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
            work = Work(conn, self.clock(), caller)
            if batch_id is not None and not await work.claim(
                    f"transfer-batch:{batch_id}", d.fingerprint(list(cmds))):
                ids = await conn.fetchval(
                    "SELECT transfer_ids FROM ledger.transfer_batches WHERE batch_id = $1",
                    batch_id)
                return [await self.replay_transfer(conn, tid) for tid in ids]
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
                    out.append(await self.replay_transfer(conn, cmd.transfer_id))
                else:
                    posted_now, held, arrears = work.balance(posted.org_id)
                    state = work.org(posted.org_id).billing_state
                    out.append((posted, d.Balance(posted.org_id, posted_now, held, arrears,
                                                  state, (), work.now)))
            return out

    async def has_payment_order(self, order_id: str) -> bool:
        """Whether this database holds payment order `order_id` (a ledger serving several
        regions finds the region of a call that names only an order this way)."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM ledger.payment_orders WHERE payment_order_id = $1)",
            order_id))

    async def replay_transfer(self, conn: Connection, transfer_id: str
                              ) -> tuple[d.Transfer, d.Balance]:
        """A posted transfer and the org's balance right after it, as first answered."""
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

    async def _apply(self, work: Work, cmd: d.TransferCommand, prefix: str) -> d.Transfer:
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

    async def _reverse(self, work: Work, cmd: d.TransferCommand, prefix: str) -> d.Transfer:
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
            # Taking back credit that was granted: only what is still unspent and unheld
            # (a credit lease's hold is given back first).
            await leases.reclaim(work, org, amount)
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
        """Holds credit (reserve_many, for one hold)."""
        (outcome,) = await self.reserve_many(
            [d.ReserveCommand(reservation_id, org_id, amount, ttl, caller)])
        if isinstance(outcome, TallyError):
            raise outcome
        return outcome

    async def reserve_many(self, commands: Sequence[d.ReserveCommand]
                           ) -> list[tuple[d.Reservation, int, d.BillingState] | TallyError]:
        """Holds credit for each command only if available covers it, decided under the orgs'
        row locks, in order, in one transaction (the group commit of concurrent Reserve
        calls). Each answer is the hold, available credit after it and the org's billing
        state; or the command's refusal, which leaves nothing behind (its id stays free)."""
        outcomes: list[tuple[d.Reservation, int, d.BillingState] | TallyError | None] = [
            None] * len(commands)
        for i, cmd in enumerate(commands):
            try:
                d.raise_if(cmd.problems())
            except TallyError as refused:
                outcomes[i] = refused
        if all(o is not None for o in outcomes):
            return [o for o in outcomes if o is not None]
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.clock(), commands[0].caller)
            new, replayed = _sort_claims(await work.claim_many([
                (f"reserve:{c.reservation_id}", c.fingerprint()) if outcomes[i] is None else None
                for i, c in enumerate(commands)]), outcomes)
            await work.lock(orgs={commands[i].org_id for i in new})
            rows: list[tuple[Any, ...]] = []
            refused_keys = []
            for i in new:
                cmd = commands[i]
                try:
                    outcomes[i] = self._hold(work, cmd)
                except TallyError as refused:
                    outcomes[i] = refused
                    refused_keys.append(f"reserve:{cmd.reservation_id}")
                    continue
                held, available, state = outcomes[i]  # type: ignore[misc]
                rows.append((cmd.reservation_id, cmd.org_id, cmd.amount_micros, "HELD",
                             held.expires_at, work.now, available, state.value))
            if refused_keys:  # claimed in this transaction: as if never asked
                await conn.execute("DELETE FROM ledger.idempotency_keys WHERE key = ANY($1)",
                                   refused_keys)
            if rows:
                await conn.executemany(
                    "INSERT INTO ledger.reservations (reservation_id, org_id, amount_micros, "
                    "state, expires_at, created_at, reserved_available_micros, "
                    "reserved_billing_state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", rows)
                await work.flush()
            first = {commands[i].reservation_id: i for i in new}
            for i in replayed:  # the original answer: the hold as made, available right after
                original = outcomes[first.get(commands[i].reservation_id, i)]
                outcomes[i] = (original if isinstance(original, TallyError)
                               else await self._replay_hold(conn, commands[i]))
        if rows:
            self.reservation_expiry.due(min(row[4] for row in rows))
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _hold(work: Work, cmd: d.ReserveCommand) -> tuple[d.Reservation, int, d.BillingState]:
        """One hold on the locked org, or its refusal."""
        org_id, amount = cmd.org_id, cmd.amount_micros
        if d.credit_account(org_id) not in work.accounts:
            raise invalid("org_id", f"unknown org {org_id!r}")
        account = work.org(org_id)
        if account.billing_state is d.BillingState.READ_ONLY:
            raise TallyError(Reason.ACCOUNT_READ_ONLY, f"org {org_id} is read-only: no new holds",
                             metadata={"org_id": org_id})
        available = work.available(org_id)
        if amount > available:
            raise d.insufficient(available, amount, "amount_micros")
        account.held += amount
        account.dirty = True
        reservation = d.Reservation(cmd.reservation_id, org_id, amount, d.ReservationState.HELD,
                                    work.now + cmd.ttl, 0, 0, "", work.now, None)
        return reservation, work.available(org_id), account.billing_state

    @staticmethod
    async def _replay_hold(conn: Connection, cmd: d.ReserveCommand
                           ) -> tuple[d.Reservation, int, d.BillingState]:
        row = await conn.fetchrow(
            "SELECT * FROM ledger.reservations WHERE reservation_id = $1", cmd.reservation_id)
        assert row is not None  # the claim and the row commit together
        made = replace(_reservation(row), state=d.ReservationState.HELD, captured_micros=0,
                       arrears_micros=0, capture_transfer_id="", settled_at=None)
        return (made, row["reserved_available_micros"],
                d.BillingState(row["reserved_billing_state"] or "ACTIVE"))

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
            work = Work(conn, self.clock(), caller)
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
                    transfer, _ = await self.replay_transfer(conn, held.capture_transfer_id)
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
            work = Work(conn, self.clock(), caller)
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

    async def _free_hold(self, work: Work, held: d.Reservation, state: d.ReservationState
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

    async def next_reservation_expiry(self) -> datetime | None:
        """When the next held reservation lapses (the sweeper waits until then)."""
        found: datetime | None = await self.pool.fetchval(
            "SELECT min(expires_at) FROM ledger.reservations WHERE state = 'HELD'")
        return found

    async def next_grant_expiry(self) -> datetime | None:
        """When the next open grant expires."""
        found: datetime | None = await self.pool.fetchval(
            "SELECT min(expires_at) FROM ledger.grants WHERE is_open AND expires_at IS NOT NULL")
        return found

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
            work = Work(conn, now, d.Caller(actor="service:ledger-sweeper"))
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
                "SELECT grant_id, org_id FROM ledger.grants WHERE is_open "
                "AND expires_at <= $1 ORDER BY expires_at LIMIT $2", now, limit)
            if not rows:
                return 0
            work = Work(conn, now, d.Caller(actor="service:ledger-expiry"))
            await work.lock_orgs([r["org_id"] for r in rows],
                                 system=[d.AccountKind.EXPIRY])
            expired = 0
            for r in rows:
                org = r["org_id"]
                grant = next(g for g in await work.grants_of(org) if g.grant_id == r["grant_id"])
                await leases.reclaim(work, org, grant.remaining_micros)
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
        """Debits one batch of rated usage (post_usage_batches, for a group of one)."""
        (outcome,) = await self.post_usage_batches([d.UsageBatch(batch_id, items, caller)])
        if isinstance(outcome, TallyError):
            raise outcome
        return outcome

    async def post_usage_batches(self, batches: Sequence[d.UsageBatch]
                                 ) -> list[list[d.UsageResult] | TallyError]:
        """Debits batches of rated usage in one transaction: one USAGE transfer per org.

        Usage already happened, so it is never refused: what available credit cannot cover is
        recorded as arrears. Each event is charged once, forever (receipts are keyed by org and
        event id), whatever batch it arrives in.

        Several batches are the group commit of concurrent calls (tally.kit.group_commit): each
        is validated, claimed under its own id and answered on its own (its results, or its
        refusal: bad input, an id used for another request), but the ones applied share the
        org's transfer, named after the first of them. The batches agree on their audit
        fields (UsageBatch.audited_as); the entries carry the first one's trace id.

        Events seen before are rare, so the batches are first debited as if none were, in a
        savepoint: a receipt that already exists fails the insert of the receipts, and only
        then are they debited again from the savepoint, knowing which events were seen
        (that lookup is a probe of the receipts per item, in every batch otherwise).
        """
        started = time.perf_counter()
        outcomes: list[list[d.UsageResult] | TallyError | None] = [None] * len(batches)
        for i, batch in enumerate(batches):
            try:
                d.validate_usage_batch(batch.batch_id, batch.items)
            except TallyError as refused:
                outcomes[i] = refused
        valid = [b for b, o in zip(batches, outcomes, strict=True) if o is None]
        if not valid:
            return [o for o in outcomes if o is not None]
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.clock(), valid[0].caller)
            applied, replayed = _sort_claims(await work.claim_many([
                (f"usage-batch:{b.batch_id}", b.fingerprint()) if outcomes[i] is None else None
                for i, b in enumerate(batches)]), outcomes)
            debited = arrears = 0
            if applied:
                group = [batches[i] for i in applied]
                try:
                    async with conn.transaction():  # the savepoint
                        try:
                            results, debited, arrears = await self._debit_usage(
                                work, group, seen_before=False)
                        finally:
                            await work.settle()
                except asyncpg.UniqueViolationError as e:
                    if e.constraint_name != "usage_receipts_pkey":
                        raise
                    work = Work(conn, work.now, work.caller)
                    try:
                        results, debited, arrears = await self._debit_usage(
                            work, group, seen_before=True)
                    finally:
                        await work.settle()
                for i, batch_results in zip(applied, results, strict=True):
                    outcomes[i] = batch_results
            for i in replayed:  # after the claim waited for the original, or applied it here
                outcomes[i] = await self._replay_usage(conn, batches[i].batch_id,
                                                       batches[i].items)
        for batch in batches:
            metrics.LEDGER_BATCH_ITEMS.observe(len(batch.items))
        metrics.LEDGER_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.CREDITS_DEBITED.inc(debited)
        metrics.ARREARS_RECORDED.inc(arrears)
        return [o for o in outcomes if o is not None]

    async def _debit_usage(self, work: Work, batches: Sequence[d.UsageBatch], *,
                           seen_before: bool) -> tuple[list[list[d.UsageResult]], int, int]:
        """post_usage_batches once the batches are claimed: each batch's results, and the
        total debited and recorded as arrears. Without `seen_before`, every event is taken to
        be new (the insert of the receipts fails if one is not)."""
        conn = work.conn
        lead = batches[0].batch_id
        items = [item for batch in batches for item in batch.items] if len(batches) > 1 \
            else batches[0].items
        orgs = sorted({i.org_id for i in items})
        await work.lock_orgs(orgs, system=[d.AccountKind.REVENUE], open_missing=True)
        earlier = await self._receipts_of(conn, items) if seen_before else {}
        holds = await self._capturable_holds(work, items)
        leased = await leases.UsageLeases.lock(work, items)  # issue 17: credit leases
        credit_of = {org: work.org(org) for org in orgs}
        # The open grants of the orgs that have credit (all the items can debit) load while
        # the items are priced.
        grants_loaded = await work.meanwhile(
            work.preload_grants([o for o in orgs if credit_of[o].balance > 0]))
        # an event twice in the group (in two batches) is charged at its first
        in_group: dict[tuple[str, str], d.UsageResult] | None = {} if len(batches) > 1 else None
        answers: list[list[d.UsageResult]] = []
        debited_by_org = dict.fromkeys(orgs, 0)
        arrears_by_org = dict.fromkeys(orgs, 0)
        receipts: list[tuple[Any, ...]] = []
        captures: list[tuple[str, str, int, int, str]] = []
        split_debit, usage_result = d.split_debit, d.UsageResult
        for batch in batches:
            batch_id = batch.batch_id
            results: list[d.UsageResult] = []
            answers.append(results)
            for item in batch.items:
                org, event_id = item.org_id, item.event_id
                if earlier:
                    prior = earlier.get((org, event_id))
                    if prior is not None:
                        results.append(usage_result(
                            event_id, prior["transfer_id"], prior["debited_micros"],
                            prior["arrears_micros"], prior["balance_after_micros"], True))
                        continue
                if in_group is not None:
                    first = in_group.get((org, event_id))
                    if first is not None:
                        results.append(replace(first, is_duplicate=True))
                        continue
                hold = holds.pop(item.reservation_id, None) if item.reservation_id else None
                account = credit_of[org]
                if hold is not None:
                    account.held -= hold.amount_micros
                    account.dirty = True
                if item.lease_id:  # issue 17: the lease's hold pays first
                    leased.pay(org, item.lease_id, item.cost_micros)
                debited_before = debited_by_org[org]
                available = account.balance - debited_before - account.held
                debited, arrears = split_debit(available, item.cost_micros)
                if debited:
                    debited_by_org[org] = debited_before + debited
                    transfer_id = f"usage:{lead}:{org}"
                else:
                    transfer_id = f"usage:{lead}:{org}:arrears" if arrears else ""
                if arrears:
                    arrears_by_org[org] += arrears
                balance_after = available - debited
                result = usage_result(event_id, transfer_id, debited, arrears, balance_after)
                results.append(result)
                if in_group is not None:
                    in_group[(org, event_id)] = result
                receipts.append((org, event_id, batch_id, transfer_id, item.cost_micros,
                                 debited, arrears, balance_after))
                if hold is not None:
                    captures.append((hold.reservation_id, org, item.cost_micros, arrears,
                                     transfer_id))
        for org, owed in arrears_by_org.items():
            if owed and owed - work.accounts[d.arrears_account(org)].balance > INT64_MAX:
                raise invalid("items", f"the arrears of org {org!r} would pass int64")
        await grants_loaded
        # The receipts are written while the transfers are made.
        receipts_written = await work.meanwhile(conn.copy_records_to_table(
            "usage_receipts", schema_name="ledger",
            columns=("org_id", "event_id", "batch_id", "transfer_id", "cost_micros",
                     "debited_micros", "arrears_micros", "balance_after_micros"),
            records=receipts)) if receipts else None
        usage, revenue = d.TransferKind.USAGE, d.AccountKind.REVENUE
        labels = work.caller.labels or None
        for n, org in enumerate(orgs):
            if not n % 100:
                await asyncio.sleep(0)  # the COPY's next exchange with the server
            debited, arrears = debited_by_org[org], arrears_by_org[org]
            if not (debited or arrears):
                continue
            sink = d.system_account(revenue, org)
            if debited:
                work.burn_loaded(org, work.grants[org], debited)
                work.append_entry(usage, d.credit_account(org), sink, org, debited,
                                  f"usage:{lead}:{org}", labels=labels)
            if arrears:
                work.append_entry(usage, d.arrears_account(org), sink, org, arrears,
                                  f"usage:{lead}:{org}:arrears",
                                  "usage beyond available credit", labels)
                work.emit(org, d.OutboxEventType.ARREARS_RECORDED,
                          arrears_micros=str(arrears), batch_id=lead)
        if receipts_written is not None:
            await receipts_written
        if captures:
            # A reservation captured by a batch answers a later Capture replay with the
            # balance after the whole batch.
            # (the batch's transfers are already posted to the locked accounts here)
            await work.mark_captured([(c[0], c[2], c[3], c[4], *work.balance(c[1]))
                                      for c in captures])
            work.settled.extend((c[0], c[1]) for c in captures)
        await leased.write()
        # The burned grants are written while the rest of the writes are made ready.
        grants_written = await work.meanwhile(work.write_grants())
        work.emit_balance_changes()
        await work.flush(after=grants_written)
        return answers, sum(debited_by_org.values()), sum(arrears_by_org.values())

    async def _capturable_holds(self, work: Work, items: Sequence[d.UsageItem]
                                ) -> dict[str, d.Reservation]:
        """HELD, unexpired reservations named by the items (others mean a plain debit)."""
        ids = [i.reservation_id for i in items if i.reservation_id]
        if not ids:
            return {}
        owner = {i.reservation_id: i.org_id for i in items if i.reservation_id}
        rows = await work.conn.fetch(
            "SELECT r.* FROM unnest($1::text[]) AS u(id) JOIN ledger.reservations r "
            "ON r.reservation_id = u.id ORDER BY r.reservation_id FOR UPDATE OF r", ids)
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
            work = Work(conn, self.clock(), caller)
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
            return await self.balance_in(conn, org_id)

    async def balance_in(self, conn: Connection, org_id: str) -> d.Balance:
        """`get_balance` on a connection the caller holds (inside its transaction)."""
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
            "SELECT * FROM ledger.grants WHERE org_id = $1 AND is_open", org_id)),
            key=d.burn_order)
        leased, in_flight = await leases.totals_of(conn, org_id)
        return d.Balance(org_id, credit["balance_micros"], credit["held_micros"],
                         -by_id[d.arrears_account(org_id)]["balance_micros"],
                         d.BillingState(credit["billing_state"]), grants, self.clock(),
                         leased, in_flight)

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
        """Recomputes every org's hash chain and state chain, each account's balance, and the
        zero sum. Each entry is checked under the hash version it carries; an entry first
        written under version 1 (before migration 0006) is checked under its original version 1
        chain as well. The state chain (d.state_seal) covers each entry's billing state after
        it, which the entry's own hash cannot."""
        checked = 0
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            heads: dict[str, tuple[str, str]] = {
                r["org_id"]: (r["last_hash"], r["last_seal"]) for r in await conn.fetch(
                    "SELECT org_id, last_hash, last_seal FROM ledger.accounts "
                    "WHERE kind = 'ORG_CREDIT' AND ($1 = '' OR org_id = $1)", org_id)}
            prev: dict[str, str] = {}
            prev_v1: dict[str, str] = {}
            seals: dict[str, str] = {}
            cursor = conn.cursor(
                "SELECT * FROM ledger.transfers WHERE ($1 = '' OR org_id = $1) ORDER BY seq",
                org_id, prefetch=2000)
            async for row in cursor:
                t = _transfer(row)
                bad = d.ChainReport(False, checked, t.transfer_id,
                                    f"entry {t.transfer_id} does not match its hash chain")
                if t.hash_version not in d.HASH_VERSIONS:
                    return bad
                expected_prev = prev.get(t.org_id, d.GENESIS_HASH)
                recomputed = d.chain_hash(t.prev_hash, d.transfer_entry(t, t.hash_version))
                if t.prev_hash != expected_prev or recomputed != t.entry_hash:
                    return bad
                prev[t.org_id] = t.entry_hash
                if row["entry_hash_v1"] is not None:
                    original = d.chain_hash(row["prev_hash_v1"], d.transfer_entry(t, 1))
                    if (row["prev_hash_v1"] != prev_v1.get(t.org_id, d.GENESIS_HASH)
                            or original != row["entry_hash_v1"]):
                        return bad
                    prev_v1[t.org_id] = row["entry_hash_v1"]
                seal = d.state_seal(seals.get(t.org_id, d.GENESIS_HASH), t.entry_hash,
                                    row["org_billing_state_after"])
                if seal != row["state_seal"]:
                    return d.ChainReport(
                        False, checked, t.transfer_id,
                        f"entry {t.transfer_id}: its billing state after does not match the "
                        "org's state chain")
                seals[t.org_id] = seal
                checked += 1
            for org, (head, seal_head) in heads.items():
                if prev.get(org, d.GENESIS_HASH) != head:
                    return d.ChainReport(False, checked, "",
                                         f"org {org}: chain head does not match its last entry")
                if seals.get(org, d.GENESIS_HASH) != seal_head:
                    return d.ChainReport(
                        False, checked, "",
                        f"org {org}: state chain head does not match its last entry")
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
        return await outbox.seal(self.pool, "ledger.outbox", limit, announce=SEALED_CHANNEL)

    async def orgs_changed_after(self, sequence: int, types: Sequence[d.OutboxEventType],
                                 limit: int = 1000) -> tuple[list[str], int, int]:
        """The orgs of up to `limit` outbox events after `sequence` (each once, in the order of
        its first event), the last sequence read and how many events were read: for a
        follower that only needs to know whom to look at (a page of full events costs a usage
        batch's worth of objects)."""
        rows = await self.pool.fetch(
            "SELECT org_id, sequence FROM ledger.outbox WHERE sequence > $1 "
            "AND type = ANY($2::text[]) ORDER BY sequence LIMIT $3",
            sequence, [t.value for t in types], limit)
        if not rows:
            return [], sequence, 0
        return list(dict.fromkeys(r[0] for r in rows)), rows[-1][1], len(rows)

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
