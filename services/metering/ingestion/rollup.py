"""Roll-ups off the ack path, exactly once.

A group commit records its events and its ledger batch row; the roll-ups (hourly, daily,
daily events, daily labels) follow from committed batches here. One transaction claims up to
`max_batches` batches not yet rolled up (oldest first, `FOR UPDATE SKIP LOCKED`, so workers of
several processes or replicas share the work), adds their events to the roll-ups and marks them
rolled up — all or nothing, so a worker killed mid-transaction leaves its batches to the next
one and nothing is counted twice. The aggregation is one statement in PostgreSQL (no Python
per event): hourly rows from the events, daily rows from those hourly sums, daily events and
labels from the events.

The worker sleeps until woken (`wake`: the committer calls it after each commit; no polling
loop) and then waits for `coalesce` batches or `max_delay_s`, whichever comes first, so a
transaction carries many batches. A read of the roll-ups first catches up everything committed
before it (`catch_up`, waiting for batches another worker holds), so summaries are never stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from services.metering.reports.domain import (
    RollupExportQuery,
    RollupRead,
    SummaryQuery,
    SummaryRow,
    UsageRollups,
)
from tally.kit import metrics
from tally.kit.log import get_logger

log = get_logger("metering.rollup")

_DIMS = "project_id, environment, user_id, model, operation"

# $1: how many batches; $2: SKIP LOCKED (a worker) or wait for them (a read catching up).
_ROLL_UP = """
WITH picked AS MATERIALIZED (
    SELECT batch_id, created_at FROM metering.ledger_batches
    WHERE rolled_up_at IS NULL ORDER BY created_at LIMIT $1 FOR UPDATE {lock}
),
-- one row per metered quantity: an accepted event has exactly one receipt line per meter it
-- reports (rating refuses a meter without a price), stored as arrays in receipt order
metered AS MATERIALIZED (
    SELECT e.org_id, e.occurred_at, e.project_id, e.environment, e.user_id,
           e.resolved_model AS model, e.operation, e.labels, l.meter, l.quantity,
           l.credits, l.n = 1 AS first
    FROM picked p JOIN metering.usage_events e ON e.ledger_batch_id = p.batch_id
    CROSS JOIN LATERAL unnest(e.meters, e.meter_quantities, e.meter_costs)
        WITH ORDINALITY AS l(meter, quantity, credits, n)
),
hourly AS MATERIALIZED (
    SELECT org_id, date_trunc('hour', occurred_at, 'UTC') AS hour, project_id, environment,
           user_id, model, operation, meter, sum(quantity)::bigint AS quantity,
           sum(credits)::bigint AS credits, count(*) AS n
    FROM metered GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
),
h AS (
    INSERT INTO metering.usage_hourly AS t (org_id, hour, {dims}, meter, quantity,
                                           credits_micros, event_count)
    SELECT * FROM hourly
    ON CONFLICT (org_id, hour, {dims}, meter) DO UPDATE SET
        quantity = t.quantity + EXCLUDED.quantity,
        credits_micros = t.credits_micros + EXCLUDED.credits_micros,
        event_count = t.event_count + EXCLUDED.event_count
),
d AS (
    INSERT INTO metering.usage_daily AS t (org_id, day, {dims}, meter, quantity,
                                          credits_micros, event_count)
    SELECT org_id, (hour AT TIME ZONE 'UTC')::date, {dims}, meter, sum(quantity),
           sum(credits), sum(n)
    FROM hourly GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (org_id, day, {dims}, meter) DO UPDATE SET
        quantity = t.quantity + EXCLUDED.quantity,
        credits_micros = t.credits_micros + EXCLUDED.credits_micros,
        event_count = t.event_count + EXCLUDED.event_count
),
de AS (
    INSERT INTO metering.usage_daily_events AS t (org_id, day, {dims}, event_count)
    SELECT org_id, (occurred_at AT TIME ZONE 'UTC')::date, {dims}, count(*)
    FROM metered WHERE first GROUP BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT (org_id, day, {dims}) DO UPDATE SET
        event_count = t.event_count + EXCLUDED.event_count
),
dl AS (
    INSERT INTO metering.usage_daily_labels AS t (org_id, day, label_key, label_value, model,
                                                 meter, quantity, credits_micros, event_count)
    SELECT m.org_id, (m.occurred_at AT TIME ZONE 'UTC')::date, l.key, l.value, m.model,
           m.meter, sum(m.quantity), sum(m.credits), count(*)
    FROM metered m CROSS JOIN LATERAL jsonb_each_text(m.labels) l
    WHERE m.labels <> '{{}}'::jsonb
    GROUP BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (org_id, day, label_key, label_value, model, meter) DO UPDATE SET
        quantity = t.quantity + EXCLUDED.quantity,
        credits_micros = t.credits_micros + EXCLUDED.credits_micros,
        event_count = t.event_count + EXCLUDED.event_count
)
UPDATE metering.ledger_batches b SET rolled_up_at = now()
FROM picked p WHERE b.batch_id = p.batch_id
RETURNING b.batch_id
"""
_WORKER_ROLL_UP = _ROLL_UP.format(lock="SKIP LOCKED", dims=_DIMS)
_CATCH_UP_ROLL_UP = _ROLL_UP.format(lock="", dims=_DIMS)


@dataclass
class RollupWorker:
    """Adds committed usage batches to the roll-ups; see the module docstring."""

    pool: asyncpg.Pool
    max_batches: int = 256
    coalesce: int = 16
    max_delay_s: float = 1.0
    _woken: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def wake(self, batches: int = 1) -> None:
        """`batches` more committed batches are waiting (the committer, after a commit)."""
        self._woken += batches
        self._wake.set()

    async def start(self) -> None:
        """Catches up what is pending (a crash may have left some), then follows commits."""
        await self.catch_up(wait_for_others=False)
        self._task = asyncio.create_task(self._run(), name="metering-rollup")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            deadline = time.monotonic() + self.max_delay_s
            while self._woken < self.coalesce and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            self._wake.clear()
            self._woken = 0
            try:
                await self.catch_up(wait_for_others=False)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                # its transaction rolled back, so the batches stay pending: the next wake (or
                # a read) rolls them up
                log.exception("rollup_failed")

    async def roll_up_once(self, *, wait_for_others: bool = True) -> int:
        """One transaction: up to `max_batches` batches into the roll-ups; how many."""
        async with self.pool.acquire() as conn, conn.transaction():
            rolled = await conn.fetch(
                _CATCH_UP_ROLL_UP if wait_for_others else _WORKER_ROLL_UP, self.max_batches)
        if rolled:
            metrics.USAGE_ROLLUP_BATCHES.observe(len(rolled))
        return len(rolled)

    async def catch_up(self, *, wait_for_others: bool = True) -> int:
        """Rolls up every batch committed so far; with `wait_for_others`, also those another
        worker is rolling up right now (waiting for it), so what follows reads them."""
        total = 0
        while rolled := await self.roll_up_once(wait_for_others=wait_for_others):
            total += rolled
        metrics.USAGE_ROLLUP_LAG.set(await self.lag_seconds())
        return total

    async def lag_seconds(self) -> float:
        """Age of the oldest committed batch not yet rolled up (0 if none)."""
        lag = await self.pool.fetchval(
            "SELECT extract(epoch FROM now() - min(created_at))::float8 "
            "FROM metering.ledger_batches WHERE rolled_up_at IS NULL")
        return max(0.0, float(lag or 0.0))


@dataclass
class CaughtUpRollups:
    """The roll-ups as reads see them: caught up with every committed batch first."""

    rollups: UsageRollups
    worker: RollupWorker

    async def read_summary(self, query: SummaryQuery, *, row_limit: int) -> RollupRead:
        await self.worker.catch_up()
        return await self.rollups.read_summary(query, row_limit=row_limit)

    async def export_rollup(self, query: RollupExportQuery, after: Sequence[str] | None,
                            limit: int) -> Sequence[SummaryRow]:
        await self.worker.catch_up()
        return await self.rollups.export_rollup(query, after, limit)
