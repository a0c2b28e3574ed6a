"""Reporting what a request used, against its reservation: one `RecordUsage` per request, or,
for high rates, one long-lived `StreamUsage` per gateway process that batches the requests in
flight (acked per batch after the events and their debit are durable, DESIGN §2).

Both return the event's result (its receipt); a replay of the same event id returns the first
receipt (DUPLICATE), so a retried request is never charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any, Protocol

from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient

log = get_logger("gateway.usage")


class UsageReporter(Protocol):
    """Where the gateway reports usage."""

    async def report(self, event: mpb.UsageEvent) -> mpb.EventResult:
        """The event's result once it is durable."""
        ...

    async def close(self) -> None:
        """Stops reporting (in-flight reports finish or fail)."""
        ...


class RecordUsageReporter:
    """One RecordUsage call per request."""

    def __init__(self, tally: TallyClient) -> None:
        self.tally = tally

    async def report(self, event: mpb.UsageEvent) -> mpb.EventResult:
        """RecordUsage with one event."""
        reply = await self.tally.metering.RecordUsage(mpb.RecordUsageRequest(events=[event]))
        return reply.results[0]

    async def close(self) -> None:
        """Nothing to stop."""


_Waiting = tuple[mpb.UsageEvent, "asyncio.Future[mpb.EventResult]"]


class StreamUsageReporter:
    """Every request of the process over one StreamUsage: events waiting when a batch leaves
    go together (up to `max_batch`); each waits for its batch's ack. A stream that ends (its
    lifetime cap asks to reconnect, or it fails) is replaced; reports caught in a failed one
    fail with the stream's error (the caller may retry: event ids make it safe)."""

    def __init__(self, tally: TallyClient, max_batch: int = 500) -> None:
        self.tally = tally
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._batches = itertools.count(1)

    async def report(self, event: mpb.UsageEvent) -> mpb.EventResult:
        """Queues the event for the next batch and waits for its ack."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stream-usage")
        done: asyncio.Future[mpb.EventResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((event, done))
        return await done

    async def close(self) -> None:
        """Stops the stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._one_stream()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream failed: a new one for what comes next
                log.warning("stream_usage_lost", error=str(exc))

    async def _one_stream(self) -> None:
        call: Any = self.tally.metering.StreamUsage()
        pending: dict[str, list[asyncio.Future[mpb.EventResult]]] = {}
        reconnect = asyncio.Event()

        async def acks() -> None:
            async for ack in call:
                if ack.reconnect:
                    reconnect.set()
                for done, result in zip(pending.pop(ack.batch_id, []), ack.results,
                                        strict=False):
                    if not done.done():
                        done.set_result(result)

        reader = asyncio.create_task(acks())
        try:
            while not reconnect.is_set() and not reader.done():
                getting = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getting, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                batch = [getting.result()]
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                batch_id = str(next(self._batches))
                pending[batch_id] = [done for _, done in batch]
                await call.write(mpb.StreamUsageRequest(
                    batch_id=batch_id, events=[event for event, _ in batch]))
            with contextlib.suppress(Exception):
                await call.done_writing()
            await reader  # the acks of what was sent, then the stream's end
        finally:
            reader.cancel()
            lost = TallyError(Reason.UNAVAILABLE, "the usage stream ended before its ack")
            for waiting in pending.values():
                for done in waiting:
                    if not done.done():
                        done.set_exception(lost)
