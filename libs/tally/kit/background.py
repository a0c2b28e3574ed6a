"""Background work of a service: periodic or notified tasks that stop with the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace

from tally.kit import db
from tally.kit.log import get_logger
from tally.kit.readiness import is_outage
from tally.kit.telemetry import BACKGROUND, WORK_ITEMS

log = get_logger("tally.kit.background")
_tracer = trace.get_tracer("tally.kit.background")
_NO_PARENT = otel_context.Context()  # each run is its own trace, whatever started the loop


@contextlib.contextmanager
def background_run(name: str, tracer: trace.Tracer | None = None) -> Iterator[trace.Span]:
    """One run of a background loop as its own trace: set `tally.work_items` on the span it
    yields to what the run handled; a run that handled 0 is not exported (WorkOnly)."""
    with (tracer or _tracer).start_as_current_span(
            f"background.{name}", context=_NO_PARENT, attributes={BACKGROUND: name}) as span:
        yield span


async def run_periodically(name: str, interval_s: float,
                           task: Callable[[], Awaitable[Any]], stop: asyncio.Event, *,
                           tracer: trace.Tracer | None = None) -> None:
    """Runs `task` every `interval_s` until `stop` is set; a failure is logged, not fatal.

    Each run is one span, `background.<name>`, with the run's queries under it; `task`
    returns how many items it handled, and a run that handled none is not exported (see
    telemetry.WorkOnly), so an idle loop leaves no traces."""
    while not stop.is_set():
        await _run_once(name, task, tracer)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass


async def _run_once(name: str, task: Callable[[], Awaitable[Any]],
                    tracer: trace.Tracer | None = None) -> None:
    """One run of a background task in its own span; a failure is logged, not raised."""
    try:
        with background_run(name, tracer) as span:
            handled = await task()
            span.set_attribute(WORK_ITEMS, handled if isinstance(handled, int) else 1)
    except Exception as exc:
        if is_outage(exc):
            # expected while a dependency is down: one line, not a traceback a second
            log.warning("background_task_unavailable", task=name, error=repr(exc))
        else:
            log.exception("background_task_failed", task=name)


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
            await _run_once(name, task)
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
