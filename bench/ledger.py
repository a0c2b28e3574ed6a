"""Ledger throughput: PostUsageBatch and Transfer against a real ledger server and PostgreSQL.

What it measures (``python -m bench.ledger [--quick]`` prints one JSON object):

- ``post_usage_batch_hot_account``: batches of 1,000 usage items all for ONE org (the hot
  account), sequentially and from 4 concurrent callers; items/s and batch latency.
- ``post_usage_batch_1000_accounts``: batches of 1,000 items spread over 1,000 orgs.
- ``post_org_debits_1000_orgs``: batches of 1,000 org debits (``org_debits``, what metering
  sends: one debit per org per batch), sequentially and from 4 concurrent callers, with the
  CPU microseconds per debit of each process (``cpu_us_per_item``: this client, the ledger
  server, its PostgreSQL backends) read from /proc.
- ``transfer_1_caller`` / ``transfer_64_callers``: single ``Transfer`` calls (USAGE debits of
  1 micro-credit); 64 callers each on its own org, and 64 callers all on one hot org.
- ``baseline``: the raw gRPC figures of :mod:`bench.baseline`, measured in the same run, and
  ``ratios`` of the ledger figures to them (compare those across runs, not absolutes).
- ``targets``: the issue's throughput targets with pass/fail.

The database is ``TALLY_DATABASE_URL`` if set, else the embedded PostgreSQL under
``.tally/bench``; a fresh ``tally_bench_<pid>`` database is created and migrated for the run
and dropped at the end. The ledger server runs in a ``spawn``ed child process (uvloop when
available), like the baseline server, so client and server never share an event loop.
``--profile-server FILE`` writes a cProfile (pstats) of the whole server process to FILE.

Every org is funded with far more credit than the run can spend, so no figure includes
arrears handling; every request id is fresh, so no figure includes idempotent replays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, TypedDict

from bench.baseline import (
    BaselineResult,
    UnaryStats,
    _machine,
    child_server,
    measure_unary,
    run_baseline,
    run_in_loop,
)
from bench.harness import (
    CpuMeter,
    bench_database,
    database_label,
    database_server_url,
    postgres_backends,
    serve_in_child,
)
from services.ledger.server import build
from tally.common.v1 import common_pb2
from tally.kit.config import load_kit_config
from tally.kit.log import configure_logging
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient

BENCH_DATA_DIR: Final = Path(".tally/bench")

BATCH_ITEMS: Final = 1000
ACCOUNTS: Final = 1000
CALLERS: Final = 64
USAGE_CALLERS: Final = 4
ITEM_COST_MICROS: Final = 1_000
# Far more than any run spends (at most ~10^6 items of 10^3 micros on the hot org).
FUNDING_MICROS: Final = 10**15

TARGET_USAGE_ITEMS_PER_S: Final = 50_000
TARGET_HOT_DEBITS_PER_S: Final = 20_000

_ACTOR: Final = "user:bench-operator"
_METERING: Final = common_pb2.RequestContext(actor="svc:metering")

# Deadlines keep a wedged server from hanging the benchmark forever.
_CALL_DEADLINE_S: Final = 120.0
_CONNECT_TIMEOUT_S: Final = 10.0
_SERVER_START_TIMEOUT_S: Final = 60.0
_SERVER_STOP_TIMEOUT_S: Final = 15.0


# How much each figure measures in a full run; --quick divides every count by 10.
FULL_COUNTS: Final[dict[str, int]] = {
    "hot_batches": 100,
    "hot_batches_concurrent": 200,
    "spread_batches": 30,
    "spread_batches_concurrent": 60,
    "org_batches": 50,
    "org_batches_concurrent": 100,
    "transfer_1": 2000,
    "transfer_64": 4000,
}


class BatchStats(TypedDict):
    """Throughput and latency of PostUsageBatch calls."""

    batches: int
    items: int
    concurrency: int
    seconds: float
    items_per_s: float
    p50_ms: float
    p99_ms: float


class CallStats(TypedDict):
    """Throughput and latency of unary Transfer calls."""

    calls: int
    concurrency: int
    orgs: int
    seconds: float
    qps: float
    p50_ms: float
    p99_ms: float


# ---------------------------------------------------------------------------- server


def _serve(conn: Connection, database_url: str, profile_path: str | None) -> None:
    """Child-process entry point: serve the ledger until the parent says stop or goes away."""
    config = dataclasses.replace(load_kit_config({}), database_url=database_url,
                                 migrate_on_start=False, db_pool_size=8)
    serve_in_child(conn, "ledger", build, config, grace_seconds=5.0, profile_path=profile_path)


@contextlib.contextmanager
def ledger_server(database_url: str, profile_path: str | None = None) -> Iterator[str]:
    """Run the ledger in a spawned child process; yield its ``host:port`` target."""
    with child_server("ledger", _serve, (database_url, profile_path),
                      start_timeout_s=_SERVER_START_TIMEOUT_S,
                      stop_timeout_s=_SERVER_STOP_TIMEOUT_S) as target:
        yield target


# ---------------------------------------------------------------------------- requests


def _usage_batch(batch_id: str, orgs: Sequence[str]) -> pb.PostUsageBatchRequest:
    """One batch, item i for ``orgs[i]``; shaped like what metering sends (label, time)."""
    request = pb.PostUsageBatchRequest(batch_id=batch_id, context=_METERING)
    for i, org in enumerate(orgs):
        item = request.items.add(event_id=f"{batch_id}:{i}", org_id=org,
                                 cost_micros=ITEM_COST_MICROS, price_book_version=1)
        item.labels["feature"] = "bench"
        item.occurred_at.FromSeconds(1_767_225_600)
    return request


def _org_debit_batch(batch_id: str, orgs: Sequence[str]) -> pb.PostUsageBatchRequest:
    """One batch of org debits, one per org (each as if 3 events of ITEM_COST_MICROS)."""
    request = pb.PostUsageBatchRequest(batch_id=batch_id, context=_METERING)
    add = request.org_debits.add
    for org in orgs:
        add(org_id=org, amount_micros=3 * ITEM_COST_MICROS, event_count=3,
            events_digest="0" * 32)
    return request


def _grant(transfer_id: str, org: str) -> pb.TransferRequest:
    return pb.TransferRequest(transfer_id=transfer_id, org_id=org,
                              kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
                              amount_micros=FUNDING_MICROS, reason="benchmark funding")


async def _fund(tally: TallyClient, orgs: Sequence[str], tag: str) -> None:
    """PROMOTIONAL_GRANT to every org, in TransferBatch calls of at most 1000."""
    for start in range(0, len(orgs), 1000):
        chunk = orgs[start:start + 1000]
        await tally.ledger.TransferBatch(
            pb.TransferBatchRequest(
                batch_id=f"fund:{tag}:{start}", context=common_pb2.RequestContext(),
                transfers=[_grant(f"fund:{tag}:{org}", org) for org in chunk]),
            timeout=_CALL_DEADLINE_S)


async def _posted(tally: TallyClient, org: str) -> int:
    reply = await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id=org),
                                          timeout=_CALL_DEADLINE_S)
    posted: int = reply.balance.posted_micros
    return posted


# ---------------------------------------------------------------------------- measuring


async def _timed(call: Callable[[], Awaitable[object]], calls: int, concurrency: int
                 ) -> tuple[UnaryStats, float]:
    started = time.perf_counter()
    stats = await measure_unary(call, calls, concurrency)
    return stats, round(time.perf_counter() - started, 4)


async def _usage_figure(tally: TallyClient, tag: str, orgs: Sequence[str], batches: int,
                        concurrency: int) -> BatchStats:
    """``batches`` PostUsageBatch calls (built before the clock starts) by ``concurrency``."""
    requests = iter([_usage_batch(f"{tag}:{n}", orgs) for n in range(batches)])

    async def post_one() -> None:
        reply = await tally.ledger.PostUsageBatch(next(requests), timeout=_CALL_DEADLINE_S)
        if len(reply.results) != len(orgs):
            raise RuntimeError(f"{len(reply.results)} results for {len(orgs)} items")

    stats, seconds = await _timed(post_one, batches, concurrency)
    items = batches * len(orgs)
    return {"batches": batches, "items": items, "concurrency": concurrency,
            "seconds": seconds, "items_per_s": round(items / seconds, 1),
            "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"]}


async def _org_debit_figure(tally: TallyClient, tag: str, orgs: Sequence[str], batches: int,
                            concurrency: int, database_url: str) -> dict[str, Any]:
    """``batches`` PostUsageBatch calls of org debits by ``concurrency``, with the CPU each
    process spent per org debit."""
    requests = iter([_org_debit_batch(f"{tag}:{n}", orgs) for n in range(batches)])

    async def post_one() -> None:
        reply = await tally.ledger.PostUsageBatch(next(requests), timeout=_CALL_DEADLINE_S)
        if len(reply.org_results) != len(orgs) or any(
                r.debited_micros != 3 * ITEM_COST_MICROS for r in reply.org_results):
            raise RuntimeError(f"unexpected org results, e.g. {reply.org_results[:1]}")

    servers = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
    meter = CpuMeter({"client": [os.getpid()], "ledger": servers,
                      "postgres": await postgres_backends(database_url)})
    meter.start()
    stats, seconds = await _timed(post_one, batches, concurrency)
    meter.stop()
    items = batches * len(orgs)
    return {"batches": batches, "items": items, "concurrency": concurrency,
            "seconds": seconds, "items_per_s": round(items / seconds, 1),
            "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
            "cpu_us_per_item": meter.micros_per(items)}


async def _check_first_batch(tally: TallyClient, tag: str, orgs: Sequence[str]) -> None:
    """A broken server must fail loudly, not benchmark fast: one checked, untimed batch."""
    reply = await tally.ledger.PostUsageBatch(_usage_batch(tag, orgs), timeout=_CALL_DEADLINE_S)
    wrong = [r for r in reply.results
             if r.debited_micros != ITEM_COST_MICROS or r.arrears_micros or r.is_duplicate]
    if len(reply.results) != len(orgs) or wrong:
        raise RuntimeError(f"unexpected usage results, e.g. {wrong[:1]}")


_caller_org: contextvars.ContextVar[str] = contextvars.ContextVar("caller_org")


async def _transfer_figure(tally: TallyClient, tag: str, orgs: Sequence[str], calls: int,
                           concurrency: int) -> CallStats:
    """``calls`` USAGE Transfers of 1 micro; each caller task sticks to one org of ``orgs``.

    The org is kept in a context variable, which lives as long as the caller's task, so
    with as many orgs as callers no two concurrent callers share an org.
    """
    ids = itertools.count()
    next_org = itertools.cycle(orgs)
    warmup = max(calls // 10, concurrency)

    async def transfer_one() -> None:
        org = _caller_org.get(None)
        if org is None:
            org = next(next_org)
            _caller_org.set(org)
        await tally.ledger.Transfer(
            pb.TransferRequest(transfer_id=f"{tag}:{next(ids)}", org_id=org,
                               kind=pb.TRANSFER_KIND_USAGE, amount_micros=1,
                               context=_METERING),
            timeout=_CALL_DEADLINE_S)

    # Untimed warm-up through the same code path (connection pool, statement caches).
    await measure_unary(transfer_one, warmup, concurrency)
    stats, seconds = await _timed(transfer_one, calls, concurrency)
    return {"calls": calls, "concurrency": concurrency, "orgs": len(orgs),
            "seconds": seconds, "qps": stats["qps"], "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"]}


async def measure_ledger(target: str, database_url: str, quick: bool = False
                         ) -> dict[str, Any]:
    """Fund the orgs, then measure every ledger figure against a running ledger server."""
    scale = 10 if quick else 1
    counts = {key: max(value // scale, 1) for key, value in FULL_COUNTS.items()}
    hot = "bench-hot"
    spread = [f"bench-org-{i:04d}" for i in range(ACCOUNTS)]
    callers = [f"bench-caller-{i:02d}" for i in range(CALLERS)]
    transfer_hot = "bench-transfer-hot"

    async with TallyClient({"ledger": target}, actor=_ACTOR) as tally:
        await asyncio.wait_for(tally.channel("ledger").channel_ready(), _CONNECT_TIMEOUT_S)
        await tally.ledger.Transfer(_grant("fund:hot", hot), timeout=_CALL_DEADLINE_S)
        await _fund(tally, spread, "spread")
        await _fund(tally, [*callers, transfer_hot], "callers")

        # -- PostUsageBatch, one hot org
        hot_items = [hot] * BATCH_ITEMS
        await _check_first_batch(tally, "usage-hot:check", hot_items)
        await _usage_figure(tally, "usage-hot:warmup", hot_items, max(10 // scale, 2), 1)
        hot_seq = await _usage_figure(tally, "usage-hot:seq", hot_items,
                                      counts["hot_batches"], 1)
        hot_conc = await _usage_figure(tally, "usage-hot:conc", hot_items,
                                       counts["hot_batches_concurrent"], USAGE_CALLERS)
        hot_batches_posted = 1 + max(10 // scale, 2) + counts["hot_batches"] + counts[
            "hot_batches_concurrent"]
        expected = FUNDING_MICROS - hot_batches_posted * BATCH_ITEMS * ITEM_COST_MICROS
        if (posted := await _posted(tally, hot)) != expected:
            raise RuntimeError(f"hot org holds {posted}, expected {expected}")

        # -- PostUsageBatch, 1000 orgs per batch
        await _check_first_batch(tally, "usage-spread:check", spread)
        await _usage_figure(tally, "usage-spread:warmup", spread, max(3 // scale, 1), 1)
        spread_seq = await _usage_figure(tally, "usage-spread:seq", spread,
                                         counts["spread_batches"], 1)
        spread_conc = await _usage_figure(tally, "usage-spread:conc", spread,
                                          counts["spread_batches_concurrent"], USAGE_CALLERS)

        # -- PostUsageBatch of org debits, 1000 orgs per batch
        await _org_debit_figure(tally, "orgs:warmup", spread, max(5 // scale, 2), 1,
                                database_url)
        org_seq = await _org_debit_figure(tally, "orgs:seq", spread, counts["org_batches"], 1,
                                          database_url)
        org_conc = await _org_debit_figure(tally, "orgs:conc", spread,
                                           counts["org_batches_concurrent"], USAGE_CALLERS,
                                           database_url)

        # -- Transfer
        transfer_1 = await _transfer_figure(tally, "xfer-1", callers[:1], counts["transfer_1"], 1)
        transfer_64 = await _transfer_figure(tally, "xfer-64", callers, counts["transfer_64"],
                                             CALLERS)
        transfer_64_hot = await _transfer_figure(tally, "xfer-64-hot", [transfer_hot],
                                                 counts["transfer_64"], CALLERS)
        warmup_64 = max(counts["transfer_64"] // 10, CALLERS)
        expected = FUNDING_MICROS - counts["transfer_64"] - warmup_64
        if (posted := await _posted(tally, transfer_hot)) != expected:
            raise RuntimeError(f"hot transfer org holds {posted}, expected {expected}")

    return {
        "post_usage_batch_hot_account": {
            "items_per_batch": BATCH_ITEMS, "orgs": 1,
            "sequential": hot_seq, "concurrent_4": hot_conc,
        },
        "post_usage_batch_1000_accounts": {
            "items_per_batch": BATCH_ITEMS, "orgs": ACCOUNTS,
            "sequential": spread_seq, "concurrent_4": spread_conc,
        },
        "post_org_debits_1000_orgs": {
            "orgs_per_batch": ACCOUNTS, "sequential": org_seq, "concurrent_4": org_conc,
        },
        "transfer_1_caller": transfer_1,
        "transfer_64_callers": {"distinct_orgs": transfer_64, "hot_org": transfer_64_hot},
    }


# ---------------------------------------------------------------------------- report


def _ratio(numerator: float, denominator: float) -> float | None:
    # 4 significant digits: some ratios (usage items/s over raw stream events/s) are tiny.
    return float(f"{numerator / denominator:.4g}") if denominator else None


def ratios(ledger: dict[str, Any], baseline: BaselineResult) -> dict[str, float | None]:
    """Ledger figures over the raw gRPC figures of the same run (latency: higher is worse)."""
    t1, t64 = ledger["transfer_1_caller"], ledger["transfer_64_callers"]
    u1, u64 = baseline["unary_1"], baseline["unary_64"]
    stream = baseline["client_stream_1000"]["events_per_s"]
    hot, spread = ledger["post_usage_batch_hot_account"], ledger["post_usage_batch_1000_accounts"]
    return {
        "transfer_1_p50_over_raw_unary_1_p50": _ratio(t1["p50_ms"], u1["p50_ms"]),
        "transfer_1_p99_over_raw_unary_1_p99": _ratio(t1["p99_ms"], u1["p99_ms"]),
        "transfer_1_qps_over_raw_unary_1_qps": _ratio(t1["qps"], u1["qps"]),
        "transfer_64_distinct_p99_over_raw_unary_64_p99": _ratio(
            t64["distinct_orgs"]["p99_ms"], u64["p99_ms"]),
        "transfer_64_distinct_qps_over_raw_unary_64_qps": _ratio(
            t64["distinct_orgs"]["qps"], u64["qps"]),
        "transfer_64_hot_qps_over_raw_unary_64_qps": _ratio(t64["hot_org"]["qps"], u64["qps"]),
        "usage_hot_sequential_items_per_s_over_raw_stream_events_per_s": _ratio(
            hot["sequential"]["items_per_s"], stream),
        "usage_1000_accounts_sequential_items_per_s_over_raw_stream_events_per_s": _ratio(
            spread["sequential"]["items_per_s"], stream),
    }


def targets(ledger: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: ``pass`` on the best shape, ``pass_every_shape`` on the worst."""
    hot, spread = ledger["post_usage_batch_hot_account"], ledger["post_usage_batch_1000_accounts"]
    usage = {
        "hot_account_sequential": hot["sequential"]["items_per_s"],
        "hot_account_4_callers": hot["concurrent_4"]["items_per_s"],
        "1000_accounts_sequential": spread["sequential"]["items_per_s"],
        "1000_accounts_4_callers": spread["concurrent_4"]["items_per_s"],
    }
    debits = {key: value for key, value in usage.items() if key.startswith("hot_account")}
    orgs = ledger["post_org_debits_1000_orgs"]
    org_debits = {"sequential": orgs["sequential"]["items_per_s"],
                  "4_callers": orgs["concurrent_4"]["items_per_s"]}

    def verdict(target: int, measured: dict[str, float], what: str) -> dict[str, Any]:
        return {"what": what, "target": target, "measured": measured,
                "pass": max(measured.values()) >= target,
                "pass_every_shape": min(measured.values()) >= target}

    return {
        "usage_items_per_s": verdict(
            TARGET_USAGE_ITEMS_PER_S, usage, "usage items/s through PostUsageBatch"),
        "org_debits_per_s": verdict(
            TARGET_USAGE_ITEMS_PER_S, org_debits,
            "org debits/s through PostUsageBatch, 1,000 orgs per batch"),
        "hot_account_debits_per_s": verdict(
            TARGET_HOT_DEBITS_PER_S, debits,
            "debits/s on one hot account (PostUsageBatch items for one org)"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: print the ledger figures, the baseline and their ratios as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="counts / 10, for CI smoke")
    parser.add_argument("--profile-server", metavar="FILE",
                        help="write a cProfile (pstats) of the ledger server process to FILE")
    args = parser.parse_args(argv)
    # Logs to stderr (structlog's default would print them to stdout, into the JSON).
    configure_logging("bench", "warning")

    server_url = database_server_url(BENCH_DATA_DIR)
    baseline = run_baseline(quick=args.quick)
    profile = str(Path(args.profile_server).resolve()) if args.profile_server else None
    with (bench_database(server_url, "tally_bench", ["ledger"]) as database_url,
          ledger_server(database_url, profile) as target):
        ledger = run_in_loop(measure_ledger(target, database_url, quick=args.quick))

    result: dict[str, Any] = {
        **ledger,
        "baseline": baseline,
        "ratios": ratios(ledger, baseline),
        "targets": targets(ledger),
        "quick": args.quick,
        "database": database_label(BENCH_DATA_DIR),
        "machine": _machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
