"""Background loops that wait for PostgreSQL notifications instead of polling."""

from __future__ import annotations

import asyncio

import asyncpg

from tally.kit import db
from tally.kit.background import Signal, run_when_notified


async def test_a_notified_task_runs_once_per_burst_of_notifications_and_not_otherwise(
        db_url: str) -> None:
    runs: list[int] = []
    ran = Signal()

    async def task() -> None:
        runs.append(len(runs))
        ran.fire()

    stop = asyncio.Event()
    first = ran.ticket()
    loop = asyncio.create_task(run_when_notified(
        "probe", db_url, "probe_channel", task, stop, safety_interval_s=3600,
        min_interval_s=0.0))
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await asyncio.wait_for(first.wait(), 10)  # the run at start
        await asyncio.wait_for(ran.ticket().wait(), 10)  # the listener's catch-up run
        settled = len(runs)
        notified = ran.ticket()
        await conn.execute("SELECT pg_notify('probe_channel', '')")
        await asyncio.wait_for(notified.wait(), 10)
        assert len(runs) == settled + 1
        # a burst in one transaction is one notification, and so one run
        burst = ran.ticket()
        async with conn.transaction():
            for _ in range(20):
                await conn.execute("SELECT pg_notify('probe_channel', '')")
        await asyncio.wait_for(burst.wait(), 10)
        assert len(runs) == settled + 2
    finally:
        stop.set()
        await loop
        await conn.close()
