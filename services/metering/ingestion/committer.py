"""Group commit: usage from every stream and call becomes one durable batch and one ledger post.

Callers `submit` events and wait. A single flusher collects what is waiting — until
`max_batch_events` or `flush_interval_ms` — into a group commit, and runs up to
`max_inflight_commits` of them at once (so the database, the ledger and this process's CPU
overlap). A group commit records its events in one transaction (events, the pending ledger
batch: one debit per org; the roll-ups follow off this path), posts the batch to the ledger
(idempotent on the batch id, retried while the ledger is unavailable), stores its per-org answer
on the batch row (each event's receipt follows from it) and only then answers. So throughput
does not depend on how clients batch, nothing is acknowledged before its debit is durable, and a
crash between the two commits is repaired at start-up by `replay_pending`.

A DUPLICATE is acknowledged with the original's receipt, so it too waits for the original's
debit: when the original's batch is still unposted (another commit or another replica has it in
flight, or crashed with it), this commit posts that batch itself — the ledger applies a batch
id once, so whoever posts first wins and the others get the same answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from services.metering.ingestion import domain as ing
from services.metering.ingestion.store import UsageEventStore
from tally.kit import metrics
from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.rating import PriceBookHistory

_tracer = trace.get_tracer("tally.metering.committer")
log = get_logger("metering.committer")


class UsageLedger(Protocol):
    """The ledger as ingestion needs it (the gRPC client implements it)."""

    async def post_org_debits(self, batch_id: str, debits: Sequence[ing.OrgDebit]
                              ) -> list[ing.OrgOutcome]:
        """Debits each org once (idempotent on batch_id); one outcome per debit, in order;
        raises TallyError(UNAVAILABLE) while the ledger cannot be reached."""
        ...


class PriceBooks(Protocol):
    """The local copy of pricing's books."""

    @property
    def history(self) -> PriceBookHistory:
        """Every book in force during the late-event window."""
        ...


@dataclass(slots=True)
class _Pending:
    events: list[ing.UsageEvent]
    done: asyncio.Future[list[ing.EventResult]]
    # the submitting call's span: a group commit continues the first one's trace and links
    # the others, so each request's trace reaches its ledger debit
    caller: SpanContext = field(default_factory=lambda: trace.get_current_span().get_span_context())


@dataclass(frozen=True, slots=True)
class CommitSettings:
    """Bounds of the committer (TALLY_METERING_* settings)."""

    max_batch_events: int = 2000
    flush_interval_ms: int = 5
    max_buffered_events: int = 50_000
    buffer_wait_ms: int = 5_000
    ledger_retry_max_ms: int = 2_000
    max_inflight_commits: int = 2


def batch_id() -> str:
    """A time-ordered, unique ledger batch id."""
    return f"mtr-{time.time_ns():x}-{os.urandom(4).hex()}"


@dataclass
class GroupCommitter:
    """Collects submitted usage into group commits; see the module docstring."""

    store: UsageEventStore
    ledger: UsageLedger
    books: PriceBooks
    settings: CommitSettings = CommitSettings()
    # told after each commit that recorded events (the roll-up worker's wake)
    on_commit: Callable[[], None] | None = None
    _queue: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)
    _buffered: int = 0
    _room: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None
    _commits: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        """Posts what a crash left pending, then starts the flusher."""
        await self.replay_pending()
        self._task = asyncio.create_task(self._run(), name="metering-group-commit")

    async def stop(self) -> None:
        """Stops collecting; commits in flight are cancelled (what they recorded but did not
        post is posted by `replay_pending` at the next start)."""
        for task in [self._task, *self._commits]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._commits]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def replay_pending(self) -> int:
        """Posts every recorded-but-unposted batch again; the ledger applies each once."""
        pending = await self.store.pending_batches()
        for pending_id, debits in pending:
            outcomes = await self._post(pending_id, debits)
            await self.store.mark_posted(pending_id, outcomes, datetime.now(UTC))
            log.info("replayed_ledger_batch", batch_id=pending_id, orgs=len(debits))
        return len(pending)

    async def submit(self, events: Sequence[ing.UsageEvent]) -> list[ing.EventResult]:
        """Records events and returns one result per event, once their debit is durable.

        Events with bad fields are rejected here and never wait. When the buffer is full for
        longer than `buffer_wait_ms` (the ledger is down, say), the call fails UNAVAILABLE.
        """
        now = datetime.now(UTC)
        checked = [ing.check_event(e, now) for e in events]
        valid = [e for e, problem in zip(events, checked, strict=True) if problem is None]
        answers: list[ing.EventResult] = []
        if valid:
            await self._reserve_room(len(valid))
            future: asyncio.Future[list[ing.EventResult]] = (
                asyncio.get_running_loop().create_future())
            self._queue.put_nowait(_Pending(valid, future))
            answers = await future
        it = iter(answers)
        results = [problem if problem is not None else next(it) for problem in checked]
        for status, count in collections.Counter(r.status for r in results).items():
            metrics.USAGE_EVENTS.labels(status.value).inc(count)
        return results

    async def _reserve_room(self, count: int) -> None:
        async with self._room:
            try:
                await asyncio.wait_for(
                    self._room.wait_for(
                        lambda: self._buffered + count <= self.settings.max_buffered_events
                        or self._buffered == 0),
                    self.settings.buffer_wait_ms / 1000)
            except TimeoutError:
                raise TallyError(Reason.UNAVAILABLE,
                                 "usage buffer is full (the ledger is not confirming debits); "
                                 "retry later") from None
            self._buffered += count

    async def _release_room(self, count: int) -> None:
        async with self._room:
            self._buffered -= count
            self._room.notify_all()

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.settings.max_inflight_commits)
        while True:
            taken = await self._collect()
            await slots.acquire()
            task = asyncio.create_task(self._commit_and_answer(taken))
            self._commits.add(task)

            def done(finished: asyncio.Task[None]) -> None:
                self._commits.discard(finished)
                slots.release()

            task.add_done_callback(done)

    async def _collect(self) -> list[_Pending]:
        """What is waiting now, plus what arrives within `flush_interval_ms`, up to the size."""
        first = await self._queue.get()
        taken = [first]
        size = len(first.events)
        deadline = time.monotonic() + self.settings.flush_interval_ms / 1000
        while size < self.settings.max_batch_events:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    more = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                more = self._queue.get_nowait()
            taken.append(more)
            size += len(more.events)
        return taken

    async def _commit_and_answer(self, taken: list[_Pending]) -> None:
        size = sum(len(p.events) for p in taken)
        callers = [p.caller for p in taken if p.caller.is_valid]
        parent = (trace.set_span_in_context(NonRecordingSpan(callers[0])) if callers
                  else None)
        try:
            with _tracer.start_as_current_span(
                    "metering.group_commit", context=parent,
                    links=[Link(c) for c in callers[1:]],
                    attributes={"tally.event_count": size, "tally.callers": len(taken)}):
                answers = await self._commit([e for p in taken for e in p.events])
        except Exception as exc:  # the batch failed before anything was acknowledged
            log.exception("group_commit_failed", events=size)
            for pending in taken:
                if not pending.done.done():
                    pending.done.set_exception(exc)
        else:
            start = 0
            for pending in taken:
                end = start + len(pending.events)
                if not pending.done.done():
                    pending.done.set_result(answers[start:end])
                start = end
        finally:
            await self._release_room(size)

    async def _commit(self, events: list[ing.UsageEvent]) -> list[ing.EventResult]:
        first = ing.first_of_each(events)
        unique = [events[i] for i in sorted(set(first.values()))]
        this_batch = batch_id()
        recorded = await self.store.record(this_batch, unique, self.books.history)
        if recorded.debits and self.on_commit is not None:
            self.on_commit()
        outcomes: dict[str, ing.OrgOutcome] = {}
        now = datetime.now(UTC)
        if recorded.debits:
            posted = await self._post(this_batch, recorded.debits)
            outcomes = {o.org_id: o for o in posted}
            await self.store.mark_posted(this_batch, posted, now)
        settled = await self._settle(recorded.unposted, unique, recorded.results)
        by_key: dict[tuple[str, str], ing.EventResult] = {}
        rated = iter(zip(recorded.new_events, recorded.cost_before, strict=True))
        for event, result in zip(unique, recorded.results, strict=True):
            key = (event.org_id, event.event_id)
            if result is None:
                item, cost_before = next(rated)
                receipt = ing.settled(item.receipt, outcomes[event.org_id], cost_before, now)
                result = ing.EventResult(event.event_id, ing.EventStatus.ACCEPTED, receipt)
            elif key in settled:
                result = replace(result, receipt=settled[key])
            by_key[key] = result
        answers: list[ing.EventResult] = []
        for i, event in enumerate(events):
            key = (event.org_id, event.event_id)
            original = by_key[key]
            if first[key] == i:
                answers.append(original)
            elif original.status is ing.EventStatus.REJECTED:
                answers.append(original)
            elif event.fingerprint() != events[first[key]].fingerprint():
                answers.append(ing.rejected(event.event_id, Reason.IDEMPOTENCY_KEY_REUSED,
                                            "event_id", "appears twice with different payloads"))
            else:
                answers.append(replace(original, status=ing.EventStatus.DUPLICATE))
        return answers

    async def _settle(self, unposted: set[str], events: Sequence[ing.UsageEvent],
                      results: Sequence[ing.EventResult | None]
                      ) -> dict[tuple[str, str], ing.Receipt]:
        """Posts the batches of unconfirmed originals; returns the duplicates' full receipts."""
        if not unposted:
            return {}
        for batch in sorted(unposted):
            outcomes = await self._post(batch, await self.store.batch_debits(batch))
            await self.store.mark_posted(batch, outcomes, datetime.now(UTC))
        duplicates = [(e.org_id, e.event_id) for e, r in zip(events, results, strict=True)
                      if r is not None and r.status is ing.EventStatus.DUPLICATE]
        return await self.store.receipts(duplicates)

    async def _post(self, batch: str, debits: Sequence[ing.OrgDebit]) -> list[ing.OrgOutcome]:
        """Posts until the ledger confirms; nothing is acknowledged meanwhile (back-pressure)."""
        delay = 0.05
        while True:
            try:
                return await self.ledger.post_org_debits(batch, debits)
            except TallyError as exc:
                if exc.reason is not Reason.UNAVAILABLE:
                    raise
                log.warning("ledger_unavailable", batch_id=batch, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.ledger_retry_max_ms / 1000)
