"""Background loops that wait for PostgreSQL notifications instead of polling."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from tally.kit import db
from tally.kit.background import Deadline, Signal, run_when_notified


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
        "probe", task, stop, listen=(db_url, "probe_channel"), safety_interval_s=3600,
        min_interval_s=0.0))
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await asyncio.wait_for(first.wait(), 10)  # the run at start
        while True:  # the listener's catch-up run (it may have come already)
            ticket = ran.ticket()
            if len(runs) >= 2:
                break
            await asyncio.wait_for(ticket.wait(), 10)
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


async def test_a_sweeper_waits_for_its_next_deadline_and_an_earlier_one_wakes_it() -> None:
    """No query while nothing is due: the loop asks for the next deadline after each run and
    sleeps until then; the request path's earlier deadline wakes it sooner."""
    runs: list[datetime] = []
    asked: list[datetime] = []
    ran = Signal()
    deadline = Deadline()
    far = datetime.now(UTC) + timedelta(hours=1)

    async def sweep() -> int:
        runs.append(datetime.now(UTC))
        ran.fire()
        return 0

    async def next_due() -> datetime:
        asked.append(datetime.now(UTC))
        return far  # the database knows of nothing sooner

    stop = asyncio.Event()
    first = ran.ticket()
    loop = asyncio.create_task(run_when_notified(
        "sweep", sweep, stop, deadline=deadline, next_due=next_due, safety_interval_s=3600,
        min_interval_s=0.0))
    try:
        await asyncio.wait_for(first.wait(), 10)
        await asyncio.sleep(0)  # it asks for the next deadline, then waits
        assert (len(runs), len(asked), deadline.at) == (1, 1, far)
        woken = ran.ticket()
        deadline.due(datetime.now(UTC) + timedelta(milliseconds=50))  # a hold expiring soon
        await asyncio.wait_for(woken.wait(), 10)
        await asyncio.sleep(0.01)  # it asks for the next deadline again, then waits
        assert (len(runs), len(asked), deadline.at) == (2, 2, far)  # one ask per run
        deadline.due(far + timedelta(hours=1))  # a later deadline does not move it
        assert deadline.at == far and len(runs) == 2
    finally:
        stop.set()
        await loop
