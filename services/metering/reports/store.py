"""Postgres side of usage reports: the roll-ups in the `metering` schema (SQLAlchemy Core).

Monthly summaries read the daily roll-ups (and the daily label roll-up when grouped by LABEL);
exports read the hourly or daily ones. None of them reads raw events; the usage of named
ledger batches (`BatchUsageStore`) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tally.rating import Meter

from .domain import (
    BatchCharge,
    BatchUsage,
    BreakdownRow,
    Dimension,
    MeterTotal,
    RollupExportQuery,
    RollupGrain,
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

usage_hourly: Final = sa.Table(
    "usage_hourly",
    _metadata,
    sa.Column("org_id", sa.Text, primary_key=True),
    sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
    *_group_columns()[2:],
    sa.Column("meter", sa.Text, primary_key=True),
    sa.Column("quantity", sa.BigInteger),
    sa.Column("credits_micros", sa.BigInteger),
    sa.Column("event_count", sa.BigInteger),
)
"""Per-meter hourly usage (migrations/versions/0002_usage_events.py)."""

usage_daily_labels: Final = sa.Table(
    "usage_daily_labels",
    _metadata,
    sa.Column("org_id", sa.Text, primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("label_key", sa.Text, primary_key=True),
    sa.Column("label_value", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("meter", sa.Text, primary_key=True),
    sa.Column("quantity", sa.BigInteger),
    sa.Column("credits_micros", sa.BigInteger),
    sa.Column("event_count", sa.BigInteger),
)
"""Per-label, model and meter daily usage: what LABEL groupings read."""

_COLUMN_OF: Final = {
    Dimension.MODEL: "model",
    Dimension.OPERATION: "operation",
    Dimension.USER: "user_id",
    Dimension.PROJECT: "project_id",
    Dimension.ENVIRONMENT: "environment",
    Dimension.LABEL: "label_value",
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
        if value and column in table.c:  # the label roll-up has no such column
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
        where = _conditions(usage_daily, query)
        source = usage_daily
        row_where = where
        if Dimension.LABEL in query.group_by:
            source = usage_daily_labels
            row_where = [*_conditions(usage_daily_labels, query),
                         usage_daily_labels.c.label_key == query.label_key]
        key_columns = [source.c[_COLUMN_OF[d]] for d in keyed]
        rows_stmt = (
            sa.select(
                *key_columns,
                source.c.meter,
                _total(source.c.quantity, "quantity"),
                _total(source.c.credits_micros, "credits_micros"),
                _total(source.c.event_count, "event_count"),
            )
            .where(*row_where)
            .group_by(*key_columns, source.c.meter)
            .order_by(*key_columns, source.c.meter)
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

    async def export_rollup(self, query: RollupExportQuery, after: Sequence[str] | None,
                            limit: int) -> list[SummaryRow]:
        """Rows of the hourly or daily roll-up in [start, end), keyset-paged after `after`
        (the previous page's last bucket, group key and meter, as strings)."""
        if Dimension.LABEL in query.group_by:
            table, bucket = usage_daily_labels, usage_daily_labels.c.day
        elif query.grain is RollupGrain.HOUR:
            table, bucket = usage_hourly, usage_hourly.c.hour
        else:
            table, bucket = usage_daily, usage_daily.c.day
        keyed = [d for d in query.group_by if d is not Dimension.METER]
        key_columns = [table.c[_COLUMN_OF[d]] for d in keyed]
        where: list[sa.ColumnElement[bool]] = [table.c.org_id == query.org_id]
        if Dimension.LABEL in query.group_by:
            where.append(table.c.label_key == query.label_key)
        daily = query.grain is RollupGrain.DAY
        if query.start is not None:
            where.append(bucket >= (_first_day(query.start) if daily else query.start))
        if query.end is not None:
            where.append(bucket < (_first_day(query.end) if daily else query.end))
        order = [bucket, *key_columns, table.c.meter]
        if after is not None:
            first = date.fromisoformat(after[0]) if daily else datetime.fromisoformat(after[0])
            where.append(sa.tuple_(*order) > sa.tuple_(first, *after[1:]))
        stmt = (
            sa.select(*order, _total(table.c.quantity, "quantity"),
                      _total(table.c.credits_micros, "credits_micros"),
                      _total(table.c.event_count, "event_count"))
            .where(*where).group_by(*order).order_by(*order).limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [
            SummaryRow(
                key={d: row._mapping[_COLUMN_OF[d]] for d in keyed}
                | ({Dimension.METER: row.meter} if Dimension.METER in query.group_by else {}),
                meter=Meter(row.meter), quantity=row.quantity,
                credits_micros=row.credits_micros, event_count=row.event_count,
                bucket_start=_bucket_start(row[0]),
            )
            for row in rows
        ]


def _first_day(moment: datetime) -> date:
    """First day whose midnight (UTC) is at or after `moment`: a daily bucket is in [start,
    end) when its midnight is."""
    at = moment.astimezone(UTC)
    return at.date() if at.time() == time(0) else at.date() + timedelta(days=1)


def _bucket_start(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.combine(value, time(0), tzinfo=UTC)


# GetBatchUsage reads raw events, not roll-ups: a ledger batch is not a roll-up key, and it
# is asked once per statement or reconciliation (through the ledger_batch_id index).
# $1 org, $2 batch ids
_BATCH_CHARGES: Final = (
    "SELECT ledger_batch_id AS batch_id, sum(cost_micros) AS credits, count(*) AS events "
    "FROM metering.usage_events WHERE org_id = $1 AND ledger_batch_id = ANY($2::text[]) "
    "GROUP BY 1")
_BATCH_BREAKDOWN: Final = (
    "WITH e AS (SELECT * FROM metering.usage_events "
    "WHERE org_id = $1 AND ledger_batch_id = ANY($2::text[])) "
    # an event's receipt lines: arrays since the ack path's line columns, JSON before
    "SELECT 'meter' AS dimension, l.meter AS value, sum(l.cost) AS credits, "
    "count(DISTINCT e.event_id) AS events FROM e, LATERAL ("
    "SELECT m AS meter, c AS cost FROM unnest(e.meters, e.meter_costs) AS x(m, c) "
    "UNION ALL SELECT j->>0, (j->>4)::bigint FROM jsonb_array_elements("
    "CASE WHEN e.meters IS NULL THEN coalesce(e.lines, '[]') ELSE '[]' END) AS j) l "
    "GROUP BY 2 "
    "UNION ALL SELECT 'model', model, sum(cost_micros), count(*) FROM e GROUP BY 2 "
    "UNION ALL SELECT 'project', project_id, sum(cost_micros), count(*) FROM e GROUP BY 2 "
    "UNION ALL SELECT 'label', l.key || '=' || l.value, sum(cost_micros), count(*) "
    "FROM e, jsonb_each_text(e.labels) AS l GROUP BY 2 "
    "ORDER BY 1, 2")


class BatchUsageStore:
    """Reads the usage of ledger batches from the recorded events; implements
    `domain.BatchUsageSource`."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # asyncpg.Pool on metering's database

    async def batch_usage(self, org_id: str, batch_ids: Sequence[str]) -> BatchUsage:
        """Per batch and broken down, from one REPEATABLE READ snapshot so both agree."""
        async with self.pool.acquire() as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            charges = {r["batch_id"]: r for r in await conn.fetch(
                _BATCH_CHARGES, org_id, list(batch_ids))}
            rows = await conn.fetch(_BATCH_BREAKDOWN, org_id, list(batch_ids))
        return BatchUsage(
            [BatchCharge(b, int(charges[b]["credits"]), int(charges[b]["events"]))
             for b in dict.fromkeys(batch_ids) if b in charges],
            [BreakdownRow(r["dimension"], r["value"], int(r["credits"]), int(r["events"]))
             for r in rows])
