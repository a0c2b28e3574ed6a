"""Idle CPU of the services: what each burns with nothing to do (background loops).

``python -m bench.idle [--seconds 30]`` starts pricing, ledger, metering and accounts on a
fresh database (``TALLY_DATABASE_URL`` or an embedded PostgreSQL), funds one org and makes
one Authorize (so the credit lease, its timers and the sweepers have something to look at),
lets them settle, then prints one JSON object: CPU ms per second of idle wall time
(utime + stime from /proc) of each service process and of its PostgreSQL backends.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg

from bench.authorize import ORG, _port, prepare, serving
from bench.baseline import _machine, run_in_loop
from bench.harness import bench_database, cpu_seconds, database_label, database_server_url
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.config import load_kit_config
from tally.kit.log import configure_logging
from tally.metering.v1 import metering_pb2
from tally.sdk.client import TallyClient

BENCH_DATA_DIR: Final = Path(".tally") / "bench-idle"
SETTLE_S: Final = 5.0


async def _backends_by_service(database_url: str) -> dict[str, list[int]]:
    """PostgreSQL backends of the bench database, by the service that opened them (the
    pools name themselves in application_name when they do; else all under "postgres")."""
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")
        return {"postgres": [r["pid"] for r in rows]}
    finally:
        await conn.close()


async def _authorize_once(metering: str) -> None:
    async with TallyClient({"metering": metering}, actor="service:bench") as client:
        await client.metering.Authorize(metering_pb2.AuthorizeRequest(
            request_id="idle-warm", context=common_pb2.RequestContext(
                org_id=ORG, project_id="p1"), model="gpt-4.1-mini",
            operation=metering_pb2.OPERATION_CHAT, estimated_input_tokens=100,
            max_output_tokens=10))


async def _measure(pids: dict[str, list[int]], seconds: float) -> dict[str, float]:
    before = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    after = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    return {name: round((after[name] - before[name]) * 1000 / elapsed, 2) for name in pids}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="idle time measured")
    args = parser.parse_args(argv)
    configure_logging("bench", "warning")
    server_url = database_server_url(BENCH_DATA_DIR)
    result: dict[str, Any] = {}
    with bench_database(server_url, "tally_bench_idle",
                        ["pricing", "ledger", "metering", "accounts"]) as database_url:
        base = dataclasses.replace(load_kit_config({}), database_url=database_url,
                                   migrate_on_start=False)
        with serving("pricing", base) as pricing, serving("ledger", base) as ledger:
            config = dataclasses.replace(base, pricing_port=_port(pricing),
                                         ledger_port=_port(ledger))
            with (serving("metering", config, {"TALLY_METERING_LIMITER": "in-process"})
                  as metering, serving("accounts", config)):
                run_in_loop(prepare(database_url, ledger))
                run_in_loop(_authorize_once(metering))
                time.sleep(SETTLE_S)
                pids = {p.name.removeprefix("bench-").removesuffix("-server"): [p.pid]
                        for p in multiprocessing.active_children()
                        if p.name.startswith("bench-") and p.pid is not None}
                pids.update(run_in_loop(_backends_by_service(database_url)))
                result = run_in_loop(_measure(pids, args.seconds))
    print(json.dumps({
        "idle_cpu_ms_per_s": result,
        "seconds": args.seconds,
        "load_average": os.getloadavg(),
        "database": database_label(BENCH_DATA_DIR),
        "machine": _machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
