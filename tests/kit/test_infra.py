"""The suite's real servers: PostgreSQL and a Redis-compatible server answer real commands."""

from __future__ import annotations

import asyncpg
import redis.asyncio as redis

from tally.kit import db


async def test_the_redis_server_answers(redis_url: str) -> None:
    client = redis.from_url(redis_url)
    try:
        assert await client.ping()
        await client.set("tally:test:key", "42")
        assert await client.get("tally:test:key") == b"42"
        assert await client.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1,
                                 "tally:test:n", 5) == 5
    finally:
        await client.delete("tally:test:key", "tally:test:n")
        await client.aclose()


async def test_each_test_database_has_every_service_schema(db_url: str) -> None:
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        schemas = {r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace")}
        versions = {
            s: await conn.fetchval(f'SELECT version_num FROM "{s}".alembic_version')
            for s in db.SERVICES
        }
    finally:
        await conn.close()
    assert set(db.SERVICES) <= schemas
    assert all(versions.values()), versions
