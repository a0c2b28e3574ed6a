"""Ingestion's store alone: the cost of one group commit's transaction and of rolling it up.

``python -m bench.ingest_store [--quick]`` prints one JSON object: ``UsageEventStore.record``
of batches of 2,000 fresh events over 1,000 orgs (the group commit the 8 x 1,000 stream shape
makes), on one connection of a fresh ``tally_bench_ingeststore_<pid>`` database
(``TALLY_DATABASE_URL``, else the embedded PostgreSQL under ``.tally/bench``), after two
warm-up batches; then the roll-up worker catching up with all of them. Per event:
``record.pg_cpu_us`` (the backend's utime+stime from /proc), ``record.python_cpu_us`` (this
process), ``record.wall_us``; ``rollup.pg_cpu_us`` and ``rollup.wall_us``; beside them
``baseline_raw_copy``: the same number of rows (org, event id, time, cost; the same
primary key) by one binary COPY per batch into a temporary table, in the same run. No gRPC,
no ledger: the figures isolate what bench.ingest's ``postgres`` and metering columns spend on
the ack path's transaction and on the roll-ups, on a box too loaded for end-to-end rates to
compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from bench.harness import bench_database, cpu_seconds, database_label, database_server_url
from bench.ingest import BENCH_DATA_DIR, _event
from services.metering.ingestion import convert
from services.metering.ingestion.rollup import RollupWorker
from services.metering.ingestion.store import UsageEventStore
from tally.kit import db
from tally.kit.log import configure_logging
from tally.rating import PriceBookHistory
from tally.rating.catalog import load_catalog

BATCH: Final = 2000
WARM_UP: Final = 2


async def measure(url: str, batches: int) -> dict[str, Any]:
    """`batches` group commits recorded, then rolled up; CPU and wall per event."""
    history = PriceBookHistory([load_catalog()])
    pool = await db.create_pool(url, min_size=1, max_size=1)
    try:
        backend = int(await pool.fetchval("SELECT pg_backend_pid()"))
        store = UsageEventStore(pool)
        at = datetime.now(UTC) - timedelta(minutes=5)
        events = [[convert.event(_event(b * BATCH + i, "store", at)) for i in range(BATCH)]
                  for b in range(batches + WARM_UP)]
        for b in range(WARM_UP):
            await store.record(f"warm-{b}", events[b], history)
        pg, python, wall = cpu_seconds(backend), time.process_time(), time.perf_counter()
        for b in range(WARM_UP, batches + WARM_UP):
            await store.record(f"batch-{b}", events[b], history)
        count = batches * BATCH
        record = {"pg_cpu_us": (cpu_seconds(backend) - pg) / count * 1e6,
                  "python_cpu_us": (time.process_time() - python) / count * 1e6,
                  "wall_us": (time.perf_counter() - wall) / count * 1e6}
        # the raw baseline: the same number of rows, keyed alike, by one binary COPY a batch
        await pool.execute("CREATE TEMP TABLE raw_events (org_id text, event_id text, "
                           "occurred_at timestamptz, cost_micros bigint, "
                           "PRIMARY KEY (org_id, event_id))")
        pg, wall = cpu_seconds(backend), time.perf_counter()
        for b in range(WARM_UP, batches + WARM_UP):
            await pool.copy_records_to_table("raw_events", records=[
                (e.org_id, e.event_id, e.occurred_at, 1) for e in events[b]])
        baseline = {"pg_cpu_us": (cpu_seconds(backend) - pg) / count * 1e6,
                    "wall_us": (time.perf_counter() - wall) / count * 1e6}
        pg, wall = cpu_seconds(backend), time.perf_counter()
        rolled = await RollupWorker(pool).catch_up()
        rolled_events = (batches + WARM_UP) * BATCH
        rollup = {"batches": rolled,
                  "pg_cpu_us": (cpu_seconds(backend) - pg) / rolled_events * 1e6,
                  "wall_us": (time.perf_counter() - wall) / rolled_events * 1e6}
    finally:
        await pool.close()
    return {"events": count, "batch_events": BATCH,
            "record": {k: round(v, 1) for k, v in record.items()},
            "rollup": {k: round(v, 1) for k, v in rollup.items()},
            "baseline_raw_copy": {k: round(v, 1) for k, v in baseline.items()}}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: print the store's figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 batches instead of 20")
    args = parser.parse_args(argv)
    configure_logging("bench", "warning")
    server_url = database_server_url(BENCH_DATA_DIR)
    with bench_database(server_url, "tally_bench_ingeststore", ("metering",)) as url:
        result = asyncio.run(measure(url, 4 if args.quick else 20))
    result |= {"load_average": [float(x) for x in open("/proc/loadavg").read().split()[:3]],
               "quick": args.quick, "database": database_label(BENCH_DATA_DIR)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
