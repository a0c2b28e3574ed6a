"""tally.kit.idempotency: the one claim every idempotent write path uses, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tally.kit import db, idempotency

_TABLE = idempotency.ClaimTable("notifier.admin_requests")
_KEYS_ONLY = idempotency.ClaimTable("ledger.idempotency_keys", key_column="key",
                                    result_column=None)


async def test_a_replay_gets_the_first_answer_and_another_request_under_the_key_is_refused(
        db_url: str) -> None:
    pool = await db.create_pool(db_url)
    try:
        async with pool.acquire() as conn, conn.transaction():
            first = await idempotency.claim(conn, _TABLE, "k1", "hash-a")
            assert first.owned and not first.replay
            await idempotency.record(conn, _TABLE, "k1", json.dumps({"answer": 7}))
        async with pool.acquire() as conn, conn.transaction():
            again = await idempotency.claim(conn, _TABLE, "k1", "hash-a")
            other = await idempotency.claim(conn, _TABLE, "k1", "hash-b")
        assert again.replay and json.loads(again.result or "") == {"answer": 7}
        assert other.reused and not other.owned
    finally:
        await pool.close()


async def test_a_claim_rolled_back_with_its_write_leaves_the_key_free(db_url: str) -> None:
    pool = await db.create_pool(db_url)
    try:
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                assert (await idempotency.claim(conn, _TABLE, "k", "h")).owned
                raise RuntimeError("the write failed")
        async with pool.acquire() as conn, conn.transaction():
            assert (await idempotency.claim(conn, _TABLE, "k", "h")).owned
    finally:
        await pool.close()


async def test_many_claims_own_each_key_once_and_answer_repeats_in_the_group(
        db_url: str) -> None:
    pool = await db.create_pool(db_url)
    try:
        async with pool.acquire() as conn, conn.transaction():
            assert (await idempotency.claim(conn, _KEYS_ONLY, "b", "hb")).owned
        async with pool.acquire() as conn, conn.transaction():
            claims = await idempotency.claim_many(conn, _KEYS_ONLY, [
                ("a", "ha"), None, ("b", "hb"), ("a", "ha"), ("c", "hc"), ("c", "other")])
        assert [None if c is None else (c.owned, c.replay, c.reused) for c in claims] == [
            (True, False, False), None, (False, True, False), (False, True, False),
            (True, False, False), (False, False, True)]
    finally:
        await pool.close()


async def test_concurrent_claims_of_one_key_give_it_to_exactly_one_transaction(
        db_url: str) -> None:
    pool = await db.create_pool(db_url, max_size=16)
    try:
        async def one() -> bool:
            async with pool.acquire() as conn, conn.transaction():
                claimed = await idempotency.claim(conn, _TABLE, "hot", "h")
                if claimed.owned:
                    await idempotency.record(conn, _TABLE, "hot", '{"n": 1}')
                return claimed.owned

        owners = await asyncio.gather(*[one() for _ in range(16)])
        assert owners.count(True) == 1
    finally:
        await pool.close()


async def test_the_claim_runs_inside_a_sqlalchemy_transaction(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        with pytest.raises(RuntimeError):
            async with engine.begin() as conn:
                assert (await idempotency.claim(conn, _TABLE, "sa", "h")).owned
                raise RuntimeError("rolled back")
        async with engine.begin() as conn:
            assert (await idempotency.claim(conn, _TABLE, "sa", "h")).owned
            await idempotency.record(conn, _TABLE, "sa", '{"ok": true}')
        async with engine.begin() as conn:
            replay = await idempotency.claim(conn, _TABLE, "sa", "h")
        assert replay.replay and json.loads(replay.result or "") == {"ok": True}
        raw = await asyncpg.connect(db.asyncpg_url(db_url))
        try:
            assert await raw.fetchval(
                "SELECT result->>'ok' FROM notifier.admin_requests WHERE request_id = 'sa'"
            ) == "true"
        finally:
            await raw.close()
    finally:
        await engine.dispose()
