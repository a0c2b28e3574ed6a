"""The portal's Redis session store on a real Redis: what a copy of Redis reveals (no cookie's
session id; with a key-encryption key no token either), single-use sign-in attempts, sign-out."""

from __future__ import annotations

import base64
import os

import pytest
from redis.asyncio import Redis

from services.portal.sessions import PREFIX, RedisSessions
from tally.kit.errors import TallyError
from tally.kit.secrets import Sealer

KEK = Sealer({"k1": os.urandom(32)})


async def _stored(redis_url: str) -> dict[str, str]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [k async for k in redis.scan_iter(match=PREFIX + "*")]
        return {k: str(await redis.get(k)) for k in keys}
    finally:
        await redis.aclose()


@pytest.mark.parametrize("sealed", [True, False])
async def test_redis_holds_no_cookie_and_with_a_kek_no_token(redis_url: str,
                                                             sealed: bool) -> None:
    store = RedisSessions(redis_url, 60, KEK if sealed else None)
    token = base64.urlsafe_b64encode(os.urandom(24)).decode()
    try:
        session = await store.create("sam", access_token=f"at-{token}",
                                     refresh_token=f"rt-{token}", expires_in_s=30)
        stored = await _stored(redis_url)
        # keys are hashes of the session id and values never hold it: a copy of Redis hands
        # out no cookie, sealed or not
        assert not any(session.session_id in k or session.session_id in v
                       for k, v in stored.items())
        if sealed:
            assert not any(token in v for v in stored.values())
            assert any(v.startswith("tlyenc1:") for v in stored.values())
        else:  # without a KEK the token is there: sealing is what hides it
            assert any(token in v for v in stored.values())
        again = await store.get(session.session_id)
        assert again == session and again.access_token == f"at-{token}"
        await store.drop(session.session_id)
        assert await store.get(session.session_id) is None
    finally:
        await store.close()


async def test_a_sign_in_attempt_is_taken_once_on_any_replica(
        redis_url: str) -> None:
    store = RedisSessions(redis_url, 60, KEK)
    try:
        attempt = await store.begin_login("/orgs/x/usage")
        taken = await store.take_login(attempt.state)
        assert taken == attempt
        with pytest.raises(TallyError):
            await store.take_login(attempt.state)
        with pytest.raises(TallyError):
            await store.take_login("")
        assert await store.get("no-such-session") is None
        assert await store.get("x" * 200) is None  # longer than any id: not even looked up
    finally:
        await store.close()
