"""Where the portal keeps sessions and sign-in attempts: in Redis when TALLY_REDIS_URL is set,
so every replica behind a load balancer knows every session (a sign-in may start on one
replica and return to another); in this process's memory otherwise (one replica, development).

Redis keys are the SHA-256 of the session id (a copy of Redis does not hand out live cookies);
each key expires with its session, and a sign-in attempt is taken once (GETDEL), so a replayed
callback finds nothing on any replica. With a key-encryption key (TALLY_KEK, tally.kit.secrets)
the values — access and refresh tokens, PKCE verifiers — are sealed, so a copy of Redis holds
no usable token either.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Final, Protocol

from redis.asyncio import Redis

from tally.kit.secrets import Sealer

from .domain import LOGIN_TTL_S, LoginAttempt, Session, new_login, new_session, unknown_login

PREFIX: Final = "tally:portal:"


class SessionStore(Protocol):
    """Sessions and sign-in attempts, by random id."""

    async def begin_login(self, next_path: str) -> LoginAttempt:
        """A new sign-in attempt returning to `next_path` (already checked)."""
        ...

    async def take_login(self, state: str) -> LoginAttempt:
        """The attempt `state` names, once; INVALID_ARGUMENT if unknown or expired."""
        ...

    async def create(self, subject: str, *, access_token: str = "", refresh_token: str = "",
                     expires_in_s: float = 0.0) -> Session:
        """A new session with a fresh id and CSRF token."""
        ...

    async def get(self, session_id: str) -> Session | None:
        """The live session `session_id` names, if any."""
        ...

    async def save(self, session: Session) -> None:
        """Stores a session's refreshed tokens."""
        ...

    async def drop(self, session_id: str) -> None:
        """Ends a session (logout)."""
        ...

    async def close(self) -> None:
        ...


class MemorySessions:
    """This process's sessions: one replica only."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._logins: dict[str, LoginAttempt] = {}

    async def begin_login(self, next_path: str) -> LoginAttempt:
        for state in [s for s, a in self._logins.items() if a.is_expired]:
            del self._logins[state]
        attempt = new_login(next_path)
        self._logins[attempt.state] = attempt
        return attempt

    async def take_login(self, state: str) -> LoginAttempt:
        attempt = self._logins.pop(state, None)
        if attempt is None or attempt.is_expired:
            raise unknown_login()
        return attempt

    async def create(self, subject: str, *, access_token: str = "", refresh_token: str = "",
                     expires_in_s: float = 0.0) -> Session:
        session = new_session(subject, self.ttl_s, access_token=access_token,
                              refresh_token=refresh_token, expires_in_s=expires_in_s)
        self._sessions[session.session_id] = session
        return session

    async def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None or session.is_expired:
            self._sessions.pop(session_id, None)
            return None
        return session

    async def save(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    async def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def close(self) -> None:
        pass


def _key(kind: str, token: str) -> str:
    return PREFIX + kind + ":" + hashlib.sha256(token.encode()).hexdigest()


class RedisSessions:
    """Sessions shared by every replica through Redis."""

    def __init__(self, url: str, ttl_s: float, sealer: Sealer | None = None) -> None:
        self.ttl_s = ttl_s
        self.sealer = sealer
        self.redis = Redis.from_url(url, socket_timeout=5.0, decode_responses=True)

    def _seal(self, value: object) -> str:
        text = json.dumps(value)
        return self.sealer.seal(text) if self.sealer is not None else text

    def _open(self, raw: str) -> dict[str, object]:
        opened: dict[str, object] = json.loads(
            self.sealer.open(raw) if self.sealer is not None else raw)
        return opened

    async def begin_login(self, next_path: str) -> LoginAttempt:
        attempt = new_login(next_path)
        await self.redis.set(_key("login", attempt.state), self._seal(asdict(attempt)),
                             ex=int(LOGIN_TTL_S))
        return attempt

    async def take_login(self, state: str) -> LoginAttempt:
        raw = await self.redis.getdel(_key("login", state)) if state else None
        attempt = LoginAttempt(**self._open(raw)) if raw else None  # type: ignore[arg-type]
        if attempt is None or attempt.is_expired:
            raise unknown_login()
        return attempt

    async def create(self, subject: str, *, access_token: str = "", refresh_token: str = "",
                     expires_in_s: float = 0.0) -> Session:
        session = new_session(subject, self.ttl_s, access_token=access_token,
                              refresh_token=refresh_token, expires_in_s=expires_in_s)
        await self.save(session)
        return session

    async def get(self, session_id: str) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        raw = await self.redis.get(_key("session", session_id))
        if not raw:
            return None
        # the value never holds the id (only the cookie does): it is the key's preimage
        fields = self._open(str(raw))
        fields.pop("session_id", None)
        session = Session(session_id=session_id, **fields)  # type: ignore[arg-type]
        return None if session.is_expired else session

    async def save(self, session: Session) -> None:
        left_s = int(session.expires_at - time.time())
        if left_s > 0:
            value = asdict(session)
            del value["session_id"]
            await self.redis.set(_key("session", session.session_id), self._seal(value),
                                 ex=left_s)

    async def drop(self, session_id: str) -> None:
        if session_id:
            await self.redis.delete(_key("session", session_id))

    async def close(self) -> None:
        await self.redis.aclose()
