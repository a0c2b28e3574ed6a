"""Faults under a steady mixed load (RecordUsage with retries, Authorize), and the invariants
after each: no acknowledged event lost, none charged twice, the ledger verifies and sums to
zero, no reservation held past its ttl, every client error retryable (UNAVAILABLE /
DEADLINE_EXCEEDED) or a documented domain reason. Prints a table per fault.

The short form runs in CI; `make chaos` runs it longer (TALLY_CHAOS_FAULT_SECONDS). Faults
are made by the TCP fault proxy between the services and the shared PostgreSQL (cut and
refuse, drop every connection once, add latency); the machine's servers are never stopped.
SIGKILL of each service in turn, Redis stopped and started, and faults between services are
in test_process_faults.py (the services as real processes).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite, start_suite, stop_suite
from tests.metering.test_authorize import ask
from tests.metering.test_ingestion import ACCEPTED, DUPLICATE, usage
from tests.support.fault_proxy import FaultProxy

FAULT_S = float(os.environ.get("TALLY_CHAOS_FAULT_SECONDS", "1.5"))
STEADY_S = FAULT_S  # load before and after each fault
FUNDING_CREDITS = 1_000_000
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# Reasons Authorize may answer under load that are the documented contract, not faults.
DOMAIN_REASONS = frozenset({Reason.QUOTA_EXCEEDED.value, Reason.INSUFFICIENT_CREDITS.value,
                            Reason.BUDGET_EXCEEDED.value})


@dataclass
class Load:
    """What the clients saw."""

    acked: dict[str, int] = field(default_factory=dict)  # event id -> cost charged
    errors: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # errors no client may see
    successes: int = 0
    answered_at: list[float] = field(default_factory=list)

    def answered(self) -> None:
        self.successes += 1
        self.answered_at.append(time.monotonic())

    def outage_window_s(self) -> float:
        """The longest time no call was answered: what a client saw of the fault."""
        times = sorted(self.answered_at)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def failed(self, exc: Exception) -> None:
        name = exc.reason.value if isinstance(exc, TallyError) else (
            exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__)
        self.errors[name] += 1
        if name not in RETRYABLE and name not in DOMAIN_REASONS:
            self.bad.append(f"{name}: {exc}")


async def _record_forever(suite: Suite, load: Load, worker: int, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        event_id = f"chaos-{worker}-{n}"
        while True:  # a client retries an event until it is acknowledged
            try:
                reply = await suite.client.metering.RecordUsage(
                    mpb.RecordUsageRequest(events=[usage(event_id)]), timeout=5)
            except (TallyError, grpc.aio.AioRpcError) as exc:
                load.failed(exc)
                await asyncio.sleep(0.05)  # the client's backoff
                continue
            result = reply.results[0]
            if result.status not in (ACCEPTED, DUPLICATE):
                load.bad.append(f"event {event_id} answered {result}")
            else:
                load.acked.setdefault(event_id, result.receipt.cost_micros)
                load.answered()
            break


async def _authorize_forever(suite: Suite, load: Load, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        try:
            await suite.client.metering.Authorize(ask(f"chaos-az-{n}"), timeout=5)
            load.answered()
        except (TallyError, grpc.aio.AioRpcError) as exc:
            load.failed(exc)
            await asyncio.sleep(0.05)


async def _cut(proxy: FaultProxy) -> None:
    proxy.cut()
    await asyncio.sleep(FAULT_S)
    proxy.restore()


async def _drop(proxy: FaultProxy) -> None:
    proxy.drop()
    await asyncio.sleep(FAULT_S)


async def _latency(proxy: FaultProxy) -> None:
    proxy.latency_s = 0.1
    await asyncio.sleep(FAULT_S)
    proxy.restore()


FAULTS: list[tuple[str, Callable[[FaultProxy], Awaitable[None]]]] = [
    ("postgres: cut, refuse new connections", _cut),
    ("postgres: drop every connection", _drop),
    ("postgres: +100 ms each way", _latency),
]


async def _invariants(suite: Suite, db_url: str, load: Load) -> list[str]:
    broken = list(load.bad)
    conn = await asyncpg.connect(db_url)  # straight to the database, not through the proxy
    try:
        acked = list(load.acked)
        recorded = await conn.fetchval(
            "SELECT count(*) FROM metering.usage_events WHERE org_id = 'acme' "
            "AND event_id = ANY($1::text[])", acked)
        if recorded != len(acked):
            broken.append(f"acknowledged {len(acked)} events, recorded {recorded}")
        posted = await conn.fetchval(
            "SELECT coalesce(sum(amount_micros), 0) FROM ledger.transfers "
            "WHERE org_id = 'acme' AND kind = 'USAGE'")
        charged = sum(load.acked.values())
        if posted != charged:
            broken.append(f"acknowledged costs {charged}, usage posted {posted}")
        held = await conn.fetchval(
            "SELECT count(*) FROM ledger.reservations WHERE state = 'HELD' "
            "AND expires_at < now() - interval '10 seconds'")
        if held:
            broken.append(f"{held} reservations held past their ttl")
    finally:
        await conn.close()
    report = await suite.client.ledger.VerifyLedger(lpb.VerifyLedgerRequest(org_id="acme"))
    if not report.ok:
        broken.append(f"ledger does not verify: {report.detail}")
    return broken


async def _settle(suite: Suite) -> None:
    """Waits (bounded) until the services answer again after a fault."""
    for _ in range(200):
        try:
            await suite.client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="acme"),
                                                 timeout=2)
            return
        except (TallyError, grpc.aio.AioRpcError):
            await asyncio.sleep(0.1)
    raise AssertionError("the services never answered again")


@pytest.mark.parametrize(("name", "fault"), FAULTS, ids=[f[0].split(":")[1].strip().split()[0]
                                                         for f in FAULTS])
async def test_faults_under_load_keep_every_invariant(
        db_url: str, name: str, fault: Callable[[FaultProxy], Awaitable[None]]) -> None:
    proxy = await FaultProxy.for_url(db_url)
    suite = await start_suite(proxy.rewrite(db_url))
    try:
        await suite.fund("acme", FUNDING_CREDITS)
        load = Load()
        stop = asyncio.Event()
        workers = [asyncio.create_task(_record_forever(suite, load, w, stop)) for w in range(3)]
        workers.append(asyncio.create_task(_authorize_forever(suite, load, stop)))
        await asyncio.sleep(STEADY_S)
        await fault(proxy)
        await asyncio.sleep(STEADY_S)
        stop.set()
        await asyncio.gather(*workers)
        await _settle(suite)
        broken = await _invariants(suite, db_url, load)
        window = load.outage_window_s()
        errors = ", ".join(f"{k} {v}" for k, v in load.errors.most_common()) or "none"
        print(f"\n| fault | held | client-visible outage | errors by status | load | "
              f"invariants |\n| {name} | {FAULT_S:.1f} s | {window:.2f} s | {errors} | "
              f"{len(load.acked)} acked, {load.successes} answered | "
              f"{'ok' if not broken else 'BROKEN'} |")
        assert load.acked, "no event was acknowledged at all"
        assert not broken, broken
    finally:
        proxy.restore()
        await stop_suite(suite)
        await proxy.close()
