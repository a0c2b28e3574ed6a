"""Authorize latency and throughput, and limiter decisions/s, beside the raw gRPC baseline.

What it measures (``python -m bench.authorize [--quick]`` prints one JSON object):

- ``limiter``: decisions/s of each backend on its own, one limit per decision over 1,000
  orgs: ``in_process`` (this process, one thread), ``redis_pipelined`` (``acquire_many`` of
  1,000 decisions per round trip) and ``redis_64_callers`` (64 concurrent ``acquire`` calls,
  which the limiter pipelines itself).
- ``authorize_in_process`` / ``authorize_redis``: the Authorize RPC with the metering server's
  limiter in process and in Redis, at 1 and 64 callers (``calls``, ``qps``, ``p50_ms``,
  ``p99_ms``), each after a warm-up. Every call is a fresh request that passes three quotas
  (org QPS, project QPS, tokens/min), a HARD budget and the org's credit lease: the full
  ALLOW path. ``cpu_ms_per_decision``: CPU (utime+stime, /proc) per decision of this client,
  each server and the PostgreSQL backends, and in total; ``ledger_calls_per_decision``:
  ExtendLease calls the ledger applied per decision (sync and background: an upper bound of
  the share that went to the ledger synchronously).
- ``ledger_reserve``: the ledger's Reserve RPC alone at 1 caller (direct callers' holds).
- ``baseline``: the raw gRPC figures of :mod:`bench.baseline` from the same run, ``ratios``
  to them, and ``targets`` with ``pass`` (issue 17): at 1 caller p50 <= raw p50 + 1 ms and
  p99 <= raw p99 + 1.5 ms; at 64 callers >= 45 % of raw unary QPS and <= 1.5 ms of CPU per
  decision across all processes; Redis >= 50,000 decisions/s pipelined; in process >=
  500,000/s.

Pricing, ledger and metering each run in a ``spawn``ed child process (uvloop), as deployed,
on a fresh ``tally_bench_authorize_<pid>`` database (``TALLY_DATABASE_URL``, else the embedded
PostgreSQL under ``.tally/bench-authorize``; dropped at the end). Redis is ``TALLY_REDIS_URL``,
else an embedded Valkey started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import asyncpg

from bench.baseline import _machine, child_server, measure_unary, run_baseline, run_in_loop
from bench.harness import bench_database, database_label, database_server_url, serve_in_child
from tally.common.v1 import common_pb2
from tally.kit import db, infra
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.log import configure_logging
from tally.kit.server import ServiceApp
from tally.ledger.v1 import ledger_pb2
from tally.limits import SECOND_US, InProcessLimiter, Limit, RedisLimiter
from tally.metering.v1 import metering_pb2
from tally.sdk.client import TallyClient

BENCH_DATA_DIR: Final = Path(".tally") / "bench-authorize"
ORG: Final = "bench-org"
TARGET_P50_OVER_RAW_MS: Final = 1.0  # issue 17: at 1 caller, p50 <= raw p50 + 1 ms
TARGET_P99_OVER_RAW_MS: Final = 1.5  # and p99 <= raw p99 + 1.5 ms
TARGET_QPS_SHARE_64: Final = 0.45  # at 64 callers, >= 45 % of raw unary QPS
TARGET_CPU_MS_64: Final = 1.5  # CPU per decision, all processes, at 64 callers
TARGET_REDIS_PER_S: Final = 50_000
TARGET_IN_PROCESS_PER_S: Final = 500_000
_START_TIMEOUT_S: Final = 90.0


# ---------------------------------------------------------------------------- limiter


def _decisions(count: int) -> list[list[Limit]]:
    return [[Limit(f"{{bench-{i % 1000}}}:qps", 10**9, SECOND_US)] for i in range(count)]


async def _rate(run: Callable[[], Awaitable[int]], seconds: float) -> int:
    await run()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += await run()
    return round(done / (time.perf_counter() - started))


async def measure_limiter(redis_url: str, seconds: float) -> dict[str, int]:
    """Decisions/s of each backend."""
    decisions = _decisions(1000)
    memory = InProcessLimiter()

    async def in_process() -> int:
        for limits in decisions:
            await memory.acquire(limits)
        return len(decisions)

    shared = RedisLimiter(redis_url)

    async def pipelined() -> int:
        await shared.acquire_many(decisions)
        return len(decisions)

    async def callers_64() -> int:
        await asyncio.gather(*(shared.acquire(limits) for limits in decisions[:64]))
        return 64

    try:
        return {"in_process": await _rate(in_process, seconds),
                "redis_pipelined": await _rate(pipelined, seconds),
                "redis_64_callers": await _rate(callers_64, seconds)}
    finally:
        await shared.close()


# ---------------------------------------------------------------------------- servers


def _serve(conn: Connection, service: str, config: KitConfig,
           environ: dict[str, str], profile_path: str | None = None) -> None:
    """Child-process entry point: one Tally service until the parent says stop."""
    os.environ.update(environ)
    build: Callable[[KitConfig], Awaitable[ServiceApp]]
    if service == "pricing":
        from services.pricing.server import build
    elif service == "ledger":
        from services.ledger.server import build
    elif service == "accounts":
        from services.accounts.server import build
    else:
        from services.metering.server import build
    serve_in_child(conn, service, build, config, grace_seconds=2.0, profile_path=profile_path)


@contextlib.contextmanager
def serving(service: str, config: KitConfig, environ: dict[str, str] | None = None,
            profile_path: str | None = None) -> Iterator[str]:
    with child_server(service, _serve, (service, config, environ or {}, profile_path),
                      start_timeout_s=_START_TIMEOUT_S) as target:
        yield target


def _port(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


async def prepare(database_url: str, ledger_target: str) -> None:
    """A well-funded org with quotas and a budget that the run never exhausts."""
    async with TallyClient({"ledger": ledger_target}, actor="service:bench") as client:
        await client.ledger.Transfer(ledger_pb2.TransferRequest(
            transfer_id="bench-funding", org_id=ORG,
            kind=ledger_pb2.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=10**9 * 1_000_000, reason="bench funding"))
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        await conn.execute(
            "INSERT INTO metering.quotas (quota_id, org_id, scope, scope_value, kind, "
            "limit_value, enforcement) VALUES "
            "('bench-org-qps', $1, 'ORG', '', 'REQUESTS_PER_SECOND', 1000000000, 'HARD'), "
            "('bench-project-qps', $1, 'PROJECT', 'p1', 'REQUESTS_PER_SECOND', 1000000000, "
            "'HARD'), ('bench-tpm', $1, 'ORG', '', 'TOKENS_PER_MINUTE', 100000000, 'HARD')",
            ORG)
        await conn.execute(
            "INSERT INTO metering.budgets (budget_id, org_id, name, scope, period, "
            "limit_micros, enforcement) VALUES ('bench-budget', $1, 'bench', 'ORG', "
            "'MONTHLY', $2, 'HARD')", ORG, 10**9 * 1_000_000)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _postgres_backends(database_url: str) -> list[int]:
    """The PostgreSQL backends connected to the bench database (pools keep them)."""
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        return [r["pid"] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]
    finally:
        await conn.close()


async def _ledger_extensions(database_url: str) -> int:
    """ExtendLease calls the ledger has applied (each claims one idempotency key)."""
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM ledger.idempotency_keys WHERE key LIKE 'lease:%'"))
    finally:
        await conn.close()


def _service_pids() -> dict[str, int]:
    """The spawned servers of this run, by service."""
    return {p.name.removeprefix("bench-").removesuffix("-server"): p.pid
            for p in multiprocessing.active_children()
            if p.name.startswith("bench-") and p.pid is not None}


async def _measured(database_url: str, calls: int, run: Callable[[], Awaitable[Any]]
                    ) -> dict[str, Any]:
    """`run`'s figures plus CPU ms per decision of each process (this client, each server,
    the PostgreSQL backends) and the ledger's lease extensions per decision. (Same idea as
    the ingest branch's bench.harness.CpuMeter; fold into it when both are merged.)"""
    groups: dict[str, list[int]] = {"client": [os.getpid()]}
    groups.update({name: [pid] for name, pid in _service_pids().items()})
    groups["postgres"] = await _postgres_backends(database_url)
    extensions = await _ledger_extensions(database_url)
    before = {name: sum(_cpu_seconds(p) for p in pids) for name, pids in groups.items()}
    figures: dict[str, Any] = dict(await run())
    after = {name: sum(_cpu_seconds(p) for p in pids) for name, pids in groups.items()}
    per = {name: round((after[name] - before[name]) * 1000 / calls, 3) for name in groups}
    per["total"] = round(sum(per.values()), 3)
    figures["cpu_ms_per_decision"] = per
    extended = await _ledger_extensions(database_url) - extensions
    figures["ledger_extensions"] = extended
    # an upper bound of the calls that went to the ledger synchronously (it counts the
    # background top-ups and renewals too)
    figures["ledger_calls_per_decision"] = round(extended / calls, 5)
    return figures


async def measure_authorize(target: str, run: str, quick: bool, database_url: str
                            ) -> dict[str, Any]:
    """Authorize at 1 and 64 callers, every call a fresh request (`run` keeps ids unique:
    a reused id would measure replays), with CPU per decision per process."""
    calls_1, calls_64 = (300, 1_000) if quick else (3_000, 10_000)
    ids = itertools.count()
    refused: dict[str, int] = {}  # answers other than ALLOW, by reason (a limiter outage...)
    async with TallyClient({"metering": target}, actor="service:bench") as client:

        async def one() -> None:
            reply = await client.metering.Authorize(metering_pb2.AuthorizeRequest(
                request_id=f"bench-{run}-{next(ids)}",
                context=common_pb2.RequestContext(org_id=ORG, project_id="p1"),
                model="gpt-4.1-mini", estimated_input_tokens=1_000, max_output_tokens=200),
                timeout=30)
            if reply.decision != metering_pb2.DECISION_ALLOW:
                refused[reply.deny_reason] = refused.get(reply.deny_reason, 0) + 1

        await measure_unary(one, calls_1 // 10, 1, warmup=0)  # warm-up (lease, caches)
        single = await _measured(database_url, calls_1,
                                 lambda: measure_unary(one, calls_1, 1, warmup=0))
        await measure_unary(one, calls_64 // 10, 64, warmup=0)
        many = await _measured(database_url, calls_64,
                               lambda: measure_unary(one, calls_64, 64, warmup=0))
    return {"1_caller": single, "64_callers": many, "not_allowed": refused}


async def measure_reserve(ledger_target: str, quick: bool) -> dict[str, Any]:
    """The ledger hold alone (Reserve at 1 caller): the part of Authorize metering waits on."""
    calls = 300 if quick else 3_000
    ids = itertools.count()
    async with TallyClient({"ledger": ledger_target}, actor="service:bench") as client:

        async def one() -> None:
            await client.ledger.Reserve(ledger_pb2.ReserveRequest(
                reservation_id=f"bench-reserve-{next(ids)}", org_id=ORG, amount_micros=1_000,
                ttl_seconds=600), timeout=30)

        return {"1_caller": await measure_unary(one, calls, 1, warmup=calls // 10)}


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    """(url, label): TALLY_REDIS_URL, else an embedded Valkey for the run."""
    configured = os.environ.get("TALLY_REDIS_URL")
    if configured:
        yield configured, "TALLY_REDIS_URL"
        return
    server = infra.start_embedded_redis(BENCH_DATA_DIR)
    try:
        yield server.url, "embedded valkey"
    finally:
        server.stop()


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def _target(target: float, measured: float | None, at_most: bool = False) -> dict[str, Any]:
    passed = measured is not None and (measured <= target if at_most else measured >= target)
    return {"target": target, "measured": measured, "pass": passed}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: print limiter and Authorize figures, the baseline and targets."""
    parser = argparse.ArgumentParser(prog="python -m bench.authorize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="counts / 10, for CI smoke")
    parser.add_argument("--profile-metering", metavar="FILE",
                        help="write a cProfile of the metering server (in-process limiter run)")
    args = parser.parse_args(argv)
    configure_logging("bench", "warning")
    baseline = run_baseline(quick=args.quick)
    server_url = database_server_url(BENCH_DATA_DIR)
    authorize: dict[str, Any] = {}
    with (redis_server() as (redis_url, redis_label),
          bench_database(server_url, "tally_bench_authorize",
                         ["pricing", "ledger", "metering"]) as database_url):
        limiter = run_in_loop(measure_limiter(redis_url, 0.5 if args.quick else 2.0))
        base = dataclasses.replace(load_kit_config({}), database_url=database_url,
                                   migrate_on_start=False, redis_url=redis_url)
        with serving("pricing", base) as pricing, serving("ledger", base) as ledger:
            config = dataclasses.replace(base, pricing_port=_port(pricing),
                                         ledger_port=_port(ledger))
            run_in_loop(prepare(database_url, ledger))
            reserve = run_in_loop(measure_reserve(ledger, args.quick))
            for backend in ("in-process", "redis"):
                profile = args.profile_metering if backend == "in-process" else None
                with serving("metering", config, {"TALLY_METERING_LIMITER": backend},
                             profile) as metering:
                    authorize[backend] = run_in_loop(
                        measure_authorize(metering, backend, args.quick, database_url))

    raw_1, raw_64 = baseline["unary_1"], baseline["unary_64"]
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for backend, figures in authorize.items():
        one, many = figures["1_caller"], figures["64_callers"]
        p50_1, p99_1, qps_64 = one["p50_ms"], one["p99_ms"], many["qps"]
        ratios[backend] = {"p99_1_vs_unary_1_p99": _ratio(p99_1, raw_1["p99_ms"]),
                           "qps_64_vs_unary_64_qps": _ratio(qps_64, raw_64["qps"])}
        targets[f"authorize_{backend}_p50_1_over_raw_ms"] = _target(
            TARGET_P50_OVER_RAW_MS, round(p50_1 - raw_1["p50_ms"], 3), True)
        targets[f"authorize_{backend}_p99_1_over_raw_ms"] = _target(
            TARGET_P99_OVER_RAW_MS, round(p99_1 - raw_1["p99_ms"], 3), True)
        targets[f"authorize_{backend}_qps_64_share_of_raw"] = _target(
            TARGET_QPS_SHARE_64, ratios[backend]["qps_64_vs_unary_64_qps"])
        targets[f"authorize_{backend}_cpu_ms_per_decision_64"] = _target(
            TARGET_CPU_MS_64, many["cpu_ms_per_decision"]["total"], True)
    targets["redis_limiter_pipelined_per_s"] = _target(TARGET_REDIS_PER_S,
                                                       limiter["redis_pipelined"])
    targets["in_process_limiter_per_s"] = _target(TARGET_IN_PROCESS_PER_S,
                                                  limiter["in_process"])
    print(json.dumps({
        "limiter": limiter,
        "authorize_in_process": authorize["in-process"],
        "authorize_redis": authorize["redis"],
        "ledger_reserve": reserve,
        "baseline": baseline,
        "ratios": ratios,
        "targets": targets,
        "database": database_label(BENCH_DATA_DIR),
        "redis": redis_label,
        "machine": _machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
