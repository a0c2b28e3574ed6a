"""Credit leases end to end: replicas sharing one org's lease never spend credit the org does
not have; the ledger taking credit back (READ_ONLY, a negative adjustment) reaches metering
through its outbox, and what is admitted meanwhile is bounded by the lease."""

from __future__ import annotations

import asyncio
import random

from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient
from tests.metering.conftest import CREDIT, Suite
from tests.metering.test_authorize import (
    ALLOW,
    DENY,
    _captured,
    ask,
    in_flight,
    lease_sees,
    sql,
)
from tests.metering.test_ingestion import ACCEPTED, balance


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
