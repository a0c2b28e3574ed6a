"""Credit leases end to end: replicas sharing one org's lease never spend credit the org does
not have; the ledger taking credit back (READ_ONLY, a negative adjustment) reaches metering
through its outbox, and what is admitted meanwhile is bounded by the lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc

from services.metering.adapters import GrpcLeasingLedger
from services.metering.server import MeteringConfig
from services.metering.spend.lease import LeaseSettings
from services.metering.spend.lease_manager import LeaseManager
from services.metering.spend.lease_store import LeaseStore
from tally.cli.suite import health_state
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.ledger.v1 import ledger_pb2_grpc
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient
from tests.metering.conftest import CREDIT, Suite, start_suite
from tests.metering.test_authorize import (
    ALLOW,
    DENY,
    _captured,
    add_budget,
    ask,
    in_flight,
    lease_sees,
    sql,
)
from tests.metering.test_durability import REPO
from tests.metering.test_ingestion import ACCEPTED, balance
from tests.metering.test_management import stamp


async def _lease(suite: Suite, org: str = "acme") -> dict[str, int]:
    rows = await sql(suite, "SELECT granted_micros, returned_micros, charged_micros, "
                     "held_micros FROM metering.credit_leases WHERE org_id = $1", org)
    return dict(rows[0]) if rows else {}


async def test_64_flows_on_3_replicas_sharing_one_lease_spend_exactly_the_balance(
        suite: Suite) -> None:
    await suite.fund("acme", 3)  # a small org: its lease is its whole balance
    replicas = [await suite.start_metering_replica() for _ in range(2)]
    clients: list[TallyClient] = [suite.client, *(c for _, c in replicas)]
    holding = 0
    captures = 0
    estimates: list[int] = []
    charged: list[int] = []
    rng = random.Random(7)

    async def flow(worker: int) -> int:
        nonlocal holding, captures
        client = clients[worker % 3]
        allowed = 0
        for attempt in range(10_000):
            quiet, seen = holding == 0, captures
            answer = await client.metering.Authorize(ask(f"w{worker}-{attempt}"))
            if answer.decision == DENY:
                assert answer.deny_reason == "INSUFFICIENT_CREDITS", answer
                if quiet and seen == captures:
                    return allowed  # nothing held or freed meanwhile: truly no credit left
                await asyncio.sleep(0)
                continue
            holding += 1
            try:
                allowed += 1
                estimates.append(answer.reserved_micros)
                recorded = await client.metering.RecordUsage(mpb.RecordUsageRequest(events=[
                    _captured(f"e-w{worker}-{attempt}", answer.reservation_id,
                              input_tokens=rng.randint(1_000, 2_000),
                              output_tokens=rng.randint(0, 500))]))
                assert recorded.results[0].status == ACCEPTED
                charged.append(recorded.results[0].receipt.cost_micros)
                captures += 1
            finally:
                holding -= 1
        raise AssertionError("never denied")

    try:
        admitted = sum(await asyncio.gather(*(flow(w) for w in range(64))))
    finally:
        for server, client in replicas:
            await client.close()
            await server.stop()
    final = await balance(suite)
    assert final.arrears_micros == 0, "no flow spent credit the org did not have"
    assert final.posted_micros == 3 * CREDIT - sum(charged), "the ledger debited each cost"
    assert final.posted_micros < max(estimates), "no room for one more request left unused"
    assert admitted == len(estimates) and await in_flight(suite) == 0
    assert final.held_micros == final.leased_micros
    verified = await suite.client.ledger.VerifyLedger(lpb.VerifyLedgerRequest())
    assert verified.ok


async def test_read_only_during_a_burst_admits_nothing_once_metering_has_seen_it(
        suite: Suite) -> None:
    await suite.fund("acme", 1_000)
    first = await suite.client.metering.Authorize(ask("warm"))
    assert first.decision == ALLOW
    lease_before = (await balance(suite)).leased_micros
    answers: dict[str, mpb.AuthorizeResponse] = {}
    stop, progress = asyncio.Event(), asyncio.Event()

    async def answered(count: int) -> None:
        while len(answers) < count:
            progress.clear()
            await progress.wait()

    async def burst(worker: int) -> None:
        for attempt in range(100_000):
            if stop.is_set():
                return
            request_id = f"b{worker}-{attempt}"
            answers[request_id] = await suite.client.metering.Authorize(ask(request_id))
            progress.set()

    bursting = [asyncio.create_task(burst(w)) for w in range(16)]
    try:
        await answered(50)
        await suite.client.ledger.SetBillingState(lpb.SetBillingStateRequest(
            request_id="freeze", org_id="acme", state=common_pb2.BILLING_STATE_READ_ONLY,
            cause="chargeback"))
        changed = len(answers)  # requests answered before the ledger's change
        await lease_sees(suite, "READ_ONLY")
        seen = len(answers)
        await answered(seen + 50)
    finally:
        stop.set()
        await asyncio.gather(*bursting)
    ordered = list(answers.values())
    after_seen = ordered[seen + 16:]  # later than any call in flight when metering saw it
    assert after_seen and all(a.decision == DENY and a.deny_reason == "ACCOUNT_READ_ONLY"
                              for a in after_seen)
    admitted_meanwhile = sum(a.reserved_micros for a in ordered[changed:]
                             if a.decision == ALLOW)
    # the bound: what the lease held when the ledger revoked it (all it ever gave back)
    (revoked_hold,) = await sql(suite, "SELECT sum(returned_micros)::bigint AS r "
                                "FROM ledger.leases WHERE org_id = 'acme'")
    assert lease_before > 0 and admitted_meanwhile <= revoked_hold["r"]
    revoked = await balance(suite)
    assert revoked.leased_micros == 0 and revoked.held_micros == 0


async def test_credit_taken_back_during_a_burst_shrinks_the_lease_within_its_bound(
        suite: Suite) -> None:
    await suite.fund("acme", 20)
    first = await suite.client.metering.Authorize(ask("warm"))
    assert first.decision == ALLOW
    before = await balance(suite)
    # an operator takes back all but half a credit: the lease gives back what is missing
    await suite.client.ledger.Adjust(lpb.AdjustRequest(
        adjustment_id="claw-back", org_id="acme",
        amount_micros=-(before.posted_micros - CREDIT // 2), reason="refund outside checkout"))
    after = await balance(suite)
    assert after.posted_micros == CREDIT // 2 and after.held_micros <= after.posted_micros

    async def shrunk() -> bool:
        lease = await _lease(suite)
        return lease["granted_micros"] - lease["returned_micros"] <= CREDIT // 2 + lease[
            "charged_micros"]

    for _ in range(500):
        if await shrunk():
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("metering never saw its lease shrink")
    admitted = 0
    for attempt in range(20):
        answer = await suite.client.metering.Authorize(ask(f"after-{attempt}"))
        if answer.decision == ALLOW:
            admitted += answer.reserved_micros
        else:
            assert answer.deny_reason == "INSUFFICIENT_CREDITS"
    assert first.reserved_micros + admitted <= CREDIT // 2, "nothing beyond what is left"
    with_holds = await in_flight(suite)
    assert with_holds == first.reserved_micros + admitted


async def test_a_replay_of_an_admitted_request_is_the_same_answer_and_holds_once(
        suite: Suite) -> None:
    await suite.fund("acme", 10)
    answers = await asyncio.gather(*(suite.client.metering.Authorize(ask("same"))
                                     for _ in range(8)))
    assert all(a == answers[0] for a in answers) and answers[0].decision == ALLOW
    assert await in_flight(suite) == answers[0].reserved_micros
    try:
        await suite.client.metering.Authorize(ask("same", input_tokens=1))
    except TallyError as reused:
        assert reused.reason is Reason.IDEMPOTENCY_KEY_REUSED
    else:
        raise AssertionError("a different request under the same id was answered")


async def test_sigkill_of_metering_mid_burst_leaves_no_overshoot_and_no_orphaned_hold(
        suite: Suite) -> None:
    await suite.fund("acme", 50)
    await add_budget(suite, "b-hard", 3)
    await suite.metering.stop()  # metering runs as a real process from here on
    port = free_port()
    env = dict(os.environ, TALLY_DATABASE_URL=suite.db_url, TALLY_MIGRATE_ON_START="false",
               TALLY_PRICING_PORT=str(suite.config.pricing_port),
               TALLY_LEDGER_PORT=str(suite.config.ledger_port), TALLY_METERING_PORT=str(port),
               TALLY_METERING_SWEEP_INTERVAL_S="1", TALLY_METERING_POLICY_CACHE_MS="0")
    admitted: dict[str, int] = {}
    for life in range(2):
        process = subprocess.Popen(  # noqa: ASYNC220 - one per life, then awaited
            [sys.executable, "-m", "services.metering"], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await _serving(f"127.0.0.1:{port}")
            async with TallyClient({"metering": f"127.0.0.1:{port}"},
                                   actor="service:test") as client:

                async def burst(worker: int, client: TallyClient = client, life: int = life,
                                process: subprocess.Popen[bytes] = process) -> None:
                    for attempt in range(10_000):
                        request_id = f"l{life}-w{worker}-{attempt}"
                        answer = await client.metering.Authorize(
                            ask(request_id, reservation_ttl_seconds=3))
                        if answer.decision == DENY:
                            assert answer.deny_reason == "BUDGET_EXCEEDED", answer
                            return
                        admitted[request_id] = answer.reserved_micros
                        await _budget_consistent(suite, 3 * CREDIT)
                        if life == 0 and len(admitted) >= 5:
                            process.send_signal(signal.SIGKILL)  # mid-burst

                with contextlib.suppress(TallyError, grpc.aio.AioRpcError):
                    await asyncio.gather(*(burst(w) for w in range(16)))
            if life == 1:
                # holds nobody captured lapse at their ttl: the budget and the lease free them
                async def freed() -> bool:
                    rows = await sql(suite, "SELECT reserved_micros FROM metering.budget_usage")
                    return await in_flight(suite) == 0 and sum(
                        r["reserved_micros"] for r in rows) == 0

                await _until(freed, "the lapsed holds were freed")
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL if life == 0 else signal.SIGTERM)
            process.wait(timeout=30)
    await _budget_consistent(suite, 3 * CREDIT)  # the hard budget held across the crash
    assert admitted
    final = await balance(suite)
    assert final.arrears_micros == 0 and final.held_micros == final.leased_micros
    verified = await suite.client.ledger.VerifyLedger(lpb.VerifyLedgerRequest())
    assert verified.ok, "the ledger sums to zero and its chains hold"


async def _budget_consistent(suite: Suite, limit: int) -> None:
    """In one snapshot: what the budget holds is exactly what live authorizations hold, and
    spent plus held never passes the limit (holds that lapsed at their ttl free their room,
    so the sum of everything ever admitted may)."""
    (row,) = await sql(suite, "SELECT (SELECT coalesce(sum(spent_micros + reserved_micros), 0) "
                       "FROM metering.budget_usage)::bigint AS used, "
                       "(SELECT coalesce(sum(reserved_micros), 0) FROM metering.budget_usage"
                       ")::bigint AS reserved, (SELECT coalesce(sum(reserved_micros), 0) "
                       "FROM metering.authorizations WHERE state IN ('HELD', 'PENDING') "
                       "AND decision <> 'DENY')::bigint AS held")
    assert row["reserved"] == row["held"], "the budget holds exactly the live holds"
    assert row["used"] <= limit, "spent plus held never passes a hard budget"


async def _serving(address: str) -> None:
    async def up() -> bool:
        return await health_state(address, 0.5) == "SERVING"

    await _until(up, f"metering at {address} came up")


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Waits for a condition another process brings about (bounded); fails naming it."""
    for _ in range(600):
        if await condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


async def test_sigkill_of_the_ledger_mid_burst_keeps_leases_exact_and_authorize_going(
        db_url: str) -> None:
    # small leases, so the burst extends them again and again
    suite = await start_suite(db_url, MeteringConfig(
        policy_cache_ms=0, lease_floor_micros=CREDIT, lease_window_s=1))
    ledger: subprocess.Popen[bytes] | None = None
    try:
        await suite.fund("acme", 100)
        await add_budget(suite, "b-hard", 20)
        await suite.ledger.stop()  # the ledger runs as a real process from here on
        env = dict(os.environ, TALLY_DATABASE_URL=suite.db_url, TALLY_MIGRATE_ON_START="false",
                   TALLY_PRICING_PORT=str(suite.config.pricing_port),
                   TALLY_LEDGER_PORT=str(suite.config.ledger_port),
                   TALLY_LEDGER_WEBHOOK_PORT="0", TALLY_LEDGER_CHECKOUT_PORT="0")
        address = suite.config.address_of("ledger")
        admitted: dict[str, int] = {}
        during_outage = {"allowed": 0, "unavailable": 0}
        outage = asyncio.Event()
        for life in range(2):
            ledger = subprocess.Popen(  # noqa: ASYNC220 - one per life, then awaited
                [sys.executable, "-m", "services.ledger"], cwd=REPO, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await _serving(address)
            outage.clear()

            async def burst(worker: int, life: int = life,
                            ledger: subprocess.Popen[bytes] = ledger) -> None:
                attempt = 0
                while attempt < 10_000:
                    try:
                        answer = await suite.client.metering.Authorize(
                            ask(f"l{life}-w{worker}-{attempt}", reservation_ttl_seconds=3))
                    except TallyError as exc:
                        # the lease ran short while the ledger is down (or its channel is
                        # reconnecting): a client retries the same request id
                        assert exc.reason is Reason.UNAVAILABLE, exc
                        if outage.is_set():
                            during_outage["unavailable"] += 1
                            if during_outage["unavailable"] > 20:
                                return
                        await asyncio.sleep(0.05)
                        continue
                    attempt += 1
                    if answer.decision == DENY:
                        assert answer.deny_reason == "BUDGET_EXCEEDED", answer
                        return
                    admitted[answer.reservation_id] = answer.reserved_micros
                    await _budget_consistent(suite, 20 * CREDIT)
                    if outage.is_set():
                        during_outage["allowed"] += 1
                    if life == 0 and len(admitted) >= 30 and not outage.is_set():
                        outage.set()
                        ledger.send_signal(signal.SIGKILL)  # leases being extended meanwhile

            await asyncio.gather(*(burst(w) for w in range(16)))
            if life == 0:
                ledger.wait(timeout=30)
        assert during_outage["allowed"] > 0, "Authorize kept going on its leases"

        async def lapsed() -> bool:
            rows = await sql(suite, "SELECT coalesce(sum(reserved_micros), 0)::bigint AS r "
                             "FROM metering.budget_usage")
            return await in_flight(suite) == 0 and rows[0]["r"] == 0

        await _until(lapsed, "the holds nobody captured lapsed")
        await _budget_consistent(suite, 20 * CREDIT)  # the hard budget held
        final = await balance(suite)
        assert final.arrears_micros == 0 and final.posted_micros == 100 * CREDIT
        assert final.held_micros == final.leased_micros, "the ledger holds exactly the leases"
        assert (await suite.client.ledger.VerifyLedger(lpb.VerifyLedgerRequest())).ok
    finally:
        if ledger is not None and ledger.poll() is None:
            ledger.send_signal(signal.SIGTERM)
            ledger.wait(timeout=30)
        await suite.client.close()
        for server in (suite.metering, suite.pricing):
            await server.stop()


async def test_an_idle_lease_gives_its_free_credit_back_to_the_org(suite: Suite) -> None:
    await suite.fund("acme", 100)
    pool = await db.create_pool(suite.db_url, max_size=2)
    channel = grpc.aio.insecure_channel(suite.config.address_of("ledger"))
    try:
        manager = LeaseManager(LeaseStore(pool), GrpcLeasingLedger(
            ledger_pb2_grpc.LedgerServiceStub(channel)), LeaseSettings())
        lease, added = await manager.ensure("acme", CREDIT)
        assert added > 0 and (await balance(suite)).leased_micros == added
        answer = await suite.client.metering.Authorize(ask("one"))  # holds part of it
        assert answer.decision == ALLOW
        lease = await manager.store.lease_of("acme")
        assert lease is not None and lease.held_micros == answer.reserved_micros
        await manager.give_back(lease, lease.free_micros)
        after = await balance(suite)
        assert after.leased_micros == answer.reserved_micros, "only what requests hold stays"
        assert after.available_micros == 100 * CREDIT - answer.reserved_micros
        assert (await manager.store.lease_of("acme")).free_micros == 0  # type: ignore[union-attr]
    finally:
        await channel.close()
        await pool.close()


async def _burst_through(suite: Suite, change: Callable[[], Awaitable[None]],
                         seen: Callable[[], Awaitable[bool]], refusal: str
                         ) -> tuple[list[mpb.AuthorizeResponse], int, int]:
    """16 workers authorize without pause; after 50 answers `change` runs in the ledger, then
    the burst goes on until metering has seen it (`seen`) and 50 more are answered. Returns
    the answers in order, how many were answered before the change and before it was seen;
    the refusals are all `refusal`."""
    answers: dict[str, mpb.AuthorizeResponse] = {}
    stop, progress = asyncio.Event(), asyncio.Event()

    async def answered(count: int) -> None:
        while len(answers) < count:
            progress.clear()
            await progress.wait()

    async def burst(worker: int) -> None:
        for attempt in range(100_000):
            if stop.is_set():
                return
            request_id = f"b{worker}-{attempt}"
            answers[request_id] = await suite.client.metering.Authorize(ask(request_id))
            progress.set()

    bursting = [asyncio.create_task(burst(w)) for w in range(16)]
    try:
        await answered(50)
        changed = len(answers)  # requests answered before the ledger's change
        await change()
        await _until(seen, "metering saw the ledger take its lease's credit back")
        seen_at = len(answers)
        await answered(seen_at + 50)
    finally:
        stop.set()
        await asyncio.gather(*bursting)
    ordered = list(answers.values())
    assert all(a.deny_reason == refusal for a in ordered if a.decision == DENY)
    return ordered, changed, seen_at


async def _shrink_seen(suite: Suite) -> bool:
    """Metering's lease of acme counts what the ledger took back from it."""
    rows = await sql(suite, "SELECT m.returned_micros >= l.returned_micros AS seen "
                     "FROM metering.credit_leases m JOIN ledger.leases l "
                     "ON l.lease_id = m.lease_id WHERE m.org_id = 'acme' "
                     "AND l.returned_micros > 0")
    return bool(rows and rows[0]["seen"])


async def _check_reclaim_bound(suite: Suite, ordered: list[mpb.AuthorizeResponse],
                               changed: int, seen_at: int) -> None:
    after_seen = ordered[seen_at + 16:]  # later than any call in flight when metering saw it
    assert after_seen and all(a.decision == DENY for a in after_seen)
    admitted_meanwhile = sum(a.reserved_micros for a in ordered[changed:]
                             if a.decision == ALLOW)
    # the bound: what the ledger took back from the lease (its hold when it took it back)
    (returned,) = await sql(suite, "SELECT sum(returned_micros)::bigint AS r "
                            "FROM ledger.leases WHERE org_id = 'acme'")
    assert returned["r"] > 0 and admitted_meanwhile <= returned["r"]
    final = await balance(suite)
    assert final.held_micros == final.leased_micros
    assert (await suite.client.ledger.VerifyLedger(lpb.VerifyLedgerRequest())).ok


async def test_a_refund_during_a_burst_admits_nothing_once_metering_has_seen_it(
        suite: Suite) -> None:
    clerk, cfo = (common_pb2.RequestContext(actor=a) for a in ("user:clerk", "user:cfo"))
    await suite.client.ledger.RecordManualPayment(lpb.RecordManualPaymentRequest(
        payment_order_id="wire-1", org_id="acme", amount_minor=100_000, currency="USD",
        credits_micros=1_000 * CREDIT, reference="SEPA 2026-0042", context=clerk,
        method=lpb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER))
    await suite.client.ledger.ApproveManualPayment(lpb.ApproveManualPaymentRequest(
        payment_order_id="wire-1", context=cfo))
    assert (await suite.client.metering.Authorize(ask("warm"))).decision == ALLOW

    async def refund() -> None:  # all that is unspent: the lease must give its hold back
        await suite.client.ledger.Refund(lpb.RefundRequest(
            refund_id="r-1", payment_order_id="wire-1", reason="customer asked",
            context=common_pb2.RequestContext(actor="user:carol-support")))

    ordered, changed, seen_at = await _burst_through(suite, refund, lambda: _shrink_seen(suite),
                                                     "INSUFFICIENT_CREDITS")
    await _check_reclaim_bound(suite, ordered, changed, seen_at)


async def test_grant_expiry_during_a_burst_admits_nothing_once_metering_has_seen_it(
        suite: Suite) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    await suite.client.ledger.Transfer(lpb.TransferRequest(
        transfer_id="promo", org_id="acme", kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=1_000 * CREDIT, reason="trial credit", grant=lpb.GrantSpec(
            grant_kind=lpb.GRANT_KIND_PROMOTIONAL, expires_at=stamp(expires))))
    assert (await suite.client.metering.Authorize(ask("warm"))).decision == ALLOW

    async def expire() -> None:  # the day passes: the ledger's expiry sweeper takes it
        await sql(suite, "UPDATE ledger.grants SET expires_at = now() WHERE org_id = 'acme'")

    ordered, changed, seen_at = await _burst_through(suite, expire, lambda: _shrink_seen(suite),
                                                     "INSUFFICIENT_CREDITS")
    await _check_reclaim_bound(suite, ordered, changed, seen_at)
    expired = await sql(suite, "SELECT count(*) AS n FROM ledger.transfers "
                        "WHERE org_id = 'acme' AND kind = 'EXPIRY'")
    assert expired[0]["n"] >= 1
