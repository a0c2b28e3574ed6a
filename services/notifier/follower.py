"""Follows the ledger's and metering's outboxes (their StreamEvents RPCs) from where the
notifier last recorded, and hands each batch to the delivery store.

A stream that ends (the server's lifetime cap, a restart) or fails is reopened after the last
recorded sequence, with a short backoff; what was read but not recorded is read again, and
recording is idempotent, so nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc
from opentelemetry import trace

from tally.common.v1 import common_pb2
from tally.kit import metrics
from tally.kit.log import get_logger
from tally.kit.protoconv import from_timestamp
from tally.kit.telemetry import continue_trace
from tally.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tally.metering.v1 import metering_pb2, metering_pb2_grpc

from .alerting import Notification, SourceEvent
from .delivery_store import DeliveryStore

log = get_logger("notifier.follower")
_tracer = trace.get_tracer("tally.notifier")


class Source(Protocol):
    """One outbox, as a stream of event batches after a sequence."""

    name: str

    def batches(self, after: int) -> AsyncIterator[list[SourceEvent]]:
        """Batches of events with sequence > `after`, in order, until the stream ends."""
        ...


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


class LedgerSource:
    """The ledger's outbox."""

    name = "ledger"

    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
        self.stub = stub

    async def batches(self, after: int) -> AsyncIterator[list[SourceEvent]]:
        """Ledger events converted for the notifier."""
        stream = self.stub.StreamEvents(ledger_pb2.StreamEventsRequest(after_event_sequence=after))
        async for message in stream:
            yield [SourceEvent(
                "ledger", e.event_id, e.sequence, e.org_id,
                _enum_name(ledger_pb2.OutboxEventType, e.type, "OUTBOX_EVENT_TYPE_"),
                from_timestamp(e, "occurred_at") or datetime.now(UTC),
                e.traceparent or e.trace_id,  # continue_trace puts the alert under its span
                e.available_micros_after,
                {**dict(e.attributes), "arrears_micros": str(e.arrears_micros),
                 "billing_state": _enum_name(common_pb2.BillingState, e.billing_state,
                                             "BILLING_STATE_")})
                for e in message.events]


class MeteringSource:
    """Metering's outbox (budget alarms)."""

    name = "metering"

    def __init__(self, stub: metering_pb2_grpc.MeteringServiceAsyncStub) -> None:
        self.stub = stub

    async def batches(self, after: int) -> AsyncIterator[list[SourceEvent]]:
        """Metering events converted for the notifier."""
        stream = self.stub.StreamEvents(metering_pb2.StreamEventsRequest(after_sequence=after))
        async for message in stream:
            yield [SourceEvent(
                "metering", e.event_id, e.sequence, e.org_id,
                _enum_name(metering_pb2.OutboxEventType, e.type, "OUTBOX_EVENT_TYPE_"),
                from_timestamp(e, "occurred_at") or datetime.now(UTC),
                e.traceparent or e.trace_id, None,  # the alarm's span as the parent
                {**dict(e.attributes), "budget_id": e.budget_id,
                 "threshold_percent": str(e.threshold_percent),
                 "spent_micros": str(e.spent_micros), "limit_micros": str(e.limit_micros)})
                for e in message.events]


class Follower:
    """Records every event of its sources, forever, and tells `on_new` what it caused."""

    def __init__(self, store: DeliveryStore, sources: Sequence[Source],
                 on_new: Callable[[list[Notification]], None],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.sources = sources
        self.on_new = on_new
        self.clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        """Follows every source until `stop`."""
        await asyncio.gather(*(self._follow(source, stop) for source in self.sources))

    async def _follow(self, source: Source, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                after = await self.store.cursor(source.name)
                reading = self._read(source, after)
                stopping = asyncio.ensure_future(stop.wait())
                task = asyncio.ensure_future(reading)
                await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return
                task.result()
                backoff = 0.1
            except (grpc.aio.AioRpcError, OSError) as exc:
                log.info("outbox_stream_lost", source=source.name, error=str(exc)[:200])
            except Exception as exc:  # the database is away: retry after the backoff
                log.warning("outbox_follow_failed", source=source.name, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 2.0)

    async def _read(self, source: Source, after: int) -> None:
        async for batch in source.batches(after):
            fresh = await self.store.record(source.name, batch, self.clock())
            for notification in fresh:
                metrics.NOTIFICATIONS.labels(notification.type.value).inc()
                # the alert in the trace of the request whose event caused it
                _tracer.start_span(
                    "notifier.notification", context=continue_trace(notification.trace_id),
                    attributes={"tally.org_id": notification.org_id,
                                "tally.notification_type": notification.type.value,
                                "tally.source_event_id": notification.source_event_id}).end()
            if fresh:
                self.on_new(fresh)
