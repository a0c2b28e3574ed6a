"""The delivery worker: sends what is due, settles each attempt, backs off, dead-letters.

Woken when new notifications are recorded, and otherwise every poll interval (retries come
due on their own). Sends run concurrently up to a bound; one slow receiver does not hold up
the rest of a batch beyond the sender's timeout.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from opentelemetry import trace

from tally.kit import metrics
from tally.kit.log import get_logger
from tally.kit.telemetry import continue_trace

from .alerting import FIRST_RETRY, Notification, retry_at
from .channels import Sender, SendFailed
from .delivery_store import Delivery, DeliveryStore
from .domain import Channel

log = get_logger("notifier.deliveries")
_tracer = trace.get_tracer("tally.notifier")


class DeliveryWorker:
    """Sends due deliveries through their channel's sender."""

    def __init__(self, store: DeliveryStore, senders: Mapping[Channel, Sender], *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 first_retry: timedelta = FIRST_RETRY, concurrency: int = 16,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.senders = senders
        self.clock = clock
        self.first_retry = first_retry
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)

    async def run_due(self) -> int:
        """One pass: sends every delivery due now; returns how many were attempted."""
        attempted = 0
        while True:
            claimed = await self.store.claim_due(self.clock())
            if not claimed:
                return attempted
            await asyncio.gather(*(self._attempt(d, n) for d, n in claimed))
            attempted += len(claimed)

    async def _attempt(self, delivery: Delivery, notification: Notification) -> None:
        async with self._slots:
            sender = self.senders.get(delivery.channel)
            with _tracer.start_as_current_span(
                    "notifier.deliver", context=continue_trace(notification.trace_id),
                    kind=trace.SpanKind.PRODUCER,
                    attributes={"tally.org_id": delivery.org_id,
                                "tally.notification_id": notification.notification_id,
                                "tally.channel": delivery.channel.value}) as span:
                error = ""
                if sender is None:
                    error = f"no sender for channel {delivery.channel.value}"
                else:
                    try:
                        await sender.send(delivery, notification)
                    except SendFailed as exc:
                        error = str(exc) or "failed"
                now = self.clock()
                again = retry_at(delivery.attempts + 1, now, self.rng, self.first_retry)
                outcome = ("delivered" if not error else "retrying" if again
                           else "dead_lettered")
                span.set_attribute("tally.outcome", outcome)
                metrics.WEBHOOK_DELIVERIES.labels(delivery.channel.value, outcome).inc()
                await self.store.settle(delivery.delivery_id, now, error,
                                        again if error else None)
                if error:
                    log.info("delivery_failed", delivery_id=delivery.delivery_id,
                             channel=delivery.channel.value, attempts=delivery.attempts + 1,
                             error=error, outcome=outcome)

    async def run(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Sends until `stop`: on every wake-up, and every `poll_s` for retries."""
        while not stop.is_set():
            try:
                await self.run_due()
            except Exception as exc:  # the database is away: try again next round
                log.warning("delivery_pass_failed", error=repr(exc))
            waits = [asyncio.ensure_future(self.wake.wait()),
                     asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            self.wake.clear()
