"""Group commit: concurrent requests that would each take the same row locks share one
transaction instead.

Requests submitted while a group's transaction runs wait for it, then go together in the next
one: the rows they share are locked, updated and committed once. Nothing waits for a timer: a
lone request starts at once, and a group is only what queued up meanwhile. So a hot row (an
org's balance, a budget) costs one transaction per group instead of one per request, and
throughput grows with the load instead of being capped by the row's lock.

Requests queue in lanes by `key` (an org, say): only requests of one lane share a group, and
lanes are applied independently, so one org waiting on a lock never holds up another's.

`apply` answers each request of a group on its own: its result, or the exception that is its
answer (a refusal). When `apply` itself raises, no request of the group is answered from it:
each is applied again alone, so one request's failure is never another's.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from tally.kit import metrics

T = TypeVar("T")
R = TypeVar("R")

_tracer = trace.get_tracer("tally.kit.group_commit")

# Answers a group: one result, or the exception that is the answer, per request in order.
Apply = Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]]


@dataclass(slots=True)
class _Waiting(Generic[T, R]):
    request: T
    done: asyncio.Future[R]
    # the request's span: the group's transaction continues the first one's trace and links
    # the others, so each request's trace reaches the transaction that applied it
    span: SpanContext = field(default_factory=lambda: trace.get_current_span().get_span_context())


class GroupCommit(Generic[T, R]):
    """Applies queued requests in groups; see the module docstring."""

    def __init__(self, name: str, apply: Apply[T, R], *, max_size: int,
                 size: Callable[[T], int] = lambda _: 1,
                 key: Callable[[T], Hashable] = lambda _: None, concurrency: int = 1) -> None:
        self.name = name  # for the span and the metric
        self._apply = apply
        self.max_size = max_size  # of a group, in `size` units (a lone request may be bigger)
        self._size = size
        self._key = key  # the lane of a request
        self.concurrency = concurrency  # groups of one lane in flight at once
        self._lanes: dict[Hashable, collections.deque[_Waiting[T, R]]] = {}
        self._running: dict[Hashable, int] = {}  # drains per lane
        self._drains: set[asyncio.Task[None]] = set()

    async def submit(self, request: T) -> R:
        """The request's answer, once the group it joined is committed (its refusal raised)."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        lane = self._key(request)
        self._lanes.setdefault(lane, collections.deque()).append(_Waiting(request, done))
        if self._running.get(lane, 0) < self.concurrency:
            self._running[lane] = self._running.get(lane, 0) + 1
            drain = asyncio.create_task(self._drain(lane), name=f"{self.name}-group-commit")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        return await done

    async def _drain(self, lane: Hashable) -> None:
        try:
            while group := self._take(lane):
                await self._commit(group)
        finally:
            self._running[lane] -= 1
            if not self._running[lane]:  # the lane's queue is empty (or the loop is ending)
                del self._running[lane]
                for waiting in self._lanes.pop(lane, ()):
                    waiting.done.cancel()

    def _take(self, lane: Hashable) -> list[_Waiting[T, R]]:
        """The lane's oldest waiting requests, in arrival order, up to `max_size`."""
        queue, size = self._lanes[lane], 0
        group: list[_Waiting[T, R]] = []
        while queue:
            waiting = queue[0]
            if waiting.done.done():  # the caller gave up before its turn
                queue.popleft()
                continue
            more = self._size(waiting.request)
            if group and size + more > self.max_size:
                break
            group.append(queue.popleft())
            size += more
        return group

    async def _commit(self, group: list[_Waiting[T, R]]) -> None:
        spans = [w.span for w in group if w.span.is_valid]
        try:
            if spans and not any(s.trace_flags.sampled for s in spans):
                # no request of the group is traced (the parent-based sampler would drop the
                # group's span anyway): no span, which costs more than a small group's work
                answers: Sequence[R | BaseException] = await self._apply(
                    [w.request for w in group])
            else:
                parent = (trace.set_span_in_context(NonRecordingSpan(spans[0])) if spans
                          else None)
                with _tracer.start_as_current_span(
                        f"{self.name}.group_commit", context=parent,
                        links=[Link(s) for s in spans[1:]],
                        attributes={"tally.group_size": len(group)}):
                    answers = await self._apply([w.request for w in group])
        except asyncio.CancelledError:  # the loop is ending: nobody will answer these
            for waiting in group:
                waiting.done.cancel()
            raise
        except Exception as exc:
            if len(group) > 1:
                for waiting in group:
                    await self._commit([waiting])
                return
            answers = [exc]
        metrics.GROUP_COMMIT_SIZE.labels(self.name).observe(len(group))
        for waiting, answer in zip(group, answers, strict=True):
            if waiting.done.done():
                continue
            if isinstance(answer, BaseException):
                waiting.done.set_exception(answer)
            else:
                waiting.done.set_result(answer)
