"""Ingestion end to end: events streamed, rated, stored, debited and acknowledged.

What it measures (``python -m bench.ingest [--quick]`` prints one JSON object):

- ``streams_<S>_batch_<B>_orgs_<O>``: ``S`` concurrent ``StreamUsage`` clients sending batches
  of ``B`` events (S in 1, 8; B in 100, 1,000) spread over ``O`` orgs (1: one hot org; 1,000).
  ``events_per_s`` counts only acknowledged events, each acknowledged only after its usage row
  and its ledger debit are committed. Each client keeps at most 4 batches unacknowledged (as a
  client that resends unacked batches must); ``ack_p50_ms`` / ``ack_p99_ms`` are per batch,
  from the moment it is handed to gRPC to its ack, beside ``ack_p99_bound_ms`` (1.5 x events
  in flight / throughput: what queueing alone explains). ``cpu_us_per_event``: CPU
  microseconds (utime + stime from /proc) per acknowledged event of this client, each
  metering process, the ledger, pricing and the PostgreSQL backends of the run's database,
  and their ``total``; then the bench waits for the roll-ups to catch up (so the CPU includes
  them): ``rollup_lag_s`` is how far behind they were at the last ack, ``rollup_catch_up_s``
  how long they took.
- ``metering_rss_mb``: each metering worker's resident set after the runs (``VmRSS``) and its
  peak (``VmHWM``); ``--metering-workers N`` (default 2) processes share metering's port.
- ``baseline``: the raw gRPC client-stream figure of :mod:`bench.baseline` (1,000-event
  messages) measured in the same run, and ``ratio`` of the best end-to-end figure to it.
- ``targets``: >= 50,000 events/s end to end on 8 streams x 1,000 events x 1,000 orgs, <= 40 us
  of CPU per event over all processes, ack p99 within its queueing bound, RSS < 300 MB.

The three services run as real processes (``python -m services.<name>``), exactly as
``tally up`` starts them, on a fresh ``tally_bench_ingest_<pid>`` database
(``TALLY_DATABASE_URL``, else the embedded PostgreSQL under ``.tally/bench``) that is dropped at
the end. Events spread over the shape's funded orgs, four models of the default catalog (one
through an alias), online and batch, with a team label; every event id is fresh.
``--profile-metering FILE`` runs metering under cProfile and writes the pstats to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc

from bench.authorize import redis_server
from bench.baseline import _machine, nearest_rank, run_baseline, run_in_loop
from bench.harness import (
    CpuMeter,
    bench_database,
    database_label,
    database_server_url,
    postgres_backends,
)
from tally.cli.suite import health_state
from tally.common.v1 import common_pb2
from tally.kit import db, infra
from tally.kit.log import configure_logging
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.metering.v1 import metering_pb2_grpc
from tally.sdk.client import TallyClient

BENCH_DATA_DIR: Final = Path(".tally/bench")
REPO: Final = Path(__file__).resolve().parents[1]

ORGS: Final = 1000
MODELS: Final = ("gpt-4.1-mini", "gpt-4.1", "claude-sonnet", "gemini-2.5-flash")
FUNDING_MICROS: Final = 10**15
SHAPES: Final = tuple((streams, batch, orgs) for orgs in (1000, 1) for streams in (1, 8)
                      for batch in (100, 1000))
"""(streams, events per batch, orgs) of each figure."""
WINDOW: Final = 4
"""Unacknowledged batches a client keeps in flight per stream (the server's default too)."""
SERVICES: Final = ("pricing", "ledger", "metering")
"""What the suite runs, in start order (each after the one it calls at start-up)."""

TARGET_EVENTS_PER_S: Final = 50_000
TARGET_SHAPE: Final = "streams_8_batch_1000_orgs_1000"
TARGET_CPU_US_PER_EVENT: Final = 40.0
TARGET_BASELINE_SHARE: Final = 0.10
TARGET_RSS_MB: Final = 300

_START_TIMEOUT_S: Final = 60.0
_STOP_TIMEOUT_S: Final = 30.0
_ROLLUP_WAIT_S: Final = 120.0


# ---------------------------------------------------------------------------- the suite


@contextlib.contextmanager
def running_suite(database_url: str, profile_path: str | None, metering_workers: int = 1,
                  redis_url: str = "") -> Iterator[dict[str, Any]]:
    """pricing, ledger and metering as processes on free ports; yields addresses and pids
    (metering's: each of its `metering_workers` processes, which share quotas in Redis)."""
    ports = {name: infra.free_port() for name in SERVICES}
    workers = {"TALLY_METERING_WORKERS": str(metering_workers)}
    if metering_workers > 1:
        workers |= {"TALLY_METERING_LIMITER": "redis", "TALLY_REDIS_URL": redis_url}
    env = dict(os.environ, TALLY_DATABASE_URL=database_url, TALLY_MIGRATE_ON_START="false",
               TALLY_LOG_LEVEL="warning", **workers,
               **{f"TALLY_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SERVICES:
            command = [sys.executable, "-m", f"services.{name}"]
            if name == "metering" and profile_path:
                command = [sys.executable, "-m", "cProfile", "-o", profile_path, "-m",
                           "services.metering"]
            processes[name] = subprocess.Popen(command, cwd=REPO, env=env,
                                               stdout=subprocess.DEVNULL)
            _wait_serving(name, f"127.0.0.1:{ports[name]}", processes[name])
        yield {"addresses": {n: f"127.0.0.1:{p}" for n, p in ports.items()},
               "pids": {n: _with_workers(p.pid) for n, p in processes.items()}}
    finally:
        for process in reversed(processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_serving(name: str, address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} during start-up")
        if run_in_loop(health_state(address, 0.5)) == "SERVING":
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} not SERVING within {_START_TIMEOUT_S}s")


def _with_workers(pid: int) -> list[int]:
    """A service's process and its worker processes (its children), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = children.read_text().split() if children.exists() else []
    return [pid, *(int(child) for child in found)]


def _rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss": fields.get("VmRSS", 0.0), "peak": fields.get("VmHWM", 0.0)}


# ---------------------------------------------------------------------------- the load


def _event(index: int, tag: str, at: datetime, orgs: int = ORGS) -> mpb.UsageEvent:
    """A chat-shaped event; sizes vary so rating and roll-ups do real work."""
    event = mpb.UsageEvent(
        event_id=f"{tag}-{index}", model=MODELS[index % len(MODELS)],
        operation=mpb.OPERATION_CHAT,
        mode=common_pb2.USAGE_MODE_BATCH if index % 5 == 0 else common_pb2.USAGE_MODE_ONLINE,
        context=common_pb2.RequestContext(
            org_id=f"org-{index % orgs}", project_id=f"p-{index % 7}", user_id=f"u-{index % 50}",
            labels={"team": ("search", "chat", "ops")[index % 3]}),
        quantities=[
            common_pb2.MeterQuantity(meter=common_pb2.METER_INPUT_TOKENS,
                                     quantity=200 + index % 4000),
            common_pb2.MeterQuantity(meter=common_pb2.METER_OUTPUT_TOKENS,
                                     quantity=50 + index % 900),
        ])
    event.occurred_at.FromDatetime(at)
    return event


async def _fund(client: TallyClient) -> None:
    for start in range(0, ORGS, 500):
        await client.ledger.TransferBatch(lpb.TransferBatchRequest(
            batch_id=f"bench-fund-{start}", context=common_pb2.RequestContext(),
            transfers=[lpb.TransferRequest(
                transfer_id=f"bench-fund-{org}", org_id=f"org-{org}",
                kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=FUNDING_MICROS,
                reason="ingest benchmark funding") for org in range(start, start + 500)]))


async def _one_stream(stub: metering_pb2_grpc.MeteringServiceAsyncStub,
                      batches: list[list[mpb.UsageEvent]], latencies_ns: list[int]) -> int:
    sent_at: dict[str, int] = {}
    # Like a real client that must resend what is unacknowledged: at most WINDOW batches out.
    window = asyncio.Semaphore(WINDOW)

    async def requests() -> AsyncIterator[mpb.StreamUsageRequest]:
        for number, events in enumerate(batches):
            await window.acquire()
            sent_at[str(number)] = time.perf_counter_ns()
            yield mpb.StreamUsageRequest(batch_id=str(number), events=events)

    acked = 0
    async for ack in stub.StreamUsage(requests()):
        if ack.reconnect:
            continue
        window.release()
        latencies_ns.append(time.perf_counter_ns() - sent_at[ack.batch_id])
        for result in ack.results:
            if result.status != mpb.EVENT_STATUS_ACCEPTED:
                raise RuntimeError(f"event {result.event_id} not accepted: {result}")
        acked += len(ack.results)
    return acked


def process_groups(pids: dict[str, list[int]], backends: list[int]) -> dict[str, list[int]]:
    """The processes whose CPU a figure reports: this client, each service process (every
    metering worker on its own) and the PostgreSQL backends."""
    groups = {"client": [os.getpid()]}
    for name, service_pids in pids.items():
        if len(service_pids) == 1:
            groups[name] = service_pids
        else:
            groups.update({f"{name}_{i}": [pid] for i, pid in enumerate(service_pids)})
    groups["postgres"] = backends
    return groups


async def measure_shape(address: str, streams: int, batch: int, events: int, *,
                        orgs: int = ORGS, pids: dict[str, list[int]] | None = None,
                        database_url: str = "") -> dict[str, Any]:
    """`events` fresh events over `streams` streams in batches of `batch`, over `orgs` orgs;
    with `pids`, the CPU each process spent per event."""
    tag = f"s{streams}b{batch}o{orgs}-{time.time_ns():x}"
    at = datetime.now(UTC) - timedelta(minutes=5)
    all_events = [_event(i, tag, at, orgs) for i in range(events)]
    per_stream = [all_events[i::streams] for i in range(streams)]
    latencies: list[int] = []
    meter = None
    if pids is not None:
        meter = CpuMeter(process_groups(pids, await postgres_backends(database_url)))
        meter.start()
    # a channel (a connection) per stream, as separate clients have: the kernel spreads
    # connections over metering's worker processes
    # (a local subchannel pool each: channels to one address otherwise share one connection)
    channels = [grpc.aio.insecure_channel(address, options=[
        ("grpc.use_local_subchannel_pool", 1)]) for _ in range(streams)]
    try:
        started = time.perf_counter()
        acked = await asyncio.gather(*(
            _one_stream(metering_pb2_grpc.MeteringServiceStub(channel),
                        [mine[i:i + batch] for i in range(0, len(mine), batch)], latencies)
            for channel, mine in zip(channels, per_stream, strict=True)))
        seconds = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    rollup: dict[str, float] = {}
    if database_url:
        rollup = await _rollup_catch_up(database_url)
    latencies.sort()
    total = sum(acked)
    rate = total / seconds
    figure: dict[str, Any] = {
        "streams": streams, "batch_events": batch, "orgs": orgs, "events": total,
        "seconds": round(seconds, 3), "events_per_s": round(rate),
        "ack_p50_ms": round(nearest_rank(latencies, 50) / 1e6, 2),
        "ack_p99_ms": round(nearest_rank(latencies, 99) / 1e6, 2),
        "ack_p99_bound_ms": round(1.5 * min(streams * WINDOW * batch, total) / rate * 1000, 2)}
    figure.update(rollup)
    if meter is not None:
        meter.stop()
        figure["cpu_us_per_event"] = meter.micros_per(total)
    return figure


async def _rollup_catch_up(database_url: str) -> dict[str, float]:
    """How far the roll-ups were behind when the last event was acknowledged (the age of the
    oldest batch not rolled up), and how long they took to catch up — waited for, so the CPU
    figures include rolling up every event measured."""
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    lag_sql = ("SELECT extract(epoch FROM now() - min(created_at))::float8 "
               "FROM metering.ledger_batches WHERE rolled_up_at IS NULL")
    try:
        lag = float(await conn.fetchval(lag_sql) or 0.0)
        started = time.perf_counter()
        while time.perf_counter() - started < _ROLLUP_WAIT_S:
            if await conn.fetchval(lag_sql) is None:
                break
            await asyncio.sleep(0.05)  # polled: the bench has no roll-up notification
        return {"rollup_lag_s": round(lag, 3),
                "rollup_catch_up_s": round(time.perf_counter() - started, 3)}
    finally:
        await conn.close()


async def measure_ingest(addresses: dict[str, str], quick: bool,
                         pids: dict[str, list[int]] | None = None, database_url: str = "",
                         only: str = "") -> dict[str, Any]:
    """Every shape, after funding; a warm-up first so start-up costs are not measured."""
    client = TallyClient(addresses, actor="service:bench")
    try:
        await _fund(client)
    finally:
        await client.close()
    await measure_shape(addresses["metering"], 8, 1000, 8_000)  # warm-up
    count = 8_000 if quick else 40_000
    results = {}
    for streams, batch, orgs in SHAPES:
        if only and only != f"streams_{streams}_batch_{batch}_orgs_{orgs}":
            continue
        results[f"streams_{streams}_batch_{batch}_orgs_{orgs}"] = await measure_shape(
            addresses["metering"], streams, batch, count, orgs=orgs, pids=pids,
            database_url=database_url)
    return results


def targets(ingest: dict[str, Any], baseline_events_per_s: float, rss_mb: float
            ) -> dict[str, Any]:
    """The issue's targets with pass/fail (throughput and CPU on the target shape)."""
    best = max(v["events_per_s"] for v in ingest.values())
    share = best / baseline_events_per_s if baseline_events_per_s else 0.0
    if TARGET_SHAPE not in ingest:  # --shape measured another one
        return {}
    shape = ingest[TARGET_SHAPE]
    cpu = shape.get("cpu_us_per_event", {}).get("total")
    slow_acks = [name for name, v in ingest.items() if v["ack_p99_ms"] > v["ack_p99_bound_ms"]]
    return {
        "events_per_s": {"shape": TARGET_SHAPE, "target": TARGET_EVENTS_PER_S,
                         "measured": shape["events_per_s"],
                         "pass": shape["events_per_s"] >= TARGET_EVENTS_PER_S},
        "cpu_us_per_event": {"shape": TARGET_SHAPE, "target": TARGET_CPU_US_PER_EVENT,
                             "measured": cpu,
                             "pass": cpu is not None and cpu <= TARGET_CPU_US_PER_EVENT},
        "ack_p99_within_queueing_bound": {"shapes_over": slow_acks, "pass": not slow_acks},
        "share_of_raw_baseline": {"target": TARGET_BASELINE_SHARE, "measured": round(share, 4),
                                  "pass": share >= TARGET_BASELINE_SHARE},
        "metering_rss_mb": {"target": TARGET_RSS_MB, "measured": rss_mb,
                            "pass": rss_mb < TARGET_RSS_MB},
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: print the ingestion figures, the baseline and the targets as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4,000 events per shape")
    parser.add_argument("--profile-metering", metavar="FILE",
                        help="run metering under cProfile and write the pstats to FILE")
    parser.add_argument("--metering-workers", type=int, default=2, metavar="N",
                        help="metering processes on its port (TALLY_METERING_WORKERS; "
                             "default 2, one per core of the target machine)")
    parser.add_argument("--shape", default="", metavar="NAME",
                        help=f"measure only this shape (e.g. {TARGET_SHAPE})")
    args = parser.parse_args(argv)
    configure_logging("bench", "warning")
    server_url = database_server_url(BENCH_DATA_DIR)
    baseline = run_baseline(quick=args.quick)
    profile = str(Path(args.profile_metering).resolve()) if args.profile_metering else None
    with (redis_server() as (redis_url, _),
          bench_database(server_url, "tally_bench_ingest", SERVICES) as url,
          running_suite(url, profile, args.metering_workers, redis_url) as suite):
        ingest = run_in_loop(measure_ingest(suite["addresses"], args.quick,
                                            suite["pids"], url, args.shape))
        rss = {f"worker_{i}": _rss_mb(pid) for i, pid in enumerate(suite["pids"]["metering"])}
    raw = baseline["client_stream_1000"]["events_per_s"]
    best = max(v["events_per_s"] for v in ingest.values())
    result = {
        **ingest,
        "metering_rss_mb": rss,
        "metering_workers": args.metering_workers,
        "baseline": {"client_stream_1000_events_per_s": raw},
        "ratio": round(best / raw, 4) if raw else None,
        "targets": targets(ingest, raw, max(r["peak"] for r in rss.values())),
        "quick": args.quick,
        "database": database_label(BENCH_DATA_DIR),
        "machine": _machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
