"""Transactional outboxes, one way for every service.

A service writes outbox rows in the same transaction as the change they announce; each row
records its transaction id (`txid`, default pg_current_xact_id()). `seal` gives sequences only
to rows of transactions older than every transaction still running, in (txid, id) order, so
sequences only ever grow in commit-safe order and a consumer resuming "after N" misses nothing,
without writers taking any shared lock. One sealer runs at a time per table.
"""

from __future__ import annotations

import zlib

import asyncpg

from tally.kit import metrics


async def seal(pool: asyncpg.Pool, table: str, limit: int = 5000) -> int:
    """Seals what can be sealed in `table` (e.g. "ledger.outbox"); returns how many rows."""
    lock_key = zlib.crc32(f"outbox-sealer:{table}".encode())
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key):
            return 0
        ready = await conn.fetchrow(
            "SELECT array_agg(id ORDER BY txid, id) AS ids, "
            "extract(epoch FROM now() - min(occurred_at))::float8 AS lag "
            f"FROM (SELECT id, txid, occurred_at FROM {table} "
            "WHERE sequence IS NULL AND txid < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY txid, id LIMIT $1) AS ready", limit)
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
        return len(ids)
