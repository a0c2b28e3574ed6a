"""tally.metering.v1 Authorize and outbox messages <-> the spend-control domain."""

from __future__ import annotations

from datetime import timedelta

from services.metering.ingestion.convert import meter_or_none, operation_name
from services.metering.spend import domain as az
from services.metering.spend.store import OutboxEvent
from tally.common.v1 import common_pb2
from tally.kit.protoconv import to_timestamp
from tally.kit.telemetry import trace_id_of
from tally.metering.v1 import metering_pb2 as pb
from tally.rating import UsageMode


def request(message: pb.AuthorizeRequest) -> az.AuthorizeRequest:
    """The domain request (bad values are left for `authorize.validate` to name)."""
    ctx = message.context
    return az.AuthorizeRequest(
        request_id=message.request_id, org_id=ctx.org_id, model=message.model,
        project_id=ctx.project_id, environment=ctx.environment, user_id=ctx.user_id,
        api_key_id=ctx.api_key_id, labels=dict(ctx.labels.items()),  # dict(map): ~20x slower
        operation=operation_name(message.operation),
        mode=UsageMode.BATCH if message.mode == common_pb2.USAGE_MODE_BATCH
        else UsageMode.ONLINE,
        estimated_input_tokens=message.estimated_input_tokens,
        max_output_tokens=message.max_output_tokens, upload_bytes=message.upload_bytes,
        context_tokens=message.context_tokens,
        # clamped into what timedelta holds (int64 seconds overflow it); check_request still
        # refuses anything past MAX_TTL, naming reservation_ttl_seconds
        ttl=(timedelta(seconds=max(-1, min(message.reservation_ttl_seconds,
                                           int(az.MAX_TTL.total_seconds()) + 1)))
             if message.reservation_ttl_seconds else az.DEFAULT_TTL),
        region=message.region,
        estimated_quantities=tuple((meter_or_none(q.meter), q.quantity)
                                   for q in message.estimated_quantities))


def answer(a: az.Answer) -> pb.AuthorizeResponse:
    """The wire answer."""
    return pb.AuthorizeResponse(
        decision=pb.Decision.Value(f"DECISION_{a.decision.value}"),
        reservation_id=a.reservation_id, reserved_micros=a.reserved_micros, model=a.model,
        deny_reason=a.deny_reason, retry_after_ms=a.retry_after_ms,
        headroom=[pb.Headroom(scope=h.scope, unit=h.unit, limit=h.limit, remaining=h.remaining)
                  for h in a.headroom],
        price_book_version=a.price_book_version, message=a.message,
        reservation_expires_at=to_timestamp(a.expires_at) if a.reservation_id else None)


def outbox_type(number: int) -> str | None:
    """BUDGET_THRESHOLD, ... for a wire OutboxEventType; None for UNSPECIFIED or unknown."""
    if number == 0 or number not in pb.OutboxEventType.values():
        return None
    return pb.OutboxEventType.Name(pb.OutboxEventType.ValueType(number)).removeprefix(
        "OUTBOX_EVENT_TYPE_")


def outbox_event(e: OutboxEvent) -> pb.OutboxEvent:
    """The wire form of an outbox event; budget fields are lifted out of the attributes."""
    a = e.attributes
    return pb.OutboxEvent(
        event_id=e.event_id, sequence=e.sequence, org_id=e.org_id,
        type=pb.OutboxEventType.Value(f"OUTBOX_EVENT_TYPE_{e.type}"),
        occurred_at=to_timestamp(e.occurred_at), trace_id=trace_id_of(e.trace_id),
        traceparent=e.trace_id if e.trace_id != trace_id_of(e.trace_id) else "",
        budget_id=str(a.get("budget_id", "")),
        threshold_percent=int(a.get("threshold_percent", 0)),
        spent_micros=int(a.get("spent_micros", 0)), limit_micros=int(a.get("limit_micros", 0)),
        attributes={k: str(v) for k, v in a.items()})
