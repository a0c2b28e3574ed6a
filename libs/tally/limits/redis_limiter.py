"""The Redis limiter: one set of counters shared by every replica.

Each decision is decided by `gcra.lua`, atomically: all of its limits are consumed or none.
Concurrent decisions are pipelined: while one round trip is in flight the next ones queue,
and each round trip carries a few script calls of up to 64 decisions. Every key of a decision
shares a Redis Cluster hash tag (e.g. "{org}:quota:..."); in cluster mode a script call holds
one tag's decisions only, so it never crosses slots.

When Redis cannot be reached the outage policy decides, and says so in the verdict
(`degraded`): hard limits fail closed (deny, retry after the probe interval) or, if so
configured, fall back to this replica's own counters; soft limits are counted locally.
Redis is tried again after the probe interval; going down and coming back are logged once.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Final

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tally.kit import metrics
from tally.kit.log import get_logger

from .memory import InProcessLimiter, wall_clock_us
from .model import Limit, Verdict

log = get_logger("limits.redis")

SCRIPT: Final = resources.files(__package__).joinpath("gcra.lua").read_text()
OWN_CLOCK_MIN_TTL_MS: Final = 3_600_000
"""With a caller's clock (tests), counters live at least this long in Redis's own time."""
MAX_DECISIONS_PER_CALL: Final = 64
"""Decisions per script call: bounds how long one call holds Redis's single thread."""
_DOWN_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class OutagePolicy(enum.StrEnum):
    """What hard limits do while Redis is unreachable."""

    DENY = "deny"
    """Fail closed: every decision with a hard limit is denied."""
    LOCAL = "local"
    """Enforce them on this replica's own counters (each replica admits up to the limit)."""


def hash_tag(key: str) -> str:
    """The Redis Cluster hash tag of `key` (the whole key when it has none)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def _arguments(limits: Sequence[Limit]) -> list[Any]:
    args: list[Any] = [len(limits)]
    for limit in limits:
        args += limit.wire
    return args


def _parse(reply: Sequence[int], count: int) -> list[Verdict]:
    verdicts = []
    at = 0
    for _ in range(count):
        allowed, retry, n = reply[at], reply[at + 1], reply[at + 2]
        remaining = tuple(int(v) for v in reply[at + 3:at + 3 + n])
        at += 3 + n
        d = reply[at]
        denied = tuple(int(v) for v in reply[at + 1:at + 1 + d])
        at += 1 + d
        verdicts.append(Verdict(bool(allowed), remaining, int(retry), denied))
    return verdicts


class RedisLimiter:
    """Shared counters in Redis, with an explicit policy for when Redis is unreachable."""

    def __init__(self, url: str, *, on_outage: OutagePolicy = OutagePolicy.DENY,
                 timeout_s: float = 0.25, probe_interval_s: float = 1.0,
                 clock_us: Callable[[], int] | None = None, cluster: bool = False) -> None:
        # Fail fast: a limiter that waits out reconnect backoffs stalls every Authorize.
        self.client = Redis.from_url(url, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self.on_outage = on_outage
        self.probe_interval_s = probe_interval_s
        self.clock_us = clock_us
        """None: the Redis server's clock, the one every replica shares (tests set one)."""
        self.cluster = cluster
        """Redis Cluster: one script call per hash tag; else any decisions share a call."""
        self.local = InProcessLimiter(clock_us or wall_clock_us)
        self._sha = ""
        self._down_until = 0.0
        self._outage_since: float | None = None
        self._queue: list[tuple[Sequence[Limit], asyncio.Future[Verdict]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def ping(self) -> None:
        """Raises while Redis is unreachable (a readiness probe)."""
        await self.client.ping()

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down (the outage policy answers)."""
        return time.monotonic() < self._down_until

    async def acquire(self, limits: Sequence[Limit]) -> Verdict:
        """The verdict on one decision, pipelined with the decisions of concurrent callers."""
        if not limits:
            return Verdict(True, ())
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._queue.append((limits, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="limiter-flush")
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                verdicts = await self.acquire_many([limits for limits, _ in batch])
            except BaseException as exc:  # every waiter must hear of it, cancellation too
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), verdict in zip(batch, verdicts, strict=True):
                if not future.done():
                    future.set_result(verdict)

    async def acquire_many(self, decisions: Sequence[Sequence[Limit]]) -> list[Verdict]:
        """Verdicts on many decisions in one pipelined round trip, in order."""
        if not self.degraded:
            try:
                return await self._decide(decisions)
            except _DOWN_ERRORS as exc:
                metrics.LIMITER_BACKEND_ERRORS.labels("redis").inc()
                self._down_until = time.monotonic() + self.probe_interval_s
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("limiter_redis_unavailable", error=repr(exc),
                                policy=self.on_outage.value,
                                probe_interval_s=self.probe_interval_s)
                return [self._outage_verdict(limits) for limits in decisions]
        return [self._outage_verdict(limits) for limits in decisions]

    async def _decide(self, decisions: Sequence[Sequence[Limit]]) -> list[Verdict]:
        calls: list[tuple[list[int], list[str], list[Any]]] = []
        open_call: dict[str, int] = {}
        for index, limits in enumerate(decisions):
            tag = hash_tag(limits[0].key) if limits else ""
            if any(hash_tag(limit.key) != tag for limit in limits):
                raise ValueError(f"limits of one decision must share a hash tag: "
                                 f"{[limit.key for limit in limits]}")
            at = open_call.get(tag if self.cluster else "")
            if at is None or len(calls[at][0]) >= MAX_DECISIONS_PER_CALL:
                open_call[tag if self.cluster else ""] = at = len(calls)
                calls.append(([], [], []))
            members, keys, args = calls[at]
            members.append(index)
            keys.extend(limit.key for limit in limits)
            args.extend(_arguments(limits))
        now = "" if self.clock_us is None else str(self.clock_us())
        replies = await self._run(now, calls)
        if self._outage_since is not None:
            log.info("limiter_redis_recovered",
                     outage_s=round(time.monotonic() - self._outage_since, 3))
            self._outage_since = None
        verdicts: list[Verdict | None] = [None] * len(decisions)
        for (members, _, _), reply in zip(calls, replies, strict=True):
            for index, verdict in zip(members, _parse(reply, len(members)), strict=True):
                verdicts[index] = verdict
        return [v if v is not None else Verdict(True, ()) for v in verdicts]

    async def _run(self, now: str, calls: list[tuple[list[int], list[str], list[Any]]]
                   ) -> list[Any]:
        if not self._sha:
            self._sha = await self.client.script_load(SCRIPT)
        replies = await self._pipeline(now, calls)
        lost = [i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)]
        if lost:  # Redis restarted or flushed its scripts: those calls did nothing
            self._sha = await self.client.script_load(SCRIPT)
            again = await self._pipeline(now, [calls[i] for i in lost])
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _pipeline(self, now: str, calls: list[tuple[list[int], list[str], list[Any]]]
                        ) -> list[Any]:
        min_ttl = 0 if self.clock_us is None else OWN_CLOCK_MIN_TTL_MS
        async with self.client.pipeline(transaction=False) as pipe:
            for members, keys, args in calls:
                pipe.evalsha(self._sha, len(keys), *keys, now, min_ttl, len(members), *args)
            return list(await pipe.execute(raise_on_error=False))

    def _outage_verdict(self, limits: Sequence[Limit]) -> Verdict:
        metrics.LIMITER_DEGRADED_DECISIONS.labels("redis", self.on_outage.value).inc()
        now = self.local.clock_us()
        if self.on_outage is OutagePolicy.DENY and any(limit.hard for limit in limits):
            hard = tuple(i for i, limit in enumerate(limits) if limit.hard)
            retry = int(self.probe_interval_s * 1_000_000)
            return Verdict(False, tuple(0 for _ in limits), retry, hard, degraded=True)
        verdict = self.local.decide(limits, now)
        return Verdict(verdict.allowed, verdict.remaining, verdict.retry_after_us,
                       verdict.denied_by, degraded=True)

    async def close(self) -> None:
        """Waits for queued decisions, then closes the connections."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.client.aclose()


