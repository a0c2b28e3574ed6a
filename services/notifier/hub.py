"""Subscribe's fan-out: new notifications to the streams open for their org, in process.

A subscriber that does not keep up loses its oldest unsent notifications rather than slowing
the others (the delivery log keeps everything; Subscribe is for live views).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Final

from .alerting import Notification
from .domain import NotificationType

QUEUE_SIZE: Final = 1000


class NotificationHub:
    """Open Subscribe streams by org."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[Notification]]] = {}

    def publish(self, notifications: Sequence[Notification]) -> None:
        """Hands each notification to its org's open streams."""
        for notification in notifications:
            for queue in self._subscribers.get(notification.org_id, ()):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(notification)

    async def subscribe(self, org_id: str, types: Collection[NotificationType],
                        stop: asyncio.Event) -> AsyncIterator[Notification]:
        """The org's notifications (of `types`; empty = all) from now until `stop`."""
        queue: asyncio.Queue[Notification] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.setdefault(org_id, set()).add(queue)
        try:
            while not stop.is_set():
                getting = asyncio.ensure_future(queue.get())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait((getting, stopping), return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not getting.done():
                    getting.cancel()
                    return
                notification = getting.result()
                if not types or notification.type in types:
                    yield notification
        finally:
            self._subscribers[org_id].discard(queue)
            if not self._subscribers[org_id]:
                del self._subscribers[org_id]

    def subscribers(self, org_id: str) -> int:
        """Open streams of the org."""
        return len(self._subscribers.get(org_id, ()))
