"""Postgres side of metering: the daily roll-ups in the `metering` schema (SQLAlchemy Core)."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tally.rating import Meter

from .domain import (
    Dimension,
    MeterTotal,
    RollupRead,
    SummaryQuery,
    SummaryRow,
)

_metadata = sa.MetaData(schema="metering")


def _group_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("org_id", sa.Text, primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("project_id", sa.Text, primary_key=True),
        sa.Column("environment", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("operation", sa.Text, primary_key=True),
    ]


usage_daily: Final = sa.Table(
    "usage_daily",
    _metadata,
    *_group_columns(),
    sa.Column("meter", sa.Text, primary_key=True),
    sa.Column("quantity", sa.BigInteger),
    sa.Column("credits_micros", sa.BigInteger),
    sa.Column("event_count", sa.BigInteger),
)
"""Per-meter daily usage (migrations/versions/0001_usage_rollups.py)."""

usage_daily_events: Final = sa.Table(
    "usage_daily_events", _metadata, *_group_columns(), sa.Column("event_count", sa.BigInteger)
)
"""Distinct events per group and day, meter-independent."""

_COLUMN_OF: Final = {
    Dimension.MODEL: "model",
    Dimension.OPERATION: "operation",
    Dimension.USER: "user_id",
    Dimension.PROJECT: "project_id",
    Dimension.ENVIRONMENT: "environment",
}
"""Roll-up column of each grouping dimension (METER is the row split itself)."""


def _total(column: sa.ColumnElement[Any], label: str) -> sa.Label[int]:
    # sum(bigint) is numeric in Postgres; the result fits int64 like every balance does.
    return sa.cast(sa.func.coalesce(sa.func.sum(column), 0), sa.BigInteger).label(label)


def _conditions(table: sa.Table, query: SummaryQuery) -> list[sa.ColumnElement[bool]]:
    wanted = query.filter
    found: list[sa.ColumnElement[bool]] = [
        table.c.org_id == query.org_id,
        table.c.day >= query.month_start,
        table.c.day < query.month_end,
    ]
    for column, value in (
        ("project_id", wanted.project_id),
        ("environment", wanted.environment),
        ("user_id", wanted.user_id),
        ("model", wanted.model),
        ("operation", wanted.operation),
    ):
        if value:
            found.append(table.c[column] == value)
    if wanted.meter is not None and "meter" in table.c:
        found.append(table.c.meter == wanted.meter.value)
    return found


class UsageStore:
    """Reads the roll-ups; implements `domain.UsageRollups`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def read_summary(self, query: SummaryQuery, *, row_limit: int) -> RollupRead:
        """Rows and totals from one REPEATABLE READ snapshot, so they always agree."""
        keyed = [d for d in query.group_by if d is not Dimension.METER]
        key_columns = [usage_daily.c[_COLUMN_OF[d]] for d in keyed]
        where = _conditions(usage_daily, query)
        rows_stmt = (
            sa.select(
                *key_columns,
                usage_daily.c.meter,
                _total(usage_daily.c.quantity, "quantity"),
                _total(usage_daily.c.credits_micros, "credits_micros"),
                _total(usage_daily.c.event_count, "event_count"),
            )
            .where(*where)
            .group_by(*key_columns, usage_daily.c.meter)
            .order_by(*key_columns, usage_daily.c.meter)
            .limit(row_limit)
        )
        totals_stmt = (
            sa.select(
                usage_daily.c.meter,
                _total(usage_daily.c.quantity, "quantity"),
                _total(usage_daily.c.credits_micros, "credits_micros"),
            )
            .where(*where)
            .group_by(usage_daily.c.meter)
            .order_by(usage_daily.c.meter)
        )
        # With a meter filter, an event counts once in that meter's rows; otherwise the
        # meter-independent roll-up is the only exact count of distinct events.
        events_stmt = (
            sa.select(_total(usage_daily.c.event_count, "n")).where(*where)
            if query.filter.meter is not None
            else sa.select(_total(usage_daily_events.c.event_count, "n")).where(
                *_conditions(usage_daily_events, query)
            )
        )
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                rows = (await conn.execute(rows_stmt)).all()
                totals = (await conn.execute(totals_stmt)).all()
                distinct_events = (await conn.execute(events_stmt)).scalar_one()
                as_of = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
        return RollupRead(
            rows=[
                SummaryRow(
                    key={d: row._mapping[_COLUMN_OF[d]] for d in keyed}
                    | ({Dimension.METER: row.meter} if Dimension.METER in query.group_by else {}),
                    meter=Meter(row.meter),
                    quantity=row.quantity,
                    credits_micros=row.credits_micros,
                    event_count=row.event_count,
                )
                for row in rows
            ],
            meter_totals=[MeterTotal(Meter(t.meter), t.quantity, t.credits_micros) for t in totals],
            distinct_events=distinct_events,
            as_of=as_of,
        )
