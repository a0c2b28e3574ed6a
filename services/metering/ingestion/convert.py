"""tally.metering.v1 usage messages <-> ingestion domain objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.metering.ingestion import domain as ing
from tally.common.v1 import common_pb2
from tally.kit.protoconv import timestamp_clamped, to_timestamp
from tally.metering.v1 import metering_pb2 as pb
from tally.rating import Meter, UsageMode
from tally.sdk.pricebook import meter_from_proto, meter_to_proto


def _meter_or_none(number: int) -> Meter | None:
    try:
        return meter_from_proto(number)
    except ValueError:
        return None


# every wire number's meter, looked up once (this runs for each quantity of each event)
_METERS: dict[int, Meter | None] = {
    int(n): _meter_or_none(int(n)) for n in common_pb2.Meter.values()}


def meter_or_none(number: int) -> Meter | None:
    """The meter of a wire number; None for UNSPECIFIED or an unknown one (rejected later)."""
    return _METERS.get(number)


_OPERATION_NAMES: dict[int, str] = {int(number): name.removeprefix("OPERATION_").lower()
                    for name, number in pb.Operation.items() if number}
_NO_EVIDENCE = ing.Evidence()


def operation_name(number: int) -> str:
    """The lower-case name of a wire Operation (e.g. chat); "" when unset or unknown."""
    return _OPERATION_NAMES.get(number, "")


def event(message: pb.UsageEvent) -> ing.UsageEvent:
    """A domain event from the wire (unknown meters become None: rejected by check_event)."""
    ctx = message.context
    mode = UsageMode.BATCH if message.mode == common_pb2.USAGE_MODE_BATCH else UsageMode.ONLINE
    return ing.UsageEvent(
        event_id=message.event_id, org_id=ctx.org_id,
        occurred_at=timestamp_clamped(message, "occurred_at"),
        quantities=tuple([(_METERS.get(q.meter), q.quantity) for q in message.quantities]),
        model=message.model, provider=message.provider,
        operation=operation_name(message.operation), mode=mode, region=message.region,
        reservation_id=message.reservation_id, project_id=ctx.project_id,
        environment=ctx.environment, user_id=ctx.user_id, api_key_id=ctx.api_key_id,
        labels=dict(ctx.labels.items()),  # dict(map) goes through abc checks: 2-3x dearer
        evidence=_evidence(message.evidence) if message.HasField("evidence") else _NO_EVIDENCE)


def _evidence(e: pb.RequestEvidence) -> ing.Evidence:
    return ing.Evidence(e.request_id, e.upstream_request_id, e.trace_id,
                        tuple(e.content_hashes))


def event_to_proto(e: ing.UsageEvent) -> pb.UsageEvent:
    """The wire form of a recorded event."""
    operation = pb.Operation.Value(f"OPERATION_{e.operation.upper()}") if e.operation else 0
    return pb.UsageEvent(
        event_id=e.event_id, occurred_at=to_timestamp(e.occurred_at),
        context=common_pb2.RequestContext(
            org_id=e.org_id, project_id=e.project_id, environment=e.environment,
            user_id=e.user_id, api_key_id=e.api_key_id, labels=dict(e.labels)),
        provider=e.provider, model=e.model, operation=operation,  # type: ignore[arg-type]
        mode=(common_pb2.USAGE_MODE_BATCH if e.mode is UsageMode.BATCH
              else common_pb2.USAGE_MODE_ONLINE),
        quantities=[common_pb2.MeterQuantity(meter=meter_to_proto(m), quantity=q)
                    for m, q in e.quantities if m is not None],
        reservation_id=e.reservation_id, region=e.region,
        evidence=pb.RequestEvidence(
            request_id=e.evidence.request_id,
            upstream_request_id=e.evidence.upstream_request_id,
            trace_id=e.evidence.trace_id, content_hashes=list(e.evidence.content_hashes)))


_last_recorded: list[Any] = [None, None]  # (datetime, its Timestamp): a commit's receipts share it


def _recorded_at(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    if at is not _last_recorded[0]:
        _last_recorded[:] = [at, to_timestamp(at.astimezone(UTC))]
    stamp: Timestamp = _last_recorded[1]
    return stamp


def receipt(r: ing.Receipt) -> pb.Receipt:
    """The wire receipt."""
    return pb.Receipt(
        event_id=r.event_id, cost_micros=r.cost_micros,
        balance_after_micros=r.balance_after_micros, price_book_version=r.price_book_version,
        ledger_transfer_id=r.ledger_transfer_id,
        lines=[pb.ReceiptLine(meter=meter_to_proto(ln.meter), quantity=ln.quantity,
                              rate=ln.rate, cost_micros=ln.cost_micros, per_units=ln.per_units)
               for ln in r.lines],
        recorded_at=_recorded_at(r.recorded_at),
        arrears_micros=r.arrears_micros, resolved_model=r.resolved_model)


_STATUSES: dict[ing.EventStatus, int] = {
    s: pb.EventStatus.Value(f"EVENT_STATUS_{s.value}") for s in ing.EventStatus}


def result(r: ing.EventResult) -> pb.EventResult:
    """The wire result of one event."""
    return pb.EventResult(
        event_id=r.event_id,
        status=_STATUSES[r.status],  # type: ignore[arg-type]
        receipt=receipt(r.receipt) if r.receipt else None,
        reason=r.reason, field=r.field, message=r.message)
