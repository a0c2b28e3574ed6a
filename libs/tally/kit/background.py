"""Background work of a service: periodic or notified tasks that stop with the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

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


class Deadline:
    """The earliest moment a sweeper has work: what its last run found in the database (the
    next expiry), moved earlier by the request path when it makes something that expires
    sooner (`due`, a comparison: cheap enough for every request)."""

    def __init__(self) -> None:
        self.at: datetime | None = None
        self.moved = asyncio.Event()

    def due(self, at: datetime) -> None:
        """Something expires at `at`: wake the sweeper then if that is earlier."""
        if self.at is None or at < self.at:
            self.at = at
            self.moved.set()


async def run_when_notified(name: str, task: Callable[[], Awaitable[Any]], stop: asyncio.Event,
                            *, listen: tuple[str, str] | None = None,
                            wake: Signal | None = None,
                            deadline: Deadline | None = None,
                            next_due: Callable[[], Awaitable[datetime | None]] | None = None,
                            safety_interval_s: float = 30.0, min_interval_s: float = 0.05,
                            retry_s: float = 1.0) -> None:
    """Runs `task` once at start, then whenever there may be work, until `stop`:

    - `listen` = (database url, channel): a PostgreSQL NOTIFY on the channel, by any replica
      (a lost listener reconnects and runs `task` for what was notified meanwhile);
    - `wake`: an in-process Signal fires;
    - `deadline`: its moment comes; after each run `next_due` (one query) says when the next
      thing expires, and the request path moves it earlier (Deadline.due);
    - and every `safety_interval_s` as a safety net (a lost notification, another replica's
      deadline when that replica died).

    An idle service makes no queries in between. Wake-ups that arrive while `task` runs make
    one more run, not one each; under a stream of them runs start at most every
    `min_interval_s` (each covers what came meanwhile). A failure is logged, not fatal."""
    woken = asyncio.Event()
    listening = (asyncio.create_task(db.listen(listen[0], listen[1], woken.set, stop, retry_s),
                                     name=f"{name}-listen") if listen else None)
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            woken.clear()
            ticket = wake.ticket() if wake is not None else None
            started = loop.time()
            if deadline is not None:
                deadline.at = None  # what the request path makes from here on is counted
                deadline.moved.clear()
            await _run_once(name, task)
            if deadline is not None and next_due is not None:
                found = await _next_due(name, next_due)
                if found is not None and found <= datetime.now(UTC):
                    # left by the run (held, locked, a page limit): look again in retry_s
                    found = datetime.now(UTC) + timedelta(seconds=retry_s)
                if found is not None and (deadline.at is None or found < deadline.at):
                    deadline.at = found
            await _wait(stop, woken, ticket, deadline, safety_interval_s)
            rest = min_interval_s - (loop.time() - started)
            if rest > 0 and not stop.is_set():  # a busy source: batch what comes meanwhile
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rest)
    finally:
        if listening is not None:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening


async def _next_due(name: str, next_due: Callable[[], Awaitable[datetime | None]]
                    ) -> datetime | None:
    try:
        return await next_due()
    except Exception as exc:  # then the safety interval decides
        log.warning("background_next_due_failed", task=name, error=repr(exc))
        return None


async def _wait(stop: asyncio.Event, woken: asyncio.Event, ticket: asyncio.Event | None,
                deadline: Deadline | None, safety_interval_s: float) -> None:
    """Until something wakes the loop (see run_when_notified) or the safety interval ends."""
    while True:
        timeout = safety_interval_s
        if deadline is not None and deadline.at is not None:
            timeout = min(timeout, max((deadline.at - datetime.now(UTC)).total_seconds(), 0.0))
        if timeout <= 0:
            return
        events = [stop, woken, *(e for e in (ticket, deadline.moved if deadline else None)
                                 if e is not None)]
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if deadline is not None and deadline.moved.is_set() and not (
                stop.is_set() or woken.is_set() or (ticket is not None and ticket.is_set())):
            deadline.moved.clear()  # an earlier deadline: wait for it instead
            continue
        return


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
