"""Faults to whole processes and to the links between them, under a steady mixed load
(RecordUsage with retries, a long-lived StreamUsage stream that resends what was not
acknowledged, Authorize against a hard Redis quota, purchases paid at the local provider's
checkout), with every invariant checked after each fault:

- SIGKILL of each service in turn (pricing, metering, ledger, notifier, accounts), restarted on
  its port;
- PostgreSQL stopped (fast shutdown: every session cut) and started again, a server of the
  suite's own so that the other tests' server is left alone;
- Redis stopped and started again: hard quotas fail closed (DESIGN §5 / tally.limits: the
  Redis limiter's default outage policy is DENY, so Authorize answers QUOTA_EXCEEDED "limiter
  unavailable, failing closed" and metering reports NOT_SERVING) and Authorize ALLOWs again
  once Redis is back, without a restart;
- the link from metering to the ledger cut (connections reset and refused), then slowed by
  100 ms each way.

Invariants after each: no acknowledged event lost and none charged twice (usage posted equals
what was acknowledged), the ledger sums to zero and VerifyLedger is ok, every account's balance
equals its transfers, no purchase credited twice and every PAID order credited once, the org's
credit never overdrawn (spend within its prepaid limit), no hold left past its ttl, and every
client error retryable or a documented domain reason. One table row per fault.

CI runs the short form (TALLY_CHAOS_FAULT_SECONDS unset: 1 s faults, 0.5 s steady load around
each, SIGKILL of pricing, metering and the ledger); `make chaos` runs it longer and kills the
notifier and accounts too. Figures: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import grpc

from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient
from tests.chaos.processes import OwnPostgres, ProcessSuite
from tests.metering.test_authorize import ask
from tests.metering.test_ingestion import ACCEPTED, DUPLICATE, usage

FAULT_S = float(os.environ.get("TALLY_CHAOS_FAULT_SECONDS", "1.0"))
STEADY_S = max(0.5, FAULT_S / 2)
CREDIT = 1_000_000
FUNDING_CREDITS = 1_000_000
PACKAGE = "individual-20"
PACKAGE_CREDITS = 2100 * CREDIT  # 2,000 credits and 100 bonus
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# Reasons Authorize may answer under load that are the documented contract, not faults.
DOMAIN_REASONS = frozenset({Reason.QUOTA_EXCEEDED.value, Reason.INSUFFICIENT_CREDITS.value,
                            Reason.BUDGET_EXCEEDED.value})
FAIL_CLOSED = "failing closed"
_PAID = "('SUCCEEDED', 'PARTIALLY_REFUNDED', 'REFUNDED')"  # payments.domain.PAID
CARD = {"card_number": "4242 4242 4242 4242", "expiry": "12/39", "cvc": "123",
        "name": "Ada Lovelace"}


@dataclass
class Load:
    """What the clients saw, over the whole run."""

    acked: dict[str, int] = field(default_factory=dict)  # event id -> cost charged
    paid_orders: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # answers no client may see
    answered_at: dict[str, list[float]] = field(default_factory=dict)  # call -> times
    fail_closed_at: list[float] = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: clients pause
    in_flight: int = 0

    async def call(self) -> None:
        """Waits while the load is paused; the caller then counts as in flight."""
        await self.running.wait()
        self.in_flight += 1

    async def pause(self) -> None:
        """Stops new calls and waits (bounded) for those in flight: invariants are checked
        on a quiet system, not against calls answered while the checks read."""
        self.running.clear()
        for _ in range(600):
            if not self.in_flight:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.in_flight} calls never finished")

    def answered(self, call: str) -> None:
        self.answered_at.setdefault(call, []).append(time.monotonic())

    def failed(self, exc: Exception) -> None:
        name = exc.reason.value if isinstance(exc, TallyError) else (
            exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__)
        self.errors[name] += 1
        if name not in RETRYABLE and name not in DOMAIN_REASONS:
            self.bad.append(f"{name}: {exc}")

    def outage_s(self, began: float, ended: float) -> dict[str, float]:
        """Per call, the longest time in [began, ended] that no such call was answered."""
        windows = {}
        for call, times in self.answered_at.items():
            inside = [began, *(t for t in times if began <= t <= ended), ended]
            windows[call] = max(b - a for a, b in itertools.pairwise(inside))
        return windows


async def _record_forever(client: TallyClient, load: Load, worker: int,
                          stop: asyncio.Event) -> None:
    for n in itertools.count():
        if stop.is_set():
            return
        event_id = f"chaos-{worker}-{n}"
        await load.call()
        try:
            await _record_one(client, load, event_id)
        finally:
            load.in_flight -= 1


async def _record_one(client: TallyClient, load: Load, event_id: str) -> None:
    while True:  # a client retries an event until it is acknowledged
        try:
            reply = await client.metering.RecordUsage(
                mpb.RecordUsageRequest(events=[usage(event_id)]), timeout=5)
        except (TallyError, grpc.aio.AioRpcError) as exc:
            load.failed(exc)
            await asyncio.sleep(0.05)  # the client's backoff
            continue
        _acknowledged(load, [usage(event_id)], reply.results, "RecordUsage")
        break


STREAM_BATCH = 5
STREAM_ACK_TIMEOUT_S = 10.0


async def _stream_forever(client: TallyClient, load: Load, stop: asyncio.Event) -> None:
    """One StreamUsage stream at a time, a batch in flight on it; a batch not acknowledged
    (the stream broke, or asked for a reconnect first) is sent again, same ids, on a new
    stream, as a client that must not lose usage does."""
    unacked: list[mpb.UsageEvent] = []
    for n in itertools.count():
        if stop.is_set():
            return
        outbox: asyncio.Queue[mpb.StreamUsageRequest | None] = asyncio.Queue()

        call = client.metering.StreamUsage(_drain(outbox))
        replies = aiter(call)
        try:
            reconnect = False
            while not stop.is_set() and not reconnect:
                await load.call()
                try:
                    if not unacked:
                        unacked = [usage(f"chaos-s{n}-{i}") for i in range(STREAM_BATCH)]
                    batch_id = unacked[0].event_id
                    await outbox.put(mpb.StreamUsageRequest(batch_id=batch_id, events=unacked))
                    while True:  # a reconnect notice may come before the batch's ack
                        reply = await asyncio.wait_for(anext(replies), STREAM_ACK_TIMEOUT_S)
                        reconnect = reconnect or reply.reconnect
                        if reply.batch_id == batch_id:
                            break
                    _acknowledged(load, unacked, reply.results, "StreamUsage")
                    unacked = []
                finally:
                    load.in_flight -= 1
        except (TallyError, grpc.aio.AioRpcError) as exc:
            load.failed(exc)
            await asyncio.sleep(0.05)
        except (TimeoutError, StopAsyncIteration):
            load.errors["StreamUsage ack late or stream ended: resent"] += 1
        finally:
            outbox.put_nowait(None)
            call.cancel()


async def _drain(queue: asyncio.Queue[mpb.StreamUsageRequest | None]
                 ) -> AsyncIterator[mpb.StreamUsageRequest]:
    while (batch := await queue.get()) is not None:
        yield batch


def _acknowledged(load: Load, events: Sequence[mpb.UsageEvent],
                  results: Sequence[mpb.EventResult], call: str) -> None:
    for event, result in zip(events, results, strict=True):
        if result.status not in (ACCEPTED, DUPLICATE):
            load.bad.append(f"event {event.event_id} answered {result}")
            continue
        cost = load.acked.setdefault(event.event_id, result.receipt.cost_micros)
        if cost != result.receipt.cost_micros:
            load.bad.append(f"event {event.event_id} charged {cost}, then "
                            f"{result.receipt.cost_micros}")
    load.answered(call)


async def _authorize_forever(client: TallyClient, load: Load, stop: asyncio.Event) -> None:
    for n in itertools.count():
        if stop.is_set():
            return
        await load.call()
        try:
            reply = await client.metering.Authorize(ask(f"chaos-az-{n}"), timeout=5)
        except (TallyError, grpc.aio.AioRpcError) as exc:
            load.failed(exc)
            await asyncio.sleep(0.05)
            continue
        finally:
            load.in_flight -= 1
        if reply.decision == mpb.DECISION_ALLOW:
            load.answered("Authorize")
            continue
        if reply.deny_reason not in DOMAIN_REASONS:
            load.bad.append(f"Authorize denied {reply.deny_reason}: {reply.message}")
        load.errors[f"DENY {reply.deny_reason}"] += 1
        if FAIL_CLOSED in reply.message:
            load.fail_closed_at.append(time.monotonic())
        await asyncio.sleep(0.05)


async def _purchase_forever(client: TallyClient, load: Load, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as http:
        for n in itertools.count():
            if stop.is_set():
                return
            order_id = f"chaos-po-{n}"
            await load.call()
            try:
                await _purchase_one(client, http, load, order_id, stop)
            finally:
                load.in_flight -= 1
            await asyncio.sleep(0.2)  # a purchase is rare next to usage


async def _purchase_one(client: TallyClient, http: aiohttp.ClientSession, load: Load,
                        order_id: str, stop: asyncio.Event) -> None:
    while not stop.is_set():  # the same order id until it is paid: never two orders
        try:
            order = (await client.ledger.Purchase(lpb.PurchaseRequest(
                payment_order_id=order_id, org_id="acme", package_id=PACKAGE,
                context=common_pb2.RequestContext(actor="user:alice")),
                timeout=5)).order
            async with http.post(f"{order.checkout_url}/pay", data=CARD,
                                 allow_redirects=False,
                                 timeout=aiohttp.ClientTimeout(total=5)) as page:
                if page.status != 303:
                    raise ConnectionError(f"checkout answered {page.status}")
        except (TallyError, grpc.aio.AioRpcError) as exc:
            load.failed(exc)
            await asyncio.sleep(0.1)
            continue
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            load.errors["checkout unreachable"] += 1  # the ledger serves the page
            await asyncio.sleep(0.1)
            continue
        load.paid_orders.add(order_id)
        load.answered("Purchase")
        break


async def _until_credited(conn: asyncpg.Connection, orders: set[str]) -> set[str]:
    """Waits (bounded) until every order paid at checkout is PAID in the ledger (the provider
    redelivers webhooks the ledger missed); returns the ones that never were."""
    missing = set(orders)
    for _ in range(200):
        paid = await conn.fetch("SELECT payment_order_id FROM ledger.payment_orders "
                                f"WHERE state IN {_PAID} AND payment_order_id = ANY($1::text[])",
                                list(missing))
        missing -= {r[0] for r in paid}
        if not missing:
            break
        await asyncio.sleep(0.05)
    return missing


async def _invariants(suite: ProcessSuite, load: Load) -> list[str]:
    broken: list[str] = []
    assert suite.client is not None
    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
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
        if posted != sum(load.acked.values()):
            broken.append(f"acknowledged costs {sum(load.acked.values())}, posted {posted}")
        total = await conn.fetchval("SELECT sum(balance_micros) FROM ledger.accounts")
        if total != 0:
            broken.append(f"the ledger sums to {total}, not zero")
        drift = await conn.fetch(
            "SELECT a.account_id, a.balance_micros, coalesce(c.s, 0) - coalesce(d.s, 0) AS t "
            "FROM ledger.accounts a "
            "LEFT JOIN (SELECT credit_account_id id, sum(amount_micros) s FROM ledger.transfers "
            "           GROUP BY 1) c ON c.id = a.account_id "
            "LEFT JOIN (SELECT debit_account_id id, sum(amount_micros) s FROM ledger.transfers "
            "           GROUP BY 1) d ON d.id = a.account_id "
            "WHERE a.balance_micros <> coalesce(c.s, 0) - coalesce(d.s, 0)")
        broken += [f"account {r[0]} holds {r[1]}, its transfers say {r[2]}" for r in drift]
        twice = await conn.fetch(
            "SELECT payment_order_id, count(*) FROM ledger.transfers WHERE kind = 'PURCHASE' "
            "GROUP BY 1 HAVING count(*) > 1")
        broken += [f"order {r[0]} credited {r[1]} times" for r in twice]
        uncredited = await conn.fetch(
            f"SELECT o.payment_order_id FROM ledger.payment_orders o WHERE o.state IN {_PAID} "
            "AND NOT EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.kind = 'PURCHASE' "
            "                AND t.payment_order_id = o.payment_order_id)")
        broken += [f"order {r[0]} paid but never credited" for r in uncredited]
        missing = await _until_credited(conn, load.paid_orders)
        broken += [f"order {o} paid at checkout, never paid in the ledger" for o in missing]
        overdrawn = await conn.fetchval(
            "SELECT count(*) FROM ledger.accounts WHERE kind = 'ORG_CREDIT' "
            "AND balance_micros - held_micros < 0")
        if overdrawn:
            broken.append(f"{overdrawn} org credit accounts spent past their credit")
        held = await conn.fetchval(
            "SELECT count(*) FROM ledger.reservations WHERE state = 'HELD' "
            "AND expires_at < now() - interval '10 seconds'")
        if held:
            broken.append(f"{held} reservations held past their ttl")
        leases = await conn.fetchval(
            "SELECT count(*) FROM ledger.leases WHERE state = 'OPEN' "
            "AND expires_at < now() - interval '30 seconds'")
        if leases:
            broken.append(f"{leases} credit leases open past their ttl")
    finally:
        await conn.close()
    # wait_for_ready: the client's channel may still be backing off from a restart
    report = await suite.client.ledger.VerifyLedger(lpb.VerifyLedgerRequest(), timeout=30,
                                                    wait_for_ready=True)
    if not report.ok:
        broken.append(f"ledger does not verify: {report.detail}")
    return broken


def _kill(service: str) -> Callable[[ProcessSuite], Awaitable[None]]:
    async def fault(suite: ProcessSuite) -> None:
        await suite.kill_and_restart(service)
    return fault


async def _postgres_down(suite: ProcessSuite) -> None:
    assert suite.postgres is not None
    await suite.postgres.down_for(FAULT_S)


async def _redis_down(suite: ProcessSuite) -> None:
    suite.stop_redis()
    await asyncio.sleep(FAULT_S)
    suite.start_redis()


async def _cut_ledger_link(suite: ProcessSuite) -> None:
    suite.ledger_proxy.cut()
    await asyncio.sleep(FAULT_S)
    suite.ledger_proxy.restore()


async def _slow_ledger_link(suite: ProcessSuite) -> None:
    suite.ledger_proxy.latency_s = 0.1
    await asyncio.sleep(FAULT_S)
    suite.ledger_proxy.restore()


LONG = "TALLY_CHAOS_FAULT_SECONDS" in os.environ
# The short form (CI) kills the services on the load's path; the long form all five.
KILLED = ("pricing", "metering", "ledger", *(("notifier", "accounts") if LONG else ()))
FAULTS: list[tuple[str, Callable[[ProcessSuite], Awaitable[None]]]] = [
    *((f"SIGKILL {s}, restart", _kill(s)) for s in KILLED),
    ("PostgreSQL stopped, started again", _postgres_down),
    ("Redis stopped, started again", _redis_down),
    ("metering -> ledger: cut, refuse", _cut_ledger_link),
    ("metering -> ledger: +100 ms each way", _slow_ledger_link),
]


async def _add_hard_quota(db_url: str) -> None:
    """A hard org quota far above the load: it only ever denies when the limiter fails closed."""
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await conn.execute(
            "INSERT INTO metering.quotas (quota_id, org_id, scope, scope_value, kind, "
            "limit_value, burst, enforcement, long_context_threshold_tokens) "
            "VALUES ('q-chaos', 'acme', 'ORG', '', 'REQUESTS_PER_SECOND', 100000, 0, 'HARD', 0)")
    finally:
        await conn.close()


async def _until_allowed(client: TallyClient) -> float:
    """Waits (bounded) for an Authorize ALLOW; returns when it came."""
    for n in range(400):
        try:
            reply = await client.metering.Authorize(ask(f"chaos-probe-{n}"), timeout=2)
            if reply.decision == mpb.DECISION_ALLOW:
                return time.monotonic()
        except (TallyError, grpc.aio.AioRpcError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("Authorize never allowed again")


async def test_each_fault_under_mixed_load_keeps_every_invariant(tmp_path: Path) -> None:
    # not under tmp_path: pytest removes old numbered tmp dirs, which another pytest run on
    # the machine may do while this server runs
    postgres = OwnPostgres(Path(tempfile.mkdtemp(prefix="tally-chaos-pg-")))
    try:
        db_url = await postgres.start()
        await _add_hard_quota(db_url)
        await _under_mixed_load(postgres, db_url, tmp_path)
    finally:
        await postgres.stop()
        shutil.rmtree(postgres.data_dir, ignore_errors=True)


async def _under_mixed_load(postgres: OwnPostgres, db_url: str, tmp_path: Path) -> None:
    suite = await ProcessSuite.start(db_url, tmp_path, postgres=postgres)
    assert suite.client is not None
    client = suite.client
    rows: list[str] = []
    failures: dict[str, list[str]] = {}
    try:
        await client.ledger.Transfer(lpb.TransferRequest(
            transfer_id="fund-acme", org_id="acme", kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=FUNDING_CREDITS * CREDIT, reason="chaos funding"))
        load = Load()
        load.running.set()
        stop = asyncio.Event()
        workers = [asyncio.create_task(_record_forever(client, load, w, stop)) for w in range(2)]
        workers += [asyncio.create_task(_authorize_forever(client, load, stop)),
                    asyncio.create_task(_purchase_forever(client, load, stop)),
                    asyncio.create_task(_stream_forever(client, load, stop))]
        try:
            for name, fault in FAULTS:
                errors_before = Counter(load.errors)
                bad_before = len(load.bad)
                await asyncio.sleep(STEADY_S)
                fault_at = time.monotonic()
                await fault(suite)
                if fault is _redis_down:
                    # fails closed while Redis is away, and recovers on its own
                    if not [t for t in load.fail_closed_at if t >= fault_at]:
                        load.bad.append("no Authorize failed closed while Redis was down")
                    await _until_allowed(client)
                await asyncio.sleep(STEADY_S)
                outage = load.outage_s(fault_at, time.monotonic())
                await load.pause()
                broken = load.bad[bad_before:] + await _invariants(suite, load)
                errors = load.errors - errors_before
                failures[name] = broken
                shown = ", ".join(f"{k} {v}" for k, v in errors.most_common()) or "none"
                windows = ", ".join(f"{c} {s:.2f} s" for c, s in sorted(outage.items()))
                rows.append(f"| {name} | {FAULT_S:.1f} s | {windows} | {shown} | "
                            f"{'ok' if not broken else 'BROKEN'} |")
                load.running.set()
        finally:
            stop.set()
            load.running.set()
            await asyncio.gather(*workers)
        print("\n| fault | held | longest gap without an answer, per call | errors and denials "
              "| invariants |\n|---|---|---|---|---|\n" + "\n".join(rows) +
              f"\n{len(load.acked)} events acknowledged, {len(load.paid_orders)} purchases paid")
        assert load.acked and load.paid_orders, "the load never got through"
        assert not any(failures.values()), failures
    finally:
        await suite.stop()
