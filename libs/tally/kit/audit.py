"""The audit trail of every service, recorded by the kit and kept by accounts.

The guard hands each finished call it must audit (every mutating call, every sensitive read,
every refused attempt) to an `Auditor`; accounts chains each record into its org's hash chain,
idempotently on the record's id, so a batch retried after a lost answer is not recorded twice.

Durable (every service the kit runs: `ServiceApp.audit_database_url`): each record is written
to an outbox table in the calling service's own database (`<service>.audit_outbox`) before the
audited call answers, and a background sender ships the outbox to accounts' AppendAudit in
batches, deleting what accounts acknowledged in the same transaction that locked it (FOR UPDATE
SKIP LOCKED, so replicas sharing the table never ship one row twice at once; a row shipped twice
after a crash is recorded once, by its id). A process killed at any moment (SIGKILL) loses no
record of a call that answered: the next sender to run — a replica, or the restarted process —
ships it. Records reach the outbox in one of two ways:

- In the call's own transaction (`pending()`): a handler whose change is one transaction in
  the same database (metering's Authorize: the hold) takes the call's record from the kit and
  inserts it in that transaction, so the change and its record commit together or not at all,
  at the cost of no extra commit. The kit then writes nothing more for the call, unless it
  ends in an error after all (that outcome is recorded too).
- Otherwise, the kit's own INSERT, shared with the calls finishing meanwhile (group commit),
  awaited before the call answers. It commits like any other change (synchronous_commit as
  the database is configured, `on` by default): the record survives the service's death and
  PostgreSQL's own crash alike. (Before, it was written with synchronous_commit off: it
  survived the service but a crash of PostgreSQL itself within ~3 x wal_writer_delay could
  lose it while the call's change, flushed, survived.)

If the outbox cannot be written, the call answers UNAVAILABLE (its change is idempotent on its
client id: the retry is audited). Refused calls (UNAUTHENTICATED, PERMISSION_DENIED) and other
failures change nothing: their records are written the same way but not awaited.

Summarized (`SUMMARIZED`, Envoy's ShouldRateLimit): a rate-limit check writes nothing durable
(it only counts against quota counters in memory or Redis) and runs once per proxied request.
Its calls are counted per (org, principal, how verified, peer, outcome) and each count becomes
one record per flush interval (`TALLY_AUDIT_FLUSH_MS`), target `calls=<n>`, digest empty,
written to the outbox with the next shipment: a crash loses at most the counts of one
interval, never a change. Its refusals by the guard are recorded one by one, like every
refusal.

Without a database (a test's guard): records wait in a bounded in-memory queue, lost if the
process dies (at most one flush interval, `TALLY_AUDIT_FLUSH_MS`); a queue full because
accounts is unreachable drops the newest, counted in `tally_audit_dropped_total` and logged.

Streams are audited once per stream (who opened it, from where, how it ended), not per
message: a StreamUsage message is usage, each event kept by metering under its own id with the
stream's org and project, and debited to the ledger's hash-chained usage transfers — the
record of every mutation a stream makes is already durable and chained there; an audit record
per event would double the write rate of the hottest path to say the same thing.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Counter

from tally.kit import policy
from tally.kit.log import get_logger

log = get_logger("tally.kit.audit")

DROPPED = Counter("tally_audit_dropped_total", "Audit records dropped because the queue to "
                  "accounts was full.")

_READ_PREFIXES: Final = ("Get", "List", "Watch", "Subscribe", "Export", "Quote", "Verify",
                         "Simulate")
_READS: Final = frozenset({"MarginReport", "StreamEvents"})
SENSITIVE_READS: Final = frozenset({"ListMembers", "ListApiKeys", "GetPaymentOrder",
                                    "ListPaymentOrders", "GetAutoTopUp", "ExportUsage",
                                    "ExportAudit", "VerifyAudit"})
"""Reads of payment details, member lists, keys and bulk exports: audited like changes."""
NEVER: Final = frozenset({"/tally.accounts.v1.AccountsService/AppendAudit"})
"""The audit's own transport (auditing it would record every shipment forever)."""
DENIED: Final = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
SUMMARIZED: Final = frozenset({"ShouldRateLimit"})
"""Calls that change nothing durable and run once per proxied request: counted per interval
(see the module docstring), their refusals recorded one by one."""


def is_audited(method: str) -> bool:
    """Whether successful calls of `method` are audited (refused ones always are)."""
    if method in NEVER:
        return False
    short = method.rsplit("/", 1)[1]
    return short in SENSITIVE_READS or not (short.startswith(_READ_PREFIXES)
                                            or short in _READS)


# (record_id, org_id, at, principal, verified_by, service, rpc, targets, digest, peer, outcome)
Record = tuple[str, str, float, str, str, str, str, tuple[str, ...], str, str, str]
Sink = Callable[[Sequence[Record], Mapping[str, float]], Awaitable[None]]
"""Ships records, and the API keys used since the last shipment (key_id -> when)."""


class PendingRecord:
    """The audit record(s) of the call being served, for a handler that writes them in the
    transaction of the call's change (see `pending`). Built once: a transaction retried
    writes the same record ids (the outbox ignores a duplicate id)."""

    __slots__ = ("_make", "_on_written", "_rows", "database_url", "is_written")

    def __init__(self, make: Callable[[], list[Record]],
                 on_written: Callable[[], None] | None = None, database_url: str = "") -> None:
        self._make = make
        self.database_url = database_url  # where the outbox the sender drains lives
        self._on_written = on_written
        self._rows: list[tuple[str, str]] | None = None
        self.is_written = False
        """Set by the handler's store once its transaction, with the rows, committed."""

    def rows(self) -> list[tuple[str, str]]:
        """(record_id, record as JSON) per org the call names, outcome OK: the values of
        `<service>.audit_outbox`'s (record_id, record)."""
        if self._rows is None:
            self._rows = [(r[0], json.dumps(r)) for r in self._make()]
        return self._rows

    def written(self) -> None:
        """The rows are committed with the call's change: the kit writes no record of its
        own for the call (unless it ends in an error after all)."""
        self.is_written = True
        if self._on_written is not None:
            self._on_written()


_pending: contextvars.ContextVar[PendingRecord | None] = contextvars.ContextVar(
    "tally_audit_pending", default=None)


def begin(record: PendingRecord | None) -> None:
    """Makes `record` the current call's (the kit's server, as a call is admitted: each call
    runs in its own task, so this is the call's alone)."""
    _pending.set(record)


def current() -> PendingRecord | None:
    """The current call's record, written or not."""
    return _pending.get()


def pending(database_url: str) -> PendingRecord | None:
    """The current call's audit record not written yet, if the call is audited durably in
    `database_url` (the database of the store asking: a record written in another, e.g. a
    residency region's, would never be shipped): a store that commits the call's change
    there inserts its rows in that transaction and marks it `written` after the commit. Read
    it in the call's own task (a group commit's transaction runs in another: take it when
    the call submits)."""
    record = _pending.get()
    if record is None or record.is_written or record.database_url != database_url:
        return None
    return record


class AuditOutbox:
    """Audit records waiting for accounts, in a table of the service's own database."""

    def __init__(self, database_url: str, table: str, *, group_max: int = 1000) -> None:
        from tally.kit.group_commit import GroupCommit

        self.database_url = database_url
        self.table = table  # e.g. "ledger.audit_outbox" (services/*/migrations create it)
        self._pool: Any = None
        self._writes: GroupCommit[Record, None] = GroupCommit(
            f"audit.{table}", self._write_many, max_size=group_max)

    async def _connected(self) -> Any:
        if self._pool is None:
            import asyncpg

            from tally.kit import db

            # the database's synchronous_commit (on by default): a record is as durable as
            # the change it records when the call answers, across a PostgreSQL crash too
            self._pool = await asyncpg.create_pool(
                db.asyncpg_url(self.database_url), min_size=1, max_size=2)
        return self._pool

    async def write(self, record: Record) -> None:
        """Returns once `record` is committed (with whatever else was written meanwhile)."""
        await self._writes.submit(record)

    async def _write_many(self, records: Sequence[Record]) -> Sequence[None]:
        pool = await self._connected()
        await pool.execute(
            f"INSERT INTO {self.table} (record_id, record) "
            "SELECT * FROM unnest($1::text[], $2::jsonb[]) ON CONFLICT DO NOTHING",
            [r[0] for r in records], [json.dumps(r) for r in records])
        return [None] * len(records)

    async def drain(self, sink: Sink, uses: Mapping[str, float], limit: int) -> int:
        """Ships up to `limit` records (and `uses`) to `sink`, deleting them once it
        returned; returns how many were shipped (0: the outbox is empty or being shipped)."""
        pool = await self._connected()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(f"SELECT seq, record FROM {self.table} ORDER BY seq "
                                    "LIMIT $1 FOR UPDATE SKIP LOCKED", limit)
            if not rows and not uses:
                return 0
            await sink([_record(json.loads(row["record"])) for row in rows], uses)
            await conn.execute(f"DELETE FROM {self.table} WHERE seq = ANY($1::bigint[])",
                               [row["seq"] for row in rows])
            return len(rows)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


def _report_unwritten(written: asyncio.Future[Any]) -> None:
    if not written.cancelled() and (exc := written.exception()) is not None:
        log.error("audit_record_not_written", error=repr(exc))


def _record(fields: list[Any]) -> Record:
    (record_id, org, at, who, how, service, rpc, targets, digest, peer, outcome) = fields
    return (record_id, org, at, who, how, service, rpc, tuple(targets), digest, peer, outcome)


@dataclass
class Auditor:
    """Queues audit records and ships them in batches to a sink (accounts' AppendAudit)."""

    service: str
    sink: Sink
    max_queue: int = 100_000
    batch_size: int = 1000
    flush_ms: int = 50
    retry_ms: int = 500
    key_uses: Callable[[], dict[str, float]] | None = None
    """Takes the key uses to report with the next shipment (the guard's cache)."""
    outbox: AuditOutbox | None = None
    """Where records are made durable before their call answers (None: memory only)."""
    _queue: deque[Record] = field(default_factory=deque)
    _uses: dict[str, float] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _id_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _counted: dict[tuple[str, str, str, str, str, str], int] = field(default_factory=dict)
    sweep_s: float = 5.0
    """How often the outbox is read with nothing written to it by this process (records a
    dead replica left behind): a flush reads it only after writes, not every interval."""
    _dirty: bool = False
    _next_sweep: float = 0.0  # monotonic; 0: read the outbox at the first flush

    def _records(self, method: str, rule: policy.Rule | None, principal: Any, peer: str,
                 request: Any, outcome: str) -> list[Record]:
        """One call's records: one per org it named (the platform chain's if none)."""
        digest = (hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
                  if request is not None else "")
        orgs = sorted(policy.orgs_named(rule, request)) if rule and request is not None else []
        targets = tuple(f"org_id={o}" for o in orgs) + self._targets(method, request)
        who = principal.identity if principal is not None else "anonymous"
        how = principal.verified_by if principal is not None else "none"
        now = time.time()
        return [(os.urandom(16).hex(), org, now, who, how, self.service, method, targets,
                 digest, peer, outcome) for org in orgs or [""]]

    def record(self, method: str, rule: policy.Rule | None, principal: Any, peer: str,
               request: Any, outcome: str) -> Awaitable[Any] | None:
        """Queues one call's record (one per org it named; the platform chain if none).
        With an outbox, returns what to await before the call may answer."""
        records = self._records(method, rule, principal, peer, request, outcome)
        if self.outbox is not None:
            # scheduled now: a refused call answers without awaiting its record
            written = asyncio.gather(*(self.outbox.write(r) for r in records))
            written.add_done_callback(_report_unwritten)
            written.add_done_callback(self._outbox_written)
            return written
        self._enqueue(records)
        return None

    def pending(self, method: str, rule: policy.Rule | None, principal: Any, peer: str,
                request: Any) -> PendingRecord | None:
        """The record an admitted call's handler may write in its own transaction (see
        `pending()`); None without an outbox (nothing to share a transaction with)."""
        if self.outbox is None:
            return None
        return PendingRecord(lambda: self._records(method, rule, principal, peer, request,
                                                   "OK"), self._outbox_written,
                             self.outbox.database_url)

    def _outbox_written(self, _: object = None) -> None:
        """Records reached the outbox: the next flush drains it."""
        self._dirty = True

    def count(self, method: str, rule: policy.Rule | None, principal: Any, peer: str,
              request: Any, outcome: str) -> None:
        """Counts one call of a SUMMARIZED method towards its interval's record."""
        orgs = sorted(policy.orgs_named(rule, request)) if rule and request is not None else []
        who = principal.identity if principal is not None else "anonymous"
        how = principal.verified_by if principal is not None else "none"
        for org in orgs or [""]:
            key = (org, who, how, method, peer, outcome)
            self._counted[key] = self._counted.get(key, 0) + 1

    def _summaries(self) -> list[Record]:
        """The counted calls as records (one per key), counts reset."""
        counted, self._counted = self._counted, {}
        now = time.time()
        return [(os.urandom(16).hex(), org, now, who, how, self.service, method,
                 ((f"org_id={org}",) if org else ()) + (f"calls={calls}",), "", peer, outcome)
                for (org, who, how, method, peer, outcome), calls in sorted(counted.items())]

    def _enqueue(self, records: Sequence[Record]) -> None:
        for r in records:
            if len(self._queue) >= self.max_queue:
                DROPPED.inc()
                log.error("audit_record_dropped", method=r[6], org_id=r[1],
                          queued=len(self._queue))
                continue
            self._queue.append(r)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def _targets(self, method: str, request: Any) -> tuple[str, ...]:
        if request is None:
            return ()
        names = self._id_fields.get(method)
        if names is None:
            names = self._id_fields[method] = tuple(
                f.name for f in request.DESCRIPTOR.fields
                if f.name.endswith("_id") and f.name != "org_id" and f.type == f.TYPE_STRING
                and not f.is_repeated)
        return tuple(f"{name}={value}" for name in names if (value := getattr(request, name)))

    @property
    def queued(self) -> int:
        """Records waiting to be shipped."""
        return len(self._queue)

    async def flush(self) -> None:
        """Ships everything queued now (raises if the sink fails; nothing is lost then)."""
        if self.key_uses is not None:
            for key_id, at in self.key_uses().items():
                self._uses[key_id] = max(at, self._uses.get(key_id, at))
        if self._counted:
            summaries = self._summaries()
            if self.outbox is not None:
                await asyncio.gather(*(self.outbox.write(r) for r in summaries))
                self._dirty = True
            else:
                self._enqueue(summaries)
        if self.outbox is not None:
            # An idle outbox is not read every interval: only after this process wrote to it,
            # and every `sweep_s` for what another (dead) replica left behind.
            now = time.monotonic()
            if self._dirty or now >= self._next_sweep:
                self._dirty, self._next_sweep = False, now + self.sweep_s
                try:
                    # a short batch emptied it (what was written meanwhile marked it dirty):
                    # no second, empty transaction to find that out
                    while await self.outbox.drain(self.sink, self._uses,
                                                  self.batch_size) >= self.batch_size:
                        self._uses = {}
                except BaseException:
                    self._dirty = True  # what was not shipped is shipped by the next flush
                    raise
            elif self._uses:
                await self.sink([], self._uses)
            self._uses = {}
        while self._queue or self._uses:
            batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
            await self.sink(batch, self._uses)
            self._uses = {}
            for _ in batch:
                self._queue.popleft()

    async def run(self, stop: asyncio.Event) -> None:
        """Ships batches until `stop`, then a last flush."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_ms / 1000)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.warning("audit_ship_failed", error=str(exc), queued=len(self._queue),
                            retry_in_ms=self.retry_ms)
                try:
                    await asyncio.wait_for(stop.wait(), self.retry_ms / 1000)
                except TimeoutError:
                    pass
        try:
            await self.flush()
        except Exception as exc:
            log.error("audit_records_lost_at_shutdown" if self.outbox is None
                      else "audit_records_left_in_outbox", error=str(exc),
                      queued=len(self._queue))
        if self.outbox is not None:
            await self.outbox.close()


def grpc_sink(channel: Any, timeout_s: float = 5.0) -> Sink:
    """A sink shipping to accounts' AppendAudit over `channel`."""
    from tally.accounts.v1 import accounts_pb2, accounts_pb2_grpc

    stub = accounts_pb2_grpc.AccountsServiceStub(channel)

    async def ship(batch: Sequence[Record], uses: Mapping[str, float]) -> None:
        records = []
        for (record_id, org, at, who, how, service, rpc, targets, digest, peer,
             outcome) in batch:
            message = accounts_pb2.AuditRecord(
                record_id=record_id, org_id=org, principal=who, verified_by=how,
                service=service, rpc=rpc, target_ids=targets, request_sha256=digest,
                peer=peer, outcome=outcome)
            message.time.FromNanoseconds(int(at * 1e9))
            records.append(message)
        key_uses = []
        for key_id, at in uses.items():
            use = accounts_pb2.KeyUse(key_id=key_id)
            use.last_use_time.FromNanoseconds(int(at * 1e9))
            key_uses.append(use)
        await stub.AppendAudit(accounts_pb2.AppendAuditRequest(records=records,
                                                               key_uses=key_uses),
                               timeout=timeout_s)

    return ship
