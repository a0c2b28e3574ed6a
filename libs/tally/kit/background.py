"""Background work of a service: periodic or notified tasks that stop with the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from tally.kit import db
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


async def run_when_notified(name: str, database_url: str, channel: str,
                            task: Callable[[], Awaitable[Any]], stop: asyncio.Event, *,
                            safety_interval_s: float = 30.0, min_interval_s: float = 0.05,
                            retry_s: float = 1.0) -> None:
    """Runs `task` once at start, then whenever PostgreSQL channel `channel` is notified
    (notifications that arrive while it runs make one more run, not one each), and every
    `safety_interval_s` as a safety net, until `stop`. An idle service makes no queries: the
    listener waits on its connection. Under a stream of notifications runs start at most
    every `min_interval_s` (each covers what came meanwhile). A lost listener reconnects (and
    runs `task`, for what was notified meanwhile)."""
    wake = asyncio.Event()
    listening = asyncio.create_task(_listen(database_url, channel, wake, stop, retry_s),
                                    name=f"{name}-listen")
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            wake.clear()
            started = loop.time()
            try:
                await task()
            except Exception:
                log.exception("background_task_failed", task=name)
            woken = asyncio.ensure_future(wake.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait((woken, stopping), timeout=safety_interval_s,
                               return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            stopping.cancel()
            rest = min_interval_s - (loop.time() - started)
            if rest > 0 and not stop.is_set():  # a busy channel: batch what comes meanwhile
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rest)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def _listen(database_url: str, channel: str, wake: asyncio.Event, stop: asyncio.Event,
                  retry_s: float) -> None:
    while not stop.is_set():
        conn: Any = None
        try:
            conn = await asyncpg.connect(db.asyncpg_url(database_url))
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.add_listener(channel, lambda *_args: wake.set())
            wake.set()  # whatever was notified while nobody listened
            await lost.wait()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("listener_lost", channel=channel, error=str(exc), retry_in_s=retry_s)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), retry_s)


class Signal:
    """Wakes every waiter at once, each time it fires (an event that re-arms itself).

    Take a `ticket` before looking for work and wait on it after finding none: a firing in
    between is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """The event the next firing sets."""
        return self._event
