"""Metering's rules for usage summaries: what a valid question is and what the answer holds.

Summaries and summary exports come from the roll-ups (DESIGN §6), never from raw events.
No grpc, no SQL: the store is anything with the `UsageRollups` shape.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Final, Protocol

from tally.kit.errors import FieldViolation, invalid_fields
from tally.rating import Meter

MAX_SUMMARY_ROWS: Final = 10_000
"""Rows a summary returns at most; totals are computed over everything regardless."""
MAX_GROUP_BY: Final = 4
MIN_YEAR: Final = 2000
MAX_YEAR: Final = 9999


class Dimension(enum.StrEnum):
    """What usage can be grouped by; the value is the row key's name on the wire."""

    MODEL = "model"
    OPERATION = "operation"
    USER = "user"
    METER = "meter"
    PROJECT = "project"
    ENVIRONMENT = "environment"
    LABEL = "label"


LABEL_COMPANIONS: Final = frozenset({Dimension.LABEL, Dimension.MODEL, Dimension.METER})
"""The label roll-up keeps (label key, label value, model, meter) per day: grouping by LABEL
combines only with MODEL and METER, and with no filter but model and meter."""


class RollupGrain(enum.StrEnum):
    """Time bucket of an exported roll-up."""

    HOUR = "hour"
    DAY = "day"


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Narrows a summary; '' / None = any."""

    project_id: str = ""
    environment: str = ""
    user_id: str = ""
    model: str = ""
    operation: str = ""
    meter: Meter | None = None


@dataclass(frozen=True, slots=True)
class SummaryQuery:
    """A validated question: one org's usage in one calendar month (UTC)."""

    org_id: str
    month_start: date
    month_end: date
    """First day of the following month (exclusive)."""
    group_by: tuple[Dimension, ...]
    filter: UsageFilter = field(default_factory=UsageFilter)
    label_key: str = ""
    """The label grouped by, when group_by holds LABEL."""


def _check_grouping(group_by: Sequence[Dimension | None], label_key: str, filter: UsageFilter,
                    problems: list[FieldViolation]) -> tuple[Dimension, ...]:
    """Appends what is wrong with a grouping; returns the dimensions."""
    if len(group_by) > MAX_GROUP_BY:
        problems.append(FieldViolation("group_by", f"at most {MAX_GROUP_BY} dimensions"))
    seen: list[Dimension] = []
    for i, dimension in enumerate(group_by):
        if dimension is None:
            problems.append(FieldViolation(f"group_by[{i}]", "is not a grouping dimension"))
        elif dimension in seen:
            problems.append(FieldViolation(f"group_by[{i}]", f"{dimension} is repeated"))
        else:
            seen.append(dimension)
    if Dimension.LABEL in seen:
        if not label_key.strip():
            problems.append(FieldViolation("label_key", "is required when grouping by LABEL"))
        for i, dimension in enumerate(group_by):
            if dimension is not None and dimension not in LABEL_COMPANIONS:
                problems.append(FieldViolation(
                    f"group_by[{i}]", f"{dimension} cannot be combined with LABEL (labels are "
                    "rolled up by model and meter only)"))
        for name in ("project_id", "environment", "user_id", "operation"):
            if getattr(filter, name):
                problems.append(FieldViolation(
                    f"filters.{name}", "cannot be combined with grouping by LABEL"))
    return tuple(seen)


def summary_query(
    *,
    org_id: str,
    year: int,
    month: int,
    group_by: Sequence[Dimension | None],
    filter: UsageFilter,
    label_key: str = "",
    label_filter_count: int = 0,
) -> SummaryQuery:
    """Validates a GetUsageSummary request, naming every bad field at once.

    `group_by` entries are None where the caller sent a value that is no dimension at all.
    """
    problems: list[FieldViolation] = []
    if not org_id.strip():
        problems.append(FieldViolation("org_id", "is required"))
    if not MIN_YEAR <= year <= MAX_YEAR:
        problems.append(FieldViolation("year", f"must be {MIN_YEAR}..{MAX_YEAR}, got {year}"))
    if not 1 <= month <= 12:
        problems.append(FieldViolation("month", f"must be 1..12, got {month}"))
    dimensions = _check_grouping(group_by, label_key, filter, problems)
    if label_filter_count:
        problems.append(FieldViolation(
            "filters.labels", "filtering by label is not supported; group by LABEL instead"))
    if problems:
        raise invalid_fields(problems)
    start = date(year, month, 1)
    end = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    return SummaryQuery(org_id, start, end, dimensions, filter,
                        label_key if Dimension.LABEL in dimensions else "")


DEFAULT_EXPORT_GROUP_BY: Final = (Dimension.MODEL, Dimension.OPERATION)


@dataclass(frozen=True, slots=True)
class RollupExportQuery:
    """A validated summary export: one org's roll-up rows per time bucket in [start, end)."""

    org_id: str
    grain: RollupGrain
    start: datetime | None
    end: datetime | None
    group_by: tuple[Dimension, ...]
    label_key: str = ""


def rollup_export_query(*, org_id: str, grain: RollupGrain, start: datetime | None,
                        end: datetime | None, group_by: Sequence[Dimension | None],
                        label_key: str) -> RollupExportQuery:
    """Validates an ExportUsage request for HOURLY/DAILY summaries, naming every bad field."""
    problems: list[FieldViolation] = []
    if not org_id.strip():
        problems.append(FieldViolation("org_id", "is required for summary exports"))
    if start is not None and end is not None and end <= start:
        problems.append(FieldViolation("end_time", "must be after start_time"))
    dimensions = _check_grouping(group_by or DEFAULT_EXPORT_GROUP_BY, label_key, UsageFilter(),
                                 problems)
    if Dimension.LABEL in dimensions and grain is RollupGrain.HOUR:
        problems.append(FieldViolation("kind", "labels are rolled up per day: export "
                                               "DAILY_SUMMARY to group by LABEL"))
    if problems:
        raise invalid_fields(problems)
    return RollupExportQuery(org_id, grain, start, end, dimensions,
                             label_key if Dimension.LABEL in dimensions else "")


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """Usage of one meter within one group."""

    key: Mapping[Dimension, str]
    meter: Meter
    quantity: int
    credits_micros: int
    event_count: int
    bucket_start: datetime | None = None
    """Start of the hour or day (exports); None in a monthly summary."""


@dataclass(frozen=True, slots=True)
class MeterTotal:
    """Usage of one meter over the whole filtered month."""

    meter: Meter
    quantity: int
    credits_micros: int


@dataclass(frozen=True, slots=True)
class RollupRead:
    """What the store reads in one consistent snapshot."""

    rows: Sequence[SummaryRow]
    """Up to the limit asked for, ordered by key (in group_by order), then meter."""
    meter_totals: Sequence[MeterTotal]
    distinct_events: int
    as_of: datetime


class UsageRollups(Protocol):
    """The store's side of summaries."""

    async def read_summary(self, query: SummaryQuery, *, row_limit: int) -> RollupRead:
        """Rows (at most `row_limit`) and complete totals for `query`, from one snapshot."""
        ...

    async def export_rollup(self, query: RollupExportQuery, after: Sequence[str] | None,
                            limit: int) -> Sequence[SummaryRow]:
        """Up to `limit` rows ordered by (bucket, group key, meter), after the `after` key."""
        ...


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """The answer to a summary query."""

    rows: Sequence[SummaryRow]
    total_credits_micros: int
    total_quantities: Sequence[MeterTotal]
    total_event_count: int
    as_of: datetime
    is_truncated: bool


class UsageReports:
    """Usage summaries for an org's month, and summary exports."""

    def __init__(self, rollups: UsageRollups) -> None:
        self._rollups = rollups

    async def export(self, query: RollupExportQuery, after: Sequence[str] | None, limit: int
                     ) -> Sequence[SummaryRow]:
        """A page of roll-up rows for a summary export."""
        return await self._rollups.export_rollup(query, after, limit)

    @staticmethod
    def export_key(query: RollupExportQuery, row: SummaryRow) -> list[str]:
        """The keyset position of `row` (bucket, group key, meter): where the next page starts."""
        assert row.bucket_start is not None
        bucket = (row.bucket_start.date().isoformat() if query.grain is RollupGrain.DAY
                  or Dimension.LABEL in query.group_by else row.bucket_start.isoformat())
        keys = [row.key[d] for d in query.group_by if d is not Dimension.METER]
        return [bucket, *keys, row.meter.value]

    async def summarize(self, query: SummaryQuery) -> UsageSummary:
        """Rows cut at MAX_SUMMARY_ROWS (flagged), totals always over all filtered usage."""
        read = await self._rollups.read_summary(query, row_limit=MAX_SUMMARY_ROWS + 1)
        return UsageSummary(
            rows=read.rows[:MAX_SUMMARY_ROWS],
            total_credits_micros=sum(t.credits_micros for t in read.meter_totals),
            total_quantities=read.meter_totals,
            total_event_count=read.distinct_events,
            as_of=read.as_of,
            is_truncated=len(read.rows) > MAX_SUMMARY_ROWS,
        )


# -- usage of ledger batches (statements and reconciliation ask it) -------------------------

MAX_BATCH_IDS: Final = 1000
"""Ledger batch ids one GetBatchUsage may name."""
BREAKDOWN_DIMENSIONS: Final = ("meter", "model", "project", "label")


@dataclass(frozen=True, slots=True)
class BatchCharge:
    """What metering's events of one org in one ledger batch were charged."""

    batch_id: str
    credits_micros: int
    event_count: int


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    """Credits charged for one value of one dimension (meter, model, project, label)."""

    dimension: str
    value: str
    credits_micros: int
    event_count: int


@dataclass(frozen=True, slots=True)
class BatchUsage:
    """The usage of named ledger batches: per batch, and broken down."""

    batches: Sequence[BatchCharge]
    breakdown: Sequence[BreakdownRow]


class BatchUsageSource(Protocol):
    """The store's side of GetBatchUsage: read from the recorded events."""

    async def batch_usage(self, org_id: str, batch_ids: Sequence[str]) -> BatchUsage:
        """Charges per batch (request order, batches without events absent) and the
        breakdown of all of them."""
        ...


def check_batch_usage_query(org_id: str, batch_ids: Sequence[str]) -> None:
    """INVALID_ARGUMENT naming org_id or batch_ids: an org, 1..MAX_BATCH_IDS non-empty ids."""
    problems = []
    if not org_id:
        problems.append(FieldViolation("org_id", "is required"))
    if len(batch_ids) > MAX_BATCH_IDS:
        problems.append(FieldViolation("batch_ids", f"at most {MAX_BATCH_IDS} ids"))
    if any(not b for b in batch_ids):
        problems.append(FieldViolation("batch_ids", "must not contain an empty id"))
    if problems:
        raise invalid_fields(problems)
