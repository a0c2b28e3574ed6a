"""tally.metering.v1 messages <-> metering domain objects."""

from __future__ import annotations

from typing import Final

from google.protobuf.descriptor import EnumDescriptor

from tally.common.v1 import common_pb2
from tally.kit.errors import invalid
from tally.kit.protoconv import from_timestamp, to_timestamp
from tally.metering.v1 import metering_pb2
from tally.rating import Meter

from .domain import (
    BatchUsage,
    Dimension,
    MeterTotal,
    RollupExportQuery,
    RollupGrain,
    SummaryQuery,
    SummaryRow,
    UsageFilter,
    UsageSummary,
)
from .domain import rollup_export_query as validated_export_query
from .domain import summary_query as validated_summary_query

_GROUP_BY_PREFIX: Final = "USAGE_GROUP_BY_"
_OPERATION_PREFIX: Final = "OPERATION_"
_METER_PREFIX: Final = "METER_"
_DIMENSION_OF: Final = {d.value: d for d in Dimension}


def _suffix(enum: EnumDescriptor, value: int, prefix: str) -> str | None:
    """The lower-cased value name without `prefix`; None for UNSPECIFIED or an unknown number."""
    found = enum.values_by_number.get(value)
    if found is None or found.number == 0:
        return None
    return found.name.removeprefix(prefix).lower()


def _dimension(value: int) -> Dimension | None:
    suffix = _suffix(metering_pb2.UsageGroupBy.DESCRIPTOR, value, _GROUP_BY_PREFIX)
    return None if suffix is None else _DIMENSION_OF.get(suffix)


def _filter(filters: metering_pb2.UsageFilter) -> UsageFilter:
    operation = ""
    if filters.operation:
        name = _suffix(metering_pb2.Operation.DESCRIPTOR, filters.operation, _OPERATION_PREFIX)
        if name is None:
            raise invalid("filters.operation", f"unknown operation {filters.operation}")
        operation = name
    meter = None
    if filters.meter:
        name = _suffix(common_pb2.Meter.DESCRIPTOR, filters.meter, _METER_PREFIX)
        if name is None:
            raise invalid("filters.meter", f"unknown meter {filters.meter}")
        meter = Meter(name)
    return UsageFilter(
        project_id=filters.project_id,
        environment=filters.environment,
        user_id=filters.user_id,
        model=filters.model,
        operation=operation,
        meter=meter,
    )


def summary_query(request: metering_pb2.GetUsageSummaryRequest) -> SummaryQuery:
    """The validated domain query of a GetUsageSummary request (raises INVALID_ARGUMENT)."""
    return validated_summary_query(
        org_id=request.org_id,
        year=request.year,
        month=request.month,
        group_by=[_dimension(g) for g in request.group_by],
        filter=_filter(request.filters),
        label_key=request.label_key,
        label_filter_count=len(request.filters.labels),
    )


_GRAIN_OF: Final = {
    metering_pb2.EXPORT_KIND_HOURLY_SUMMARY: RollupGrain.HOUR,
    metering_pb2.EXPORT_KIND_DAILY_SUMMARY: RollupGrain.DAY,
}


def rollup_export_query(request: metering_pb2.ExportUsageRequest) -> RollupExportQuery:
    """The validated domain query of a summary ExportUsage request (raises INVALID_ARGUMENT)."""
    return validated_export_query(
        org_id=request.org_id,
        grain=_GRAIN_OF[request.kind],
        start=from_timestamp(request, "start_time"),
        end=from_timestamp(request, "end_time"),
        group_by=[_dimension(g) for g in request.group_by],
        label_key=request.label_key,
    )


def is_summary_export(kind: int) -> bool:
    """True for the HOURLY/DAILY summary kinds of ExportUsage."""
    return kind in _GRAIN_OF


def _meter_to_proto(meter: Meter) -> common_pb2.Meter.ValueType:
    return common_pb2.Meter.Value(_METER_PREFIX + meter.name)


def _key_value(dimension: Dimension, value: str) -> str:
    # Enum-valued keys carry the proto value name (UsageGroupBy's contract), e.g. OPERATION_CHAT.
    if dimension is Dimension.OPERATION:
        return _OPERATION_PREFIX + (value.upper() or "UNSPECIFIED")
    if dimension is Dimension.METER:
        return _METER_PREFIX + Meter(value).name
    return value


def _key_name(dimension: Dimension, label_key: str) -> str:
    return f"label.{label_key}" if dimension is Dimension.LABEL else dimension.value


def summary_row_to_proto(row: SummaryRow, label_key: str = "") -> metering_pb2.UsageSummaryRow:
    """One roll-up row on the wire (key names per UsageGroupBy; LABEL is "label.<key>")."""
    return metering_pb2.UsageSummaryRow(
        key={_key_name(d, label_key): _key_value(d, v) for d, v in row.key.items()},
        meter=_meter_to_proto(row.meter),
        quantity=row.quantity,
        credits_micros=row.credits_micros,
        event_count=row.event_count,
        bucket_start=to_timestamp(row.bucket_start),
    )


def _total_to_proto(total: MeterTotal) -> common_pb2.MeterQuantity:
    return common_pb2.MeterQuantity(meter=_meter_to_proto(total.meter), quantity=total.quantity)


def summary_to_proto(summary: UsageSummary, label_key: str = ""
                     ) -> metering_pb2.GetUsageSummaryResponse:
    """A usage summary as the GetUsageSummary response."""
    response = metering_pb2.GetUsageSummaryResponse(
        rows=[summary_row_to_proto(r, label_key) for r in summary.rows],
        total_credits_micros=summary.total_credits_micros,
        total_quantities=[_total_to_proto(t) for t in summary.total_quantities],
        total_event_count=summary.total_event_count,
        truncated=summary.is_truncated,
    )
    response.as_of.FromDatetime(summary.as_of)
    return response


def batch_usage_to_proto(usage: BatchUsage) -> metering_pb2.GetBatchUsageResponse:
    """GetBatchUsage's answer."""
    return metering_pb2.GetBatchUsageResponse(
        batches=[metering_pb2.BatchCharge(batch_id=b.batch_id, credits_micros=b.credits_micros,
                                          event_count=b.event_count) for b in usage.batches],
        breakdown=[metering_pb2.UsageBreakdownRow(
            dimension=r.dimension, value=r.value, credits_micros=r.credits_micros,
            event_count=r.event_count) for r in usage.breakdown])
