"""Pricing's gRPC neighbour: metering, which owns recorded usage (SimulatePriceChange and
MarginReport re-read it through MeteringService.ExportUsage, RAW_EVENTS) and knows what still
uses a model or meter (GetPricingUse, before a book drops one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Final

import grpc

from tally.kit.errors import Reason, TallyError, from_rpc_error
from tally.kit.protoconv import to_timestamp
from tally.metering.v1 import metering_pb2, metering_pb2_grpc
from tally.rating import Meter, UsageMode
from tally.sdk.pricebook import meter_from_proto, meter_to_proto, mode_from_proto

from .convert import or_none
from .domain import InUse, RecordedUsage

EXPORT_PAGE_SIZE: Final = 1000
_UNAVAILABLE_CODES: Final = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def recorded_usage(row: metering_pb2.RecordedUsageEvent) -> RecordedUsage:
    """The domain form of one exported event."""
    event, receipt = row.event, row.receipt
    mode = or_none(mode_from_proto, event.mode) or UsageMode.ONLINE
    quantities = {meter: q.quantity for q in event.quantities
                  if (meter := or_none(meter_from_proto, q.meter)) is not None}
    return RecordedUsage(
        org_id=event.context.org_id,
        occurred_at=event.occurred_at.ToDatetime(tzinfo=UTC),
        model=event.model, resolved_model=receipt.resolved_model, provider=event.provider,
        mode=mode, region=event.region,
        quantities=quantities,
        charged_micros=receipt.cost_micros, price_book_version=receipt.price_book_version)


class GrpcUsageSource:
    """UsageSource over MeteringService.ExportUsage, page by page."""

    def __init__(self, stub: metering_pb2_grpc.MeteringServiceAsyncStub,
                 timeout_s: float = 60.0) -> None:
        self.stub = stub
        self.timeout_s = timeout_s

    async def recorded_usage(self, org_id: str, start: datetime, end: datetime
                             ) -> AsyncIterator[RecordedUsage]:
        """Every recorded event of `org_id` ("" = every org) in [start, end)."""
        token = ""
        while True:
            request = metering_pb2.ExportUsageRequest(
                org_id=org_id, start_time=to_timestamp(start), end_time=to_timestamp(end),
                kind=metering_pb2.EXPORT_KIND_RAW_EVENTS, page_size=EXPORT_PAGE_SIZE,
                page_token=token)
            token = ""
            try:
                async for reply in self.stub.ExportUsage(request, timeout=self.timeout_s):
                    if reply.HasField("event"):
                        yield recorded_usage(reply.event)
                    if reply.next_page_token:
                        token = reply.next_page_token
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _UNAVAILABLE_CODES:
                    raise TallyError(Reason.UNAVAILABLE,
                                     f"metering: {exc.details()}") from exc
                translated = from_rpc_error(exc)
                raise TallyError(Reason.INTERNAL, "metering refused the usage export: "
                                 f"{translated.message if translated else exc.details()}"
                                 ) from exc
            if not token:
                return

    async def in_use(self, models: Sequence[str], meters: Sequence[Meter]) -> list[InUse]:
        """What still uses `models` and `meters`, as metering sees it."""
        try:
            reply = await self.stub.GetPricingUse(metering_pb2.GetPricingUseRequest(
                models=list(models), meters=[meter_to_proto(m) for m in meters]),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNAVAILABLE_CODES:
                raise TallyError(Reason.UNAVAILABLE, "cannot check what still uses the "
                                 f"removed models and meters: metering: {exc.details()}"
                                 ) from exc
            raise
        return [InUse(u.item, u.recent_events, u.open_holds, tuple(u.quota_ids),
                      tuple(u.budget_ids)) for u in reply.uses]
