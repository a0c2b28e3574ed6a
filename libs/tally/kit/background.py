"""Background work of a service: periodic tasks that stop with the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tally.kit.log import get_logger
from tally.kit.readiness import is_outage

log = get_logger("tally.kit.background")


async def run_periodically(name: str, interval_s: float,
                           task: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
    """Runs `task` every `interval_s` until `stop` is set; a failure is logged, not fatal."""
    while not stop.is_set():
        try:
            await task()
        except Exception as exc:
            if is_outage(exc):
                # expected while a dependency is down: one line, not a traceback a second
                log.warning("background_task_unavailable", task=name, error=repr(exc))
            else:
                log.exception("background_task_failed", task=name)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
