"""Portal page latency: the overview of an org with 1M usage events, rendered from roll-ups.

What it measures (``python -m bench.portal [--quick]`` prints one JSON object):

- ``overview``: GET /orgs/<org>/overview by a signed-in member, sequentially — p50/p99 latency
  and CPU microseconds per page of each process (this client, the portal, the ledger, the
  metering server, their PostgreSQL backends), read from /proc.
- ``baseline_grpc``: the gRPC calls the overview makes (GetBalance, ExportUsage of 7 daily
  roll-up days, ListAlertRules), concurrently as the page makes them, directly from this
  process in the same run: what the page adds (session, policy check, template, HTTP) is the
  difference.
- ``targets``: overview p50 and p99 < 300 ms with 1M events.

Seeding: 1M usage events through StreamUsage would take minutes on a small machine, so the
run writes the roll-ups those events would leave (``metering.usage_daily`` and
``usage_daily_events``: 90 days x 5 models x 4 projects x 2 meters for the measured org,
whose event counts sum to 1,000,800 (>= 1M); the same for ``--other-orgs`` other orgs so the
tables are not tiny) directly with SQL. The overview never reads raw events, so raw rows
would not change what it does; this is stated in the output (``seeded``).

The database is ``TALLY_DATABASE_URL`` if set, else an embedded PostgreSQL under
``.tally/bench``; a fresh ``tally_bench_portal_<pid>`` database is created, migrated and
dropped. Every server (pricing, ledger, accounts, metering, notifier, portal) runs in its own
``spawn``ed child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, cast

import asyncpg
import httpx

from bench.baseline import child_server, nearest_rank, run_in_loop
from bench.harness import (
    CpuMeter,
    bench_database,
    database_label,
    database_server_url,
    postgres_backends,
    serve_in_child,
)
from tally.accounts.v1 import accounts_pb2 as apb
from tally.common.v1 import common_pb2 as cpb
from tally.kit import db
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.sdk.client import TallyClient

ORG: Final = "bench-portal"
EVENTS: Final = 1_000_000
DAYS: Final = 90
MODELS: Final = ("claude-sonnet", "claude-haiku", "gpt-4o", "gpt-4o-mini", "llama-70b")
PROJECTS: Final = ("search", "chat", "agents", "batch")
TARGET_MS: Final = 300.0
DATA_DIR: Final = Path(".tally/bench")


# ---------------------------------------------------------------------------- servers


def _serve(conn: Connection, name: str, config: KitConfig) -> None:
    import importlib

    build = importlib.import_module(f"services.{name}.server").build
    serve_in_child(conn, name, build, config, grace_seconds=5.0)


def _serve_portal(conn: Connection, config: KitConfig) -> None:
    from services.portal.config import PortalConfig
    from services.portal.server import start_portal
    from tally.kit.log import configure_logging

    configure_logging("portal", "warning")
    port = free_port()

    async def serve() -> None:
        portal = await start_portal(config, PortalConfig(dev_sign_in=True), port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)
        conn.send(port)
        await stop.wait()
        loop.remove_reader(conn.fileno())
        await portal.stop()

    run_in_loop(serve())


@contextlib.contextmanager
def suite(database_url: str) -> Iterator[tuple[KitConfig, str]]:
    """Pricing, ledger, accounts, metering and the portal, each in a child process."""
    config = dataclasses.replace(load_kit_config({}), database_url=database_url,
                                 migrate_on_start=False, db_pool_size=8)
    with contextlib.ExitStack() as stack:
        for name in ("pricing", "ledger", "accounts", "metering", "notifier"):
            address = stack.enter_context(child_server(name, _serve, (name, config)))
            config = dataclasses.replace(config, **cast(dict[str, Any],
                                                        {f"{name}_address": address}))
        portal = stack.enter_context(child_server("portal", _serve_portal, (config,)))
        yield config, f"http://{portal}"


# ---------------------------------------------------------------------------- seeding


async def seed_rollups(database_url: str, other_orgs: int) -> dict[str, int]:
    """The roll-ups 1M events of ORG (and as many for each other org) would leave."""
    per_group = -(-EVENTS // (DAYS * len(MODELS) * len(PROJECTS)))  # at least EVENTS
    first = (datetime.now(UTC) - timedelta(days=DAYS - 1)).date()
    orgs = [ORG, *(f"bench-other-{i}" for i in range(other_orgs))]
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        await conn.execute(
            "INSERT INTO metering.usage_daily (org_id, day, project_id, model, operation, meter,"
            " quantity, credits_micros, event_count) "
            "SELECT o, $2::date + d, p, m, 'chat', meter, $3 * q, $3 * c, $3 "
            "FROM unnest($1::text[]) o, generate_series(0, $4 - 1) d, unnest($5::text[]) p, "
            "unnest($6::text[]) m, (VALUES ('input_tokens', 2000, 6000), "
            "('output_tokens', 500, 7500)) AS meters(meter, q, c)",
            orgs, first, per_group, DAYS, list(PROJECTS), list(MODELS))
        await conn.execute(
            "INSERT INTO metering.usage_daily_events (org_id, day, project_id, model, operation,"
            " event_count) SELECT o, $2::date + d, p, m, 'chat', $3 "
            "FROM unnest($1::text[]) o, generate_series(0, $4 - 1) d, unnest($5::text[]) p, "
            "unnest($6::text[]) m",
            orgs, first, per_group, DAYS, list(PROJECTS), list(MODELS))
        rows = await conn.fetchval("SELECT count(*) FROM metering.usage_daily")
        events = await conn.fetchval(
            "SELECT sum(event_count) FROM metering.usage_daily_events WHERE org_id = $1", ORG)
        await conn.execute("ANALYZE metering.usage_daily; ANALYZE metering.usage_daily_events")
    finally:
        await conn.close()
    return {"org_events": int(events), "usage_daily_rows": int(rows), "orgs": len(orgs)}


async def seed_org(tally: TallyClient) -> None:
    await tally.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id=ORG, name="Bench", region="local", seat_limit=5, owner_subject="bench-owner"))
    await tally.ledger.Transfer(lpb.TransferRequest(
        transfer_id="bench-grant", org_id=ORG, kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=10_000_000 * 1_000_000, reason="bench",
        context=cpb.RequestContext(org_id=ORG, actor="user:finance")))


async def sign_in(http: httpx.AsyncClient) -> None:
    overview = f"/orgs/{ORG}/overview"
    form = await http.get("/sign-in", params={"next": overview})
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    await http.post("/dev/sign-in", data={"login_token": token.group(1),
                                           "subject": "bench-owner", "next": overview})
    for _ in range(300):  # the portal learns the membership from accounts' feed
        reply = await http.get(overview)
        if reply.status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the portal never showed the overview: {reply.status_code} "
                       f"{reply.text[-500:]}")


# ---------------------------------------------------------------------------- measuring


def _latency(samples_ns: list[int]) -> dict[str, Any]:
    ordered = sorted(samples_ns)
    return {"calls": len(ordered), "p50_ms": round(nearest_rank(ordered, 50) / 1e6, 2),
            "p99_ms": round(nearest_rank(ordered, 99) / 1e6, 2)}


async def measure(config: KitConfig, portal_url: str, database_url: str,
                  pages: int) -> dict[str, Any]:
    """Overview pages through the portal, then the same gRPC calls directly."""
    tally = TallyClient({s: config.address_of(s) for s in
                         ("pricing", "ledger", "accounts", "metering", "notifier")},
                        actor="user:bench-operator")
    async with tally, httpx.AsyncClient(base_url=portal_url, timeout=30) as http:
        await seed_org(tally)
        await sign_in(http)
        children = {str(p.name).removeprefix("bench-").removesuffix("-server"): p.pid
                    for p in multiprocessing.active_children() if p.pid is not None}
        meter = CpuMeter({
            "client": [os.getpid()], "portal": [children["portal"]],
            "ledger": [children["ledger"]], "metering": [children["metering"]],
            "notifier": [children["notifier"]],
            "postgres": await postgres_backends(database_url)})
        page = f"/orgs/{ORG}/overview"
        for _ in range(5):  # warm-up: connections, template compilation
            assert (await http.get(page)).status_code == 200
        samples: list[int] = []
        meter.start()
        for _ in range(pages):
            started = time.perf_counter_ns()
            reply = await http.get(page)
            samples.append(time.perf_counter_ns() - started)
            assert reply.status_code == 200 and 'id="days-left"' in reply.text
        meter.stop()
        overview: dict[str, Any] = {**_latency(samples),
                                    "cpu_us_per_page": meter.micros_per(pages)}
        raw: list[int] = []
        end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        request = mpb.ExportUsageRequest(
            org_id=ORG, kind=mpb.EXPORT_KIND_DAILY_SUMMARY, page_size=1000,
            group_by=[mpb.USAGE_GROUP_BY_METER])
        request.start_time.FromDatetime(end - timedelta(days=7))
        request.end_time.FromDatetime(end)
        for _ in range(pages):
            started = time.perf_counter_ns()
            await asyncio.gather(
                tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=ORG)),
                _drain(tally.metering.ExportUsage(request)),
                tally.notifier.ListAlertRules(npb.ListAlertRulesRequest(org_id=ORG)))
            raw.append(time.perf_counter_ns() - started)
    baseline = _latency(raw)
    return {"overview": overview, "baseline_grpc": baseline,
            "added_by_the_page_p50_ms": round(overview["p50_ms"] - baseline["p50_ms"], 2),
            "targets": {"overview_p50_under_300ms": overview["p50_ms"] < TARGET_MS,
                        "overview_p99_under_300ms": overview["p99_ms"] < TARGET_MS}}


def run(pages: int, other_orgs: int) -> dict[str, Any]:
    server = database_server_url(DATA_DIR)
    with bench_database(server, "tally_bench_portal", db.SERVICES) as url:
        seeded = run_in_loop(seed_rollups(url, other_orgs))
        with suite(url) as (config, portal_url):
            measured = run_in_loop(measure(config, portal_url, url, pages))
    return {"benchmark": "portal_overview", "database": database_label(DATA_DIR),
            "seeded": {**seeded, "how": "roll-ups written with SQL (what 1M events leave); "
                       "the overview reads roll-ups only, never raw events"},
            "pages": pages, **measured}


async def _drain(call: Any) -> int:
    return sum([1 async for _ in call])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.portal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 pages, 10 other orgs")
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--other-orgs", type=int, default=100)
    args = parser.parse_args(argv)
    pages, others = (50, 10) if args.quick else (args.pages, args.other_orgs)
    os.environ.setdefault("TALLY_AUTH_MODE", "trust")
    print(json.dumps(run(pages, others), indent=2))


if __name__ == "__main__":
    main()
