"""Metering's rules for usage summaries: what a valid question is and what the answer holds.

Summaries come from the daily roll-ups (DESIGN §6), never from raw events. No grpc, no SQL:
the store is anything with the `UsageRollups` shape.
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


SUPPORTED_DIMENSIONS: Final = frozenset(Dimension) - {Dimension.LABEL}
"""Dimensions the roll-ups carry. Labels are not in `usage_daily`, so LABEL is refused."""


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


def summary_query(
    *,
    org_id: str,
    year: int,
    month: int,
    group_by: Sequence[Dimension | None],
    filter: UsageFilter,
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
    if len(group_by) > MAX_GROUP_BY:
        problems.append(FieldViolation("group_by", f"at most {MAX_GROUP_BY} dimensions"))
    seen: set[Dimension] = set()
    for i, dimension in enumerate(group_by):
        if dimension is None:
            problems.append(FieldViolation(f"group_by[{i}]", "is not a grouping dimension"))
        elif dimension not in SUPPORTED_DIMENSIONS:
            problems.append(
                FieldViolation(f"group_by[{i}]", f"grouping by {dimension} is not supported yet")
            )
        elif dimension in seen:
            problems.append(FieldViolation(f"group_by[{i}]", f"{dimension} is repeated"))
        else:
            seen.add(dimension)
    if label_filter_count:
        problems.append(FieldViolation("filters.labels", "filtering by label is not supported yet"))
    if problems:
        raise invalid_fields(problems)
    start = date(year, month, 1)
    end = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    return SummaryQuery(org_id, start, end, tuple(d for d in group_by if d is not None), filter)


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """Usage of one meter within one group."""

    key: Mapping[Dimension, str]
    meter: Meter
    quantity: int
    credits_micros: int
    event_count: int


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
    """Usage summaries for an org's month."""

    def __init__(self, rollups: UsageRollups) -> None:
        self._rollups = rollups

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
