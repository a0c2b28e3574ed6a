"""Readiness that follows the dependencies: what a lost database looks like, and what it does.

Two halves. `is_outage` says whether an exception means a dependency went away (PostgreSQL
restarting or unreachable, a vanished socket, a pool that cannot connect, Redis down, a
timeout): the kit's error mapping answers those UNAVAILABLE, which clients retry, instead of
INTERNAL, which they do not. `Readiness` turns the service NOT_SERVING when a call meets such
an outage, so load balancers and Kubernetes stop routing to a pod that cannot work, and back
to SERVING once its probes pass again — no restart.

No idle polling: while healthy nothing runs except a probe on a health check, at most one per
`probe_interval_s` (the kubelet's probe period paces it), so an outage with no traffic is seen
too. While unhealthy one task probes with backoff until the probes pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import asyncpg

from tally.kit.log import get_logger

log = get_logger("tally.kit.readiness")

Probe = Callable[[], Awaitable[object]]
"""A cheap check of one dependency (SELECT 1, PING); raises when the dependency is down."""

_POSTGRES_DOWN: Final = (
    asyncpg.PostgresConnectionError,  # class 08: connection lost, refused, does not exist
    asyncpg.exceptions.OperatorInterventionError,  # 57P: shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
)
_INTERFACE_GONE: Final = ("closed", "closing", "connection was lost")
# asyncpg's protocol state 2 is PROTOCOL_ERROR_CONSUME: a pooled connection that was idle when
# the server sent "terminating connection due to administrator command" (a PostgreSQL stop or
# restart) is left in it, and its next query fails this way instead of as a lost connection.
# (Two coroutines sharing one connection, the bug, is an InterfaceError and stays a bug.)
_PROTOCOL_LEFT_BY_SHUTDOWN: Final = "another operation (2) is in progress"


def _redis_down() -> tuple[type[BaseException], ...]:
    try:
        from redis import exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is a dependency of the limiter only
        return ()
    return (redis_errors.ConnectionError, redis_errors.TimeoutError)


_REDIS_DOWN: Final = _redis_down()


def is_outage(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) means a dependency is unreachable, not a bug.

    Looks through `__cause__`/`__context__` and SQLAlchemy's `.orig`, because drivers wrap.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen or len(seen) > 16:
            continue
        seen.add(id(current))
        if isinstance(current, _POSTGRES_DOWN + _REDIS_DOWN):
            return True
        # OSError covers a refused or reset connection, a vanished Unix socket
        # (FileNotFoundError) and TimeoutError (a pool acquire or connect that timed out).
        if isinstance(current, OSError):
            return True
        if isinstance(current, asyncpg.InterfaceError) and any(
                word in str(current) for word in _INTERFACE_GONE):
            return True
        if (isinstance(current, asyncpg.exceptions.InternalClientError)
                and _PROTOCOL_LEFT_BY_SHUTDOWN in str(current)):
            return True
        pending.extend((current.__cause__, current.__context__,
                        getattr(current, "orig", None)))
    return False


def postgres_probe(pool: asyncpg.Pool, timeout_s: float = 2.0) -> Probe:
    """A probe that runs SELECT 1 on a connection of `pool`."""

    async def probe() -> None:
        async with pool.acquire(timeout=timeout_s) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout_s)

    return probe


class Readiness:
    """SERVING while the probes pass; NOT_SERVING from the first outage a call meets (or a
    failed probe on a health check) until they pass again."""

    def __init__(self, name: str, probes: Sequence[Probe],
                 set_serving: Callable[[bool], Awaitable[None]], *,
                 probe_interval_s: float = 1.0, probe_timeout_s: float = 2.0,
                 max_backoff_s: float = 2.0) -> None:
        self.name = name
        self.probes = tuple(probes)
        self._set_serving = set_serving
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.max_backoff_s = max_backoff_s
        self.is_ready = True
        self._probed_at = 0.0
        self._recovery: asyncio.Task[None] | None = None
        self._closed = False

    def outage_seen(self, exc: BaseException) -> None:
        """A call met an unreachable dependency: NOT_SERVING now, probe until it is back."""
        if self._closed or not self.probes or not self.is_ready:
            return
        self.is_ready = False
        log.warning("dependency_unreachable", service=self.name, error=repr(exc))
        self._recovery = asyncio.create_task(self._recover(), name=f"{self.name}-readiness")

    async def on_health_check(self) -> None:
        """Called by the health service before it answers: probes when the last probe is
        older than `probe_interval_s`, so an outage without traffic is seen too."""
        if self._closed or not self.probes or not self.is_ready:
            return
        now = time.monotonic()
        if now - self._probed_at < self.probe_interval_s:
            return
        self._probed_at = now
        failure = await self._probe()
        if failure is not None:
            self.outage_seen(failure)
            await self._set_serving(False)

    async def close(self) -> None:
        """Stops probing (shutdown owns the health status from now on)."""
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery

    async def _probe(self) -> BaseException | None:
        for probe in self.probes:
            try:
                await asyncio.wait_for(probe(), self.probe_timeout_s)
            except Exception as exc:
                return exc
        return None

    async def _recover(self) -> None:
        await self._set_serving(False)
        started = time.monotonic()
        backoff_s = 0.05
        while await self._probe() is not None:
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self.max_backoff_s)
        if self._closed:
            return
        self.is_ready = True
        self._probed_at = time.monotonic()
        await self._set_serving(True)
        log.info("dependency_recovered", service=self.name,
                 not_serving_s=round(time.monotonic() - started, 3))
