"""Transactional outboxes, one way for every service.

A service writes outbox rows in the same transaction as the change they announce. `seal` gives
sequences to the rows it can see, which are committed ones, in the order of their `id` (taken
when the row was inserted), continuing after the highest sequence given so far. So:
- a consumer resuming "after N" misses nothing: a row committed later is sealed later, with a
  higher sequence, whatever its id;
- the events of one subject (an org's balance, a budget) arrive in the order their transactions
  committed: writers insert a subject's row while holding the subject's row lock, so a later
  writer's row has a higher id and is committed after the earlier one is visible. (Ordering by
  transaction id instead would put a transaction that began first but waited, for a lock,
  before one that committed ahead of it.)
Writers take no shared lock; one sealer runs at a time per table.
"""

from __future__ import annotations

import zlib

import asyncpg

from tally.kit import metrics


async def seal(pool: asyncpg.Pool, table: str, limit: int = 5000, *, announce: str = "") -> int:
    """Seals what can be sealed in `table` (e.g. "ledger.outbox"); returns how many rows.
    With `announce`, sealing rows NOTIFYs that channel at commit (streams wait for it)."""
    lock_key = zlib.crc32(f"outbox-sealer:{table}".encode())
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key):
            return 0
        ready = await conn.fetchrow(
            "SELECT array_agg(id ORDER BY id) AS ids, "
            "extract(epoch FROM now() - min(occurred_at))::float8 AS lag "
            f"FROM (SELECT id, occurred_at FROM {table} WHERE sequence IS NULL "
            "ORDER BY id LIMIT $1) AS ready", limit)
        ids, lag = (ready["ids"], ready["lag"]) if ready else (None, None)
        if not ids:
            return 0
        last = await conn.fetchval(f"SELECT coalesce(max(sequence), 0) FROM {table}")
        metrics.OUTBOX_SEALED.labels(table).inc(len(ids))
        metrics.OUTBOX_SEAL_LAG.labels(table).set(max(0.0, lag or 0.0))
        await conn.execute(
            f"UPDATE {table} o SET sequence = u.sequence "
            "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, sequence) WHERE o.id = u.id",
            ids, list(range(last + 1, last + 1 + len(ids))))
        if announce:
            await conn.execute("SELECT pg_notify($1, '')", announce)
        return len(ids)
