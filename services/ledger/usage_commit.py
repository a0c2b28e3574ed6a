"""Group commit of usage: concurrent PostUsageBatch calls share one transaction.

Metering posts a batch per group commit, several at once (its in-flight commits, its
replicas), and they mostly name the same orgs. Applied one transaction each, they queue on the
same account rows, and each pays for its own row locks, balance and grant updates, USAGE
transfer and outbox row per org, and commit. Here, the batches that arrive while a transaction
runs wait for it, then go together: each org is locked, updated, debited by one transfer and
announced by one BALANCE_CHANGED per group (LedgerStore.post_usage_batches). Nothing waits
for a timer: a lone batch starts at once, and a group is only what queued up meanwhile.

Each batch is still claimed and answered on its own. A group fails as a whole only on an
error no batch in it could cause alone (a lost connection, say); otherwise, when a group fails,
each of its batches is tried again alone, so one batch's failure is never another's.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from services.ledger import domain as d
from tally.kit import metrics
from tally.kit.errors import TallyError

_tracer = trace.get_tracer("tally.ledger.usage_commit")

PostBatches = Callable[[Sequence[d.UsageBatch]], Awaitable[list[list[d.UsageResult] | TallyError]]]


@dataclass(slots=True)
class _Waiting:
    batch: d.UsageBatch
    done: asyncio.Future[list[d.UsageResult]]
    # the call's span: the group's transaction continues the first one's trace and links
    # the others, so each request's trace reaches its debit
    span: SpanContext = field(default_factory=lambda: trace.get_current_span().get_span_context())


class UsageGroupCommit:
    """Queues usage batches and applies what queued up together; see the module docstring."""

    def __init__(self, post_batches: PostBatches, *, max_items: int = 20_000,
                 committers: int = 1) -> None:
        self._post_batches = post_batches
        self.max_items = max_items  # a group's items (a lone batch may have more)
        self.committers = committers  # groups in flight at once
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._running: set[asyncio.Task[None]] = set()

    async def post(self, batch: d.UsageBatch) -> list[d.UsageResult]:
        """The batch's results, once its debits are committed (with whatever joined it)."""
        d.validate_usage_batch(batch.batch_id, batch.items)  # bad input joins no group
        done: asyncio.Future[list[d.UsageResult]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(batch, done))
        if len(self._running) < self.committers:
            task = asyncio.create_task(self._drain(), name="ledger-usage-group-commit")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await done

    async def _drain(self) -> None:
        while group := self._take():
            await self._commit(group)

    def _take(self) -> list[_Waiting]:
        """The oldest waiting batches that can share a transaction: in arrival order, with
        the same audit fields, up to `max_items`."""
        queue, items = self._queue, 0
        group: list[_Waiting] = []
        while queue:
            waiting = queue[0]
            if waiting.done.done():  # the caller gave up before its turn
                queue.popleft()
                continue
            size = len(waiting.batch.items)
            if group and (items + size > self.max_items
                          or waiting.batch.audited_as() != group[0].batch.audited_as()):
                break
            group.append(queue.popleft())
            items += size
        return group

    async def _commit(self, group: list[_Waiting]) -> None:
        spans = [w.span for w in group if w.span.is_valid]
        parent = trace.set_span_in_context(NonRecordingSpan(spans[0])) if spans else None
        try:
            with _tracer.start_as_current_span(
                    "ledger.usage_group_commit", context=parent,
                    links=[Link(s) for s in spans[1:]],
                    attributes={"tally.batches": len(group),
                                "tally.items": sum(len(w.batch.items) for w in group)}):
                outcomes: Sequence[list[d.UsageResult] | BaseException] = (
                    await self._post_batches([w.batch for w in group]))
        except Exception as exc:
            if len(group) > 1:
                for waiting in group:
                    await self._commit([waiting])
                return
            outcomes = [exc]
        metrics.LEDGER_GROUP_BATCHES.observe(len(group))
        for waiting, outcome in zip(group, outcomes, strict=True):
            if waiting.done.done():
                continue
            if isinstance(outcome, BaseException):
                waiting.done.set_exception(outcome)
            else:
                waiting.done.set_result(outcome)
