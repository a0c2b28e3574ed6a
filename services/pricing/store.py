"""PriceBookStore on PostgreSQL: `pricing.price_books`, append-only, plus its change feed.

Publishing takes one transaction-scoped advisory lock, so concurrent publishes (and two
replicas bootstrapping an empty table at once) run one after the other: the request_id
replay check, `version = max + 1` and the effective-time rule are all decided on rows nobody
else can change meanwhile. The primary key on version, UNIQUE request_id and UNIQUE
effective_from back that up.

Each commit NOTIFYs `pricing_price_books`; `follow` LISTENs on a dedicated connection so every
replica learns of a publish within milliseconds (a periodic poll in the server covers a lost
connection).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Final

import asyncpg

from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.rating import PriceBook, dump_price_book, parse_price_book

from .domain import (
    BOOTSTRAP_ACTOR,
    BOOTSTRAP_REQUEST_ID,
    EPOCH,
    PublishCommand,
    PublishedBook,
    VersionHeader,
    check_effective_from,
)

log = get_logger("pricing.store")

CHANNEL: Final = "pricing_price_books"
_PUBLISH_LOCK_KEY: Final = 0x7A11_0B00
_COLUMNS: Final = "version, effective_from, published_at, published_by, request_hash, body"


def _body(book: PriceBook, custom: Mapping[str, Decimal]) -> str:
    return json.dumps({"book": dump_price_book(book),
                       "custom_credit_price_minor": {k: str(v) for k, v in custom.items()}})


def _published(row: asyncpg.Record) -> PublishedBook:
    body = json.loads(row["body"], parse_float=Decimal)
    book = parse_price_book(body["book"])
    return PublishedBook(
        version=row["version"], published_at=row["published_at"],
        published_by=row["published_by"], book=book,
        custom_credit_price_minor={k: Decimal(v) for k, v in
                                   body.get("custom_credit_price_minor", {}).items()})


class PriceBookPgStore:
    """The domain's PriceBookStore over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self.pool = pool
        self.database_url = database_url

    async def books_after(self, version: int) -> list[PublishedBook]:
        """Every book with a version above `version`, ascending."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM pricing.price_books WHERE version > $1 ORDER BY version",
            version)
        return [_published(r) for r in rows]

    async def publish(self, command: PublishCommand, now: datetime) -> tuple[PublishedBook, bool]:
        """Appends the next version, or replays the one `command.request_id` published."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PUBLISH_LOCK_KEY)
            earlier = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM pricing.price_books WHERE request_id = $1",
                command.request_id)
            if earlier is not None:
                if earlier["request_hash"] != command.request_hash:
                    raise TallyError(
                        Reason.IDEMPOTENCY_KEY_REUSED,
                        f"request_id: {command.request_id!r} already published a different "
                        "price book", field="request_id")
                return _published(earlier), True
            latest = await conn.fetchrow(
                "SELECT version, effective_from FROM pricing.price_books "
                "ORDER BY version DESC LIMIT 1")
            effective_from = command.effective_from or now
            check_effective_from(effective_from, now,
                                 latest["effective_from"] if latest else None)
            version = (latest["version"] if latest else 0) + 1
            book = _renumbered(command.draft.book, version, effective_from)
            row = await conn.fetchrow(
                "INSERT INTO pricing.price_books (version, effective_from, published_at, "
                "published_by, request_id, request_hash, body) "
                f"VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) RETURNING {_COLUMNS}",
                version, effective_from, now, command.published_by, command.request_id,
                command.request_hash, _body(book, command.draft.custom_credit_price_minor))
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(version))
        assert row is not None
        return _published(row), False

    async def bootstrap(self, book: PriceBook, custom: Mapping[str, Decimal],
                        now: datetime) -> bool:
        """Version 1 = `book` from the epoch, if the table is empty (one replica wins)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PUBLISH_LOCK_KEY)
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pricing.price_books)"):
                return False
            await conn.execute(
                "INSERT INTO pricing.price_books (version, effective_from, published_at, "
                "published_by, request_id, request_hash, body) "
                "VALUES (1, $1, $2, $3, $4, '', $5::jsonb)",
                EPOCH, now, BOOTSTRAP_ACTOR, BOOTSTRAP_REQUEST_ID,
                _body(_renumbered(book, 1, EPOCH), custom))
            await conn.execute("SELECT pg_notify($1, '1')", CHANNEL)
        return True

    async def versions(self, before_version: int | None, limit: int) -> list[VersionHeader]:
        """Headers of versions below `before_version`, newest first."""
        rows = await self.pool.fetch(
            "SELECT version, effective_from, published_at, published_by, "
            "coalesce(body->'book'->>'note', '') AS note FROM pricing.price_books "
            "WHERE $1::bigint IS NULL OR version < $1 ORDER BY version DESC LIMIT $2",
            before_version, limit)
        return [VersionHeader(r["version"], r["effective_from"], r["published_at"],
                              r["published_by"], r["note"]) for r in rows]



def _renumbered(book: PriceBook, version: int, effective_from: datetime) -> PriceBook:
    return PriceBook(version=str(version), effective_from=effective_from, lines=book.lines,
                     models=book.models, costs=book.costs, packages=book.packages,
                     note=book.note)
