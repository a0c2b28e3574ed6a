"""Background work of a service: periodic tasks that stop with the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tally.kit.log import get_logger

log = get_logger("tally.kit.background")


async def run_periodically(name: str, interval_s: float,
                           task: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
    """Runs `task` every `interval_s` until `stop` is set; a failure is logged, not fatal."""
    while not stop.is_set():
        try:
            await task()
        except Exception:
            log.exception("background_task_failed", task=name)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass


async def refresh_on_wake(name: str, refresh: Callable[[], Awaitable[Any]], wake: asyncio.Event,
                          stop: asyncio.Event, interval_s: float,
                          errors: tuple[type[BaseException], ...]) -> None:
    """Runs `refresh` each time `wake` is set (a LISTEN follower sets it), and at least every
    `interval_s` in case a notification was lost, until `stop`. A failure of one of `errors`
    is logged and retried at the next wake-up."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(wake.wait(), interval_s)
        except TimeoutError:
            pass
        wake.clear()
        if stop.is_set():
            return
        try:
            await refresh()
        except errors as exc:
            log.warning("refresh_failed", task=name, error=str(exc))
