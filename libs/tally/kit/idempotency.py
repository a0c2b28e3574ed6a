"""The idempotency claim: every idempotent write starts by claiming its client-chosen key.

A claim inserts (key, request hash) with `ON CONFLICT DO NOTHING` inside the write's own
transaction, so the key and the write commit together or not at all. The insert that loses
the race waits for the winner's transaction; then the stored hash tells a replay (same hash:
answer as the first call did — from `result` where the table keeps one) from a reused key
(another hash: IDEMPOTENCY_KEY_REUSED, in the caller's words). Many keys are claimed in one
statement, inserted in key order, so concurrent group claims never deadlock.

Tables: a key column, `request_hash text`, and optionally a `result jsonb` column that
`record` fills with the first answer (a placeholder until then). Works on an asyncpg
connection, or on a SQLAlchemy AsyncConnection (the notifier's) through its driver SQL, so
the statement is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ClaimTable:
    """Where a service keeps its claims."""

    name: str  # schema.table
    key_column: str = "request_id"
    result_column: str | None = "result"  # a jsonb column holding the first answer, if any
    placeholder: str = "{}"  # the result until `record` writes it (JSON text)


@dataclass(frozen=True, slots=True)
class Claim:
    """One request's claim: exactly one of owned, replay (not owned, not reused), reused."""

    owned: bool = False  # this transaction holds the key: do the write (and `record` it)
    reused: bool = False  # the key was claimed for another request (another hash)
    result: str | None = None  # on a replay: the stored first answer (JSON text), if kept

    @property
    def replay(self) -> bool:
        """An earlier call made this same request: answer as it did."""
        return not self.owned and not self.reused


async def _fetch(conn: Any, sql: str, *args: Any) -> list[Any]:
    """Rows of `sql` ($n parameters) on an asyncpg connection or a SQLAlchemy one."""
    if hasattr(conn, "exec_driver_sql"):  # SQLAlchemy AsyncConnection on asyncpg
        return list((await conn.exec_driver_sql(sql, args)).all())
    return list(await conn.fetch(sql, *args))


async def claim_many(conn: Any, table: ClaimTable,
                     requests: Sequence[tuple[str, str] | None]) -> list[Claim | None]:
    """Claims (key, request hash) pairs in one statement; one Claim per request (None where
    none was given). The first request here with a key owns it if no earlier transaction
    did; a later one here with the same key and hash is a replay of it."""
    owner: dict[str, int] = {}
    hash_of: dict[str, str] = {}  # the owner's, then what is stored
    for i, request in enumerate(requests):
        if request is not None and request[0] not in owner:
            owner[request[0]], hash_of[request[0]] = i, request[1]
    keys = sorted(owner)
    if not keys:
        return [None] * len(requests)
    key = table.key_column
    if table.result_column is None:
        insert = (f"INSERT INTO {table.name} ({key}, request_hash) "
                  "SELECT * FROM unnest($1::text[], $2::text[]) ")
    else:
        insert = (f"INSERT INTO {table.name} ({key}, request_hash, {table.result_column}) "
                  "SELECT k, h, $3::text::jsonb FROM unnest($1::text[], $2::text[]) AS u(k, h) ")
    args: list[Any] = [keys, [hash_of[k] for k in keys]]
    if table.result_column is not None:
        args.append(table.placeholder)
    claimed = {r[0] for r in await _fetch(
        conn, insert + f"ON CONFLICT ({key}) DO NOTHING RETURNING {key}", *args)}
    stored: dict[str, str] = {}
    if len(claimed) < len(keys):
        result = f"{table.result_column}::text" if table.result_column else "NULL::text"
        for r in await _fetch(
                conn, f"SELECT {key}, request_hash, {result} FROM {table.name} "
                f"WHERE {key} = ANY($1::text[])", [k for k in keys if k not in claimed]):
            hash_of[r[0]] = r[1]
            if r[2] is not None:
                stored[r[0]] = r[2]
    claims: list[Claim | None] = []
    for i, request in enumerate(requests):
        if request is None:
            claims.append(None)
        elif hash_of[request[0]] != request[1]:
            claims.append(Claim(reused=True))
        elif owner[request[0]] == i and request[0] in claimed:
            claims.append(Claim(owned=True))
        else:
            claims.append(Claim(result=stored.get(request[0])))
    return claims


async def claim(conn: Any, table: ClaimTable, key: str, request_hash: str) -> Claim:
    """`claim_many` of one request."""
    (one,) = await claim_many(conn, table, [(key, request_hash)])
    assert one is not None
    return one


async def record(conn: Any, table: ClaimTable, key: str, result: str) -> None:
    """Stores the first answer (JSON text) of the request that owns `key`, in its
    transaction, for the replays to return."""
    assert table.result_column is not None
    await _fetch(conn, f"UPDATE {table.name} SET {table.result_column} = $2::text::jsonb "
                 f"WHERE {table.key_column} = $1 RETURNING true", key, result)
