"""Background work of a service: periodic tasks that stop with the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

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
