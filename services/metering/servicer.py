"""tally.metering.v1.MeteringService: proto <-> domain, nothing else.

Served: Authorize, RecordUsage, StreamUsage, GetUsageEvent, ExportUsage, GetUsageSummary,
GetBatchUsage, StreamEvents, and the management of budgets, quotas and spend policies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc

from services.metering import convert_policies
from services.metering.ingestion import convert as convert_usage
from services.metering.ingestion.committer import GroupCommitter
from services.metering.ingestion.domain import (
    MAX_EVENT_AGE,
    MAX_RECORD_EVENTS,
    MAX_STREAM_BATCH_EVENTS,
)
from services.metering.ingestion.store import UsageEventStore
from services.metering.policy_store import PolicyStore
from services.metering.spend import convert as convert_authorize
from services.metering.spend.authorizer import Authorizer
from services.metering.spend.store import SpendStore
from tally.kit import metrics
from tally.kit.background import Signal
from tally.kit.errors import Reason, TallyError, invalid
from tally.kit.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_cursor, encode_cursor
from tally.kit.protoconv import from_timestamp
from tally.kit.requests import items_checked_by_handler
from tally.kit.telemetry import annotate
from tally.metering.v1 import metering_pb2, metering_pb2_grpc

from .reports import convert
from .reports.domain import BatchUsageSource, UsageReports, check_batch_usage_query
from .reports.store import BatchUsageStore

Context = grpc.aio.ServicerContext[Any, Any]
# A usage event with a NUL is rejected alone (ingestion.domain.check_event), like any other bad
# field of an event; the rest of its call is recorded.
items_checked_by_handler(metering_pb2.RecordUsageRequest, "events")
items_checked_by_handler(metering_pb2.StreamUsageRequest, "events")


def _too_many(count: int, limit: int, field: str) -> TallyError:
    return TallyError(Reason.BATCH_TOO_LARGE, f"{field}: {count} events; at most {limit}",
                      field=field)


async def _next_unless(batches: AsyncIterator[metering_pb2.StreamUsageRequest],
                       expired: asyncio.Event) -> metering_pb2.StreamUsageRequest | None:
    """The next batch, or None at the end of the stream or once `expired` is set (a batch
    being read then is dropped unacknowledged: the client sends it again)."""
    reading = asyncio.ensure_future(anext(batches, None))
    if not expired.is_set():
        expiry = asyncio.ensure_future(expired.wait())
        await asyncio.wait((reading, expiry), return_when=asyncio.FIRST_COMPLETED)
        expiry.cancel()
    if not reading.done():
        reading.cancel()
        return None
    return reading.result()


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    """Answers metering calls."""

    def __init__(self, reports: UsageReports, committer: GroupCommitter,
                 events: UsageEventStore, authorizer: Authorizer, spend: SpendStore, *,
                 policies: PolicyStore | None = None,
                 max_inflight_batches: int = 4,
                 stream_lifetime_s: float = 300.0,
                 shutting_down: asyncio.Event | None = None,
                 batch_usage: BatchUsageSource | None = None) -> None:
        self.reports = reports
        self.batch_usage = batch_usage or BatchUsageStore(spend.pool)
        self.committer = committer
        self.events = events
        self.authorizer = authorizer
        self.spend = spend
        # budgets, quotas and spend policies live in the same database as Authorize's state
        self.policies = policies or PolicyStore(spend.pool)
        self.outbox_poll_s = 0.2  # the safety net when nothing fires `sealed`
        self.sealed = Signal()
        self.max_inflight_batches = max_inflight_batches
        self.stream_lifetime_s = stream_lifetime_s
        # the server's ServiceApp.shutting_down: open streams wind down like at their lifetime
        self.shutting_down = shutting_down or asyncio.Event()

    async def Authorize(self, request: metering_pb2.AuthorizeRequest, context: Context
                        ) -> metering_pb2.AuthorizeResponse:
        """ALLOW / DOWNGRADE with a ledger hold for the worst case, or DENY with a reason."""
        answer = await self.authorizer.authorize(convert_authorize.request(request))
        metrics.AUTHORIZE_DECISIONS.labels(answer.decision.value, answer.deny_reason).inc()
        annotate(org_id=request.context.org_id, decision=answer.decision.value,
                 reason=answer.deny_reason, reserved_micros=answer.reserved_micros)
        return convert_authorize.answer(answer)

    async def GetPricingUse(self, request: metering_pb2.GetPricingUseRequest, context: Context
                            ) -> metering_pb2.GetPricingUseResponse:
        models, meters = convert_policies.pricing_use_query(request)
        uses = await self.policies.pricing_use(models, meters, datetime.now(UTC), MAX_EVENT_AGE)
        return metering_pb2.GetPricingUseResponse(
            uses=[convert_policies.pricing_use(u) for u in uses])

    async def StreamEvents(self, request: metering_pb2.StreamEventsRequest, context: Context
                           ) -> AsyncIterator[metering_pb2.StreamEventsResponse]:
        """Budget alarms after `after_sequence`, then new ones as they are sealed, until the
        stream's lifetime or the server's shutdown (resume from the last sequence)."""
        types = [convert_authorize.outbox_type(t) for t in request.types]
        for i, found in enumerate(types):
            if found is None:
                raise invalid(f"types[{i}]", "is not an outbox event type")
        after = request.after_sequence
        ends = asyncio.get_running_loop().time() + self.stream_lifetime_s
        while not self.shutting_down.is_set() and asyncio.get_running_loop().time() < ends:
            sealed = self.sealed.ticket()
            events = await self.spend.outbox_after(after, [t for t in types if t])
            if events:
                after = events[-1].sequence
                yield metering_pb2.StreamEventsResponse(
                    events=[convert_authorize.outbox_event(e) for e in events])
                continue
            # the next sealing (the server fires `sealed` on its NOTIFY), or leave at shutdown
            waits = [asyncio.ensure_future(sealed.wait()),
                     asyncio.ensure_future(self.shutting_down.wait())]
            await asyncio.wait(waits, timeout=self.outbox_poll_s,
                               return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()

    async def GetUsageSummary(
        self, request: metering_pb2.GetUsageSummaryRequest, context: Context
    ) -> metering_pb2.GetUsageSummaryResponse:
        """One org's usage for one calendar month, per meter and the requested dimensions."""
        query = convert.summary_query(request)
        return convert.summary_to_proto(await self.reports.summarize(query), query.label_key)

    async def GetBatchUsage(
        self, request: metering_pb2.GetBatchUsageRequest, context: Context
    ) -> metering_pb2.GetBatchUsageResponse:
        """An org's usage carried by named ledger batches, per batch and broken down."""
        check_batch_usage_query(request.org_id, request.batch_ids)
        return convert.batch_usage_to_proto(
            await self.batch_usage.batch_usage(request.org_id, list(request.batch_ids)))

    async def RecordUsage(self, request: metering_pb2.RecordUsageRequest, context: Context
                          ) -> metering_pb2.RecordUsageResponse:
        """Records 1..100 events; answers once they and their debit are durable."""
        if not 0 < len(request.events) <= MAX_RECORD_EVENTS:
            raise _too_many(len(request.events), MAX_RECORD_EVENTS, "events")
        annotate(event_count=len(request.events))
        results = await self.committer.submit([convert_usage.event(e) for e in request.events])
        return metering_pb2.RecordUsageResponse(results=[convert_usage.result(r)
                                                         for r in results])

    async def StreamUsage(self, request_iterator: AsyncIterator[metering_pb2.StreamUsageRequest],
                          context: Context) -> AsyncIterator[metering_pb2.StreamUsageResponse]:
        """One ack per batch, in order, each after its events and debit are durable.

        At most `max_inflight_batches` batches are read ahead of their acks; beyond that the
        server stops reading and gRPC flow control pushes back on the client. At the lifetime
        cap, or when the server starts shutting down, the server stops reading, acks what it
        has, and asks the client to reconnect (to another replica).
        """
        inflight: asyncio.Queue[tuple[str, asyncio.Task[Any]] | None] = asyncio.Queue(
            self.max_inflight_batches)
        expired = asyncio.Event()

        async def read() -> None:
            batches = aiter(request_iterator)
            try:
                while (batch := await _next_unless(batches, expired)) is not None:
                    if len(batch.events) > MAX_STREAM_BATCH_EVENTS:
                        raise _too_many(len(batch.events), MAX_STREAM_BATCH_EVENTS, "events")
                    task = asyncio.create_task(self.committer.submit(
                        [convert_usage.event(e) for e in batch.events]))
                    await inflight.put((batch.batch_id, task))
            finally:
                await inflight.put(None)

        reader = asyncio.create_task(read())
        timer = asyncio.get_running_loop().call_later(self.stream_lifetime_s, expired.set)
        shutdown = asyncio.ensure_future(self.shutting_down.wait())
        shutdown.add_done_callback(lambda _: expired.set())
        try:
            while (item := await inflight.get()) is not None:
                batch_id, task = item
                results = await task
                yield metering_pb2.StreamUsageResponse(
                    batch_id=batch_id, results=[convert_usage.result(r) for r in results])
            await reader  # re-raises a bad batch (BATCH_TOO_LARGE) to end the stream
            if expired.is_set():
                yield metering_pb2.StreamUsageResponse(reconnect=True)
        finally:
            timer.cancel()
            shutdown.cancel()
            reader.cancel()

    async def GetUsageEvent(self, request: metering_pb2.GetUsageEventRequest, context: Context
                            ) -> metering_pb2.GetUsageEventResponse:
        """One recorded event with its receipt."""
        found = await self.events.event(request.org_id, request.event_id)
        if found is None:
            raise TallyError(Reason.NOT_FOUND, f"event_id: no event {request.event_id!r} "
                             f"for org {request.org_id!r}", field="event_id")
        event, receipt = found
        return metering_pb2.GetUsageEventResponse(event=convert_usage.event_to_proto(event),
                                                  receipt=convert_usage.receipt(receipt))

    async def ExportUsage(self, request: metering_pb2.ExportUsageRequest, context: Context
                          ) -> AsyncIterator[metering_pb2.ExportUsageResponse]:
        """Raw events (one org, or every org when org_id is empty) or hourly/daily roll-up rows
        of a period, oldest first, one page per call (token on the last message)."""
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise invalid("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        size = request.page_size or DEFAULT_PAGE_SIZE
        if convert.is_summary_export(request.kind):
            async for message in self._export_rollup(request, size):
                yield message
            return
        if request.kind != metering_pb2.EXPORT_KIND_RAW_EVENTS:
            raise invalid("kind", "must be RAW_EVENTS, HOURLY_SUMMARY or DAILY_SUMMARY")
        async for message in self._export_events(request, size):
            yield message

    async def _export_rollup(self, request: metering_pb2.ExportUsageRequest, size: int
                             ) -> AsyncIterator[metering_pb2.ExportUsageResponse]:
        query = convert.rollup_export_query(request)
        after = decode_cursor(request.page_token, "export-rollup")
        page = await self.reports.export(query, [str(v) for v in after] if after else None,
                                         size + 1)
        for row in page[:size]:
            yield metering_pb2.ExportUsageResponse(
                summary=convert.summary_row_to_proto(row, query.label_key))
        if len(page) > size:
            yield metering_pb2.ExportUsageResponse(next_page_token=encode_cursor(
                "export-rollup", *self.reports.export_key(query, page[size - 1])))

    async def _export_events(self, request: metering_pb2.ExportUsageRequest, size: int
                             ) -> AsyncIterator[metering_pb2.ExportUsageResponse]:
        cursor = decode_cursor(request.page_token, "export")
        after = None
        if cursor is not None:
            micros, org_id, event_id = cursor
            after = (datetime.fromtimestamp(int(micros) / 1_000_000, tz=UTC), str(org_id),
                     str(event_id))
        rows = await self.events.export(request.org_id, from_timestamp(request, "start_time"),
                                        from_timestamp(request, "end_time"), after, size + 1)
        for event, receipt in rows[:size]:
            yield metering_pb2.ExportUsageResponse(event=metering_pb2.RecordedUsageEvent(
                event=convert_usage.event_to_proto(event), receipt=convert_usage.receipt(receipt)))
        if len(rows) > size:
            last = rows[size - 1][0]
            assert last.occurred_at is not None
            micros_at = int(last.occurred_at.timestamp()) * 1_000_000 + last.occurred_at.microsecond
            yield metering_pb2.ExportUsageResponse(
                next_page_token=encode_cursor("export", micros_at, last.org_id, last.event_id))

    # -- budgets, quotas and spend policy ------------------------------------------------------

    async def CreateBudget(self, request: metering_pb2.CreateBudgetRequest, context: Context
                           ) -> metering_pb2.CreateBudgetResponse:
        """Creates a budget; a replay of the request id returns the budget first created."""
        created = await self.policies.create_budget(
            request.request_id, request.budget.org_id,
            convert_policies.budget_spec(request.budget))
        return metering_pb2.CreateBudgetResponse(budget=convert_policies.budget(created))

    async def UpdateBudget(self, request: metering_pb2.UpdateBudgetRequest, context: Context
                           ) -> metering_pb2.UpdateBudgetResponse:
        """Changes the fields in update_mask (empty = every writable field)."""
        updated = await self.policies.update_budget(
            request.request_id, request.budget.org_id, request.budget.budget_id,
            convert_policies.budget_spec(request.budget), list(request.update_mask.paths))
        return metering_pb2.UpdateBudgetResponse(budget=convert_policies.budget(updated))

    async def GetBudget(self, request: metering_pb2.GetBudgetRequest, context: Context
                        ) -> metering_pb2.GetBudgetResponse:
        """One budget with its spend in the current period."""
        found = await self.policies.budget(request.org_id, request.budget_id)
        return metering_pb2.GetBudgetResponse(budget=convert_policies.budget(found))

    async def ListBudgets(self, request: metering_pb2.ListBudgetsRequest, context: Context
                          ) -> metering_pb2.ListBudgetsResponse:
        """A page of an org's budgets, oldest first."""
        page, token = await self.policies.budgets(request.org_id, request.page_size,
                                                  request.page_token)
        return metering_pb2.ListBudgetsResponse(
            budgets=[convert_policies.budget(b) for b in page], next_page_token=token)

    async def DeleteBudget(self, request: metering_pb2.DeleteBudgetRequest, context: Context
                           ) -> metering_pb2.DeleteBudgetResponse:
        """Deletes a budget; a replay of the request id succeeds again."""
        await self.policies.delete_budget(request.request_id, request.org_id, request.budget_id)
        return metering_pb2.DeleteBudgetResponse()

    async def CreateQuota(self, request: metering_pb2.CreateQuotaRequest, context: Context
                          ) -> metering_pb2.CreateQuotaResponse:
        """Creates a quota; a replay of the request id returns the quota first created."""
        created = await self.policies.create_quota(
            request.request_id, request.quota.org_id, convert_policies.quota_spec(request.quota))
        return metering_pb2.CreateQuotaResponse(quota=convert_policies.quota(created))

    async def UpdateQuota(self, request: metering_pb2.UpdateQuotaRequest, context: Context
                          ) -> metering_pb2.UpdateQuotaResponse:
        """Changes the fields in update_mask (empty = every writable field)."""
        updated = await self.policies.update_quota(
            request.request_id, request.quota.org_id, request.quota.quota_id,
            convert_policies.quota_spec(request.quota), list(request.update_mask.paths))
        return metering_pb2.UpdateQuotaResponse(quota=convert_policies.quota(updated))

    async def GetQuota(self, request: metering_pb2.GetQuotaRequest, context: Context
                       ) -> metering_pb2.GetQuotaResponse:
        """One quota."""
        found = await self.policies.quota(request.org_id, request.quota_id)
        return metering_pb2.GetQuotaResponse(quota=convert_policies.quota(found))

    async def ListQuotas(self, request: metering_pb2.ListQuotasRequest, context: Context
                         ) -> metering_pb2.ListQuotasResponse:
        """A page of an org's quotas, oldest first."""
        page, token = await self.policies.quotas(request.org_id, request.page_size,
                                                 request.page_token)
        return metering_pb2.ListQuotasResponse(
            quotas=[convert_policies.quota(q) for q in page], next_page_token=token)

    async def DeleteQuota(self, request: metering_pb2.DeleteQuotaRequest, context: Context
                          ) -> metering_pb2.DeleteQuotaResponse:
        """Deletes a quota; a replay of the request id succeeds again."""
        await self.policies.delete_quota(request.request_id, request.org_id, request.quota_id)
        return metering_pb2.DeleteQuotaResponse()

    async def SetSpendPolicy(self, request: metering_pb2.SetSpendPolicyRequest,
                             context: Context) -> metering_pb2.SetSpendPolicyResponse:
        """Replaces an org's spend policy, recording who did it."""
        stored = await self.policies.set_policy(
            request.request_id, convert_policies.policy_in(request.policy),
            convert_policies.actor(request.context))
        return metering_pb2.SetSpendPolicyResponse(policy=convert_policies.policy(stored))

    async def GetSpendPolicy(self, request: metering_pb2.GetSpendPolicyRequest,
                             context: Context) -> metering_pb2.GetSpendPolicyResponse:
        """An org's spend policy; all limits 0 (none) when never set."""
        found = await self.policies.policy(request.org_id)
        return metering_pb2.GetSpendPolicyResponse(policy=convert_policies.policy(found))
