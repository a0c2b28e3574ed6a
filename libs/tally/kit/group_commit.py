"""Group commit: concurrent requests that would each take the same row locks share one
transaction instead.

Requests submitted while a group's transaction runs wait for it, then go together in the next
one: the rows they share are locked, updated and committed once. Nothing waits for a timer: a
lone request starts at once, and a group is only what queued up meanwhile. So a hot row (an
org's balance, a budget) costs one transaction per group instead of one per request, and
throughput grows with the load instead of being capped by the row's lock.

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
        self._key = key  # only requests with equal keys share a group
        self.concurrency = concurrency  # groups in flight at once
        self._queue: collections.deque[_Waiting[T, R]] = collections.deque()
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, request: T) -> R:
        """The request's answer, once the group it joined is committed (its refusal raised)."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(request, done))
        if len(self._running) < self.concurrency:
            task = asyncio.create_task(self._drain(), name=f"{self.name}-group-commit")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await done

    async def _drain(self) -> None:
        while group := self._take():
            await self._commit(group)

    def _take(self) -> list[_Waiting[T, R]]:
        """The oldest waiting requests that may share a transaction: in arrival order, with
        one key, up to `max_size`."""
        queue, size = self._queue, 0
        group: list[_Waiting[T, R]] = []
        while queue:
            waiting = queue[0]
            if waiting.done.done():  # the caller gave up before its turn
                queue.popleft()
                continue
            more = self._size(waiting.request)
            if group and (size + more > self.max_size
                          or self._key(waiting.request) != self._key(group[0].request)):
                break
            group.append(queue.popleft())
            size += more
        return group

    async def _commit(self, group: list[_Waiting[T, R]]) -> None:
        spans = [w.span for w in group if w.span.is_valid]
        parent = trace.set_span_in_context(NonRecordingSpan(spans[0])) if spans else None
        try:
            with _tracer.start_as_current_span(
                    f"{self.name}.group_commit", context=parent,
                    links=[Link(s) for s in spans[1:]],
                    attributes={"tally.group_size": len(group)}):
                answers: Sequence[R | BaseException] = await self._apply(
                    [w.request for w in group])
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
