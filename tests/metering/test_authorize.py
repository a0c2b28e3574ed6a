"""Authorize through the real services: ledger holds, budgets that parallel requests cannot
overshoot, downgrades, guard rails, alarms once per period, holds freed at their ttl."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.metering.spend.store import SpendStore
from tally.cli import authorize as authorize_cli
from tally.common.v1 import common_pb2
from tally.kit import db, metrics
from tally.kit.errors import Reason, TallyError
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import CREDIT, Suite, start_suite, stop_suite
from tests.metering.test_ingestion import ACCEPTED, balance, usage

ALLOW = mpb.DECISION_ALLOW
DOWNGRADE = mpb.DECISION_DOWNGRADE
DENY = mpb.DECISION_DENY


def ask(request_id: str, org: str = "acme", *, model: str = "gpt-4.1-mini",
        input_tokens: int = 2_000, max_output: int = 500, **fields: object
        ) -> mpb.AuthorizeRequest:
    context = common_pb2.RequestContext(
        org_id=org, **{k: v for k, v in fields.items() if k in ("project_id", "labels")})
    return mpb.AuthorizeRequest(
        request_id=request_id, context=context, model=model, operation=mpb.OPERATION_CHAT,
        estimated_input_tokens=input_tokens, max_output_tokens=max_output,
        **{k: v for k, v in fields.items() if k not in ("project_id", "labels")})


async def sql(suite: Suite, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def add_budget(suite: Suite, budget_id: str, limit_credits: float, *,
                     enforcement: str = "HARD", scope: str = "ORG", scope_value: str = "",
                     downgrade_at: int = 0, thresholds: tuple[int, ...] = (50, 80, 100)) -> None:
    # Budgets are made with SQL here; the management RPCs have their own tests.
    await sql(suite, "INSERT INTO metering.budgets (budget_id, org_id, name, scope, scope_value, "
              "period, limit_micros, alarm_thresholds_percent, enforcement, "
              "downgrade_at_percent) VALUES ($1, 'acme', $1, $2, $3, 'MONTHLY', $4, $5, $6, $7)",
              budget_id, scope, scope_value, int(limit_credits * CREDIT), list(thresholds),
              enforcement, downgrade_at)


async def in_flight(suite: Suite, org: str = "acme") -> int:
    """What requests hold against the org's credit lease (metering's figure: the ledger shows
    the whole lease as held, and each request's hold lives in metering)."""
    rows = await sql(suite, "SELECT held_micros FROM metering.credit_leases WHERE org_id = $1",
                     org)
    return rows[0]["held_micros"] if rows else 0


async def lease_sees(suite: Suite, billing_state: str, org: str = "acme") -> None:
    """Waits until metering's lease of the org knows the billing state the ledger set (its
    outbox stream carries it; bounded, no fixed sleep)."""
    for _ in range(500):
        rows = await sql(suite, "SELECT billing_state FROM metering.credit_leases "
                         "WHERE org_id = $1", org)
        if rows and rows[0]["billing_state"] == billing_state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"metering never saw {org} turn {billing_state}")


async def budget_usage(suite: Suite, budget_id: str) -> tuple[int, int]:
    rows = await sql(suite, "SELECT spent_micros, reserved_micros FROM metering.budget_usage "
                     "WHERE budget_id = $1", budget_id)
    return (rows[0]["spent_micros"], rows[0]["reserved_micros"]) if rows else (0, 0)


async def test_allow_holds_the_worst_case_in_the_ledger_and_a_replay_is_the_same(
    suite: Suite,
) -> None:
    await suite.fund("acme", 100)
    first = await suite.client.metering.Authorize(ask("r-1"))
    assert first.decision == ALLOW
    assert first.model == "gpt-4.1-mini" and first.reserved_micros > 0
    assert first.reservation_id and first.reservation_expires_at.seconds > 0
    after = await balance(suite)
    assert await in_flight(suite) == first.reserved_micros
    assert after.held_micros == after.leased_micros >= first.reserved_micros
    again = await suite.client.metering.Authorize(ask("r-1"))
    assert again == first
    assert await in_flight(suite) == first.reserved_micros
    with pytest.raises(TallyError) as caught:
        await suite.client.metering.Authorize(ask("r-1", input_tokens=9))
    assert caught.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    # the usage event captures the hold: held goes to zero, the actual cost is posted
    recorded = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[
        _captured("u-1", first.reservation_id, input_tokens=1_000, output_tokens=100)]))
    cost = recorded.results[0].receipt.cost_micros
    assert 0 < cost <= first.reserved_micros
    final = await balance(suite)
    assert (await in_flight(suite), final.posted_micros) == (0, 100 * CREDIT - cost)
    assert final.held_micros == final.leased_micros


def _captured(event_id: str, reservation_id: str, *, input_tokens: int, output_tokens: int,
              model: str = "gpt-4.1-mini") -> mpb.UsageEvent:
    # now, not the ingestion tests' hour ago: budgets are monthly and must see it this month
    event = usage(event_id, model=model, input_tokens=input_tokens, output_tokens=output_tokens,
                  at=datetime.now(UTC))
    event.reservation_id = reservation_id
    return event


async def test_bad_requests_and_unknown_models_name_the_field(suite: Suite) -> None:
    for request, field in ((ask(""), "request_id"), (ask("x", org=""), "context.org_id"),
                           (ask("x", model=""), "model"),
                           (ask("x", input_tokens=-1), "estimated_input_tokens"),
                           (ask("x", reservation_ttl_seconds=7200), "reservation_ttl_seconds"),
                           (ask("x", model="no-such-model"), "model")):
        with pytest.raises(TallyError) as caught:
            await suite.client.metering.Authorize(request)
        assert caught.value.field == field or caught.value.message.startswith(field), (
            field, caught.value)


async def test_without_credit_the_answer_is_deny_and_nothing_stays_held(suite: Suite) -> None:
    await suite.fund("acme", 1)
    await add_budget(suite, "b-org", 1_000)
    reply = await suite.client.metering.Authorize(ask("big", input_tokens=5_000_000))
    assert (reply.decision, reply.deny_reason) == (DENY, "INSUFFICIENT_CREDITS")
    assert not reply.reservation_id
    assert await budget_usage(suite, "b-org") == (0, 0)
    assert await in_flight(suite) == 0
    held = await balance(suite)  # the org's credit lease: its whole (small) balance
    assert held.held_micros == held.leased_micros == CREDIT
    assert await suite.client.metering.Authorize(ask("big", input_tokens=5_000_000)) == reply


async def test_a_deny_for_credit_shows_the_budget_and_the_balance_headroom(suite: Suite) -> None:
    await suite.fund("acme", 1)
    await add_budget(suite, "b-room", 1_000)
    small = await suite.client.metering.Authorize(ask("small"))
    assert small.decision == ALLOW
    reply = await suite.client.metering.Authorize(ask("big", input_tokens=5_000_000))
    assert (reply.decision, reply.deny_reason) == (DENY, "INSUFFICIENT_CREDITS")
    room = {h.scope: (h.unit, h.limit, h.remaining) for h in reply.headroom}
    left = CREDIT - small.reserved_micros  # all the org can spend: nothing else is held
    budget_left = 1_000 * CREDIT - small.reserved_micros
    assert room == {"budget:b-room": ("micros", 1_000 * CREDIT, budget_left),
                    "balance": ("micros", left, left)}
    assert f"{left} available" in reply.message
    # the replay is the same answer, headroom included
    assert await suite.client.metering.Authorize(ask("big", input_tokens=5_000_000)) == reply


async def test_the_balance_headroom_is_what_the_org_can_spend_not_the_lease(
        suite: Suite) -> None:
    await suite.fund("acme", 1_000)
    answers = [await suite.client.metering.Authorize(ask(f"r-{i}")) for i in range(3)]
    leased = (await balance(suite)).leased_micros
    assert 0 < leased < 1_000 * CREDIT  # the lease is a slice of the balance
    holding = 0
    for answer in answers:
        holding += answer.reserved_micros
        room = {h.scope: (h.limit, h.remaining) for h in answer.headroom}
        assert room["balance"] == (1_000 * CREDIT - holding + answer.reserved_micros,
                                   1_000 * CREDIT - holding)


async def test_guard_rails_deny_long_contexts_and_large_uploads(suite: Suite) -> None:
    await suite.fund("acme", 100)
    await sql(suite, "INSERT INTO metering.spend_policies (org_id, max_context_tokens, "
              "max_upload_bytes) VALUES ('acme', 8000, 1000000)")
    long = await suite.client.metering.Authorize(ask("long", context_tokens=9_000))
    assert (long.decision, long.deny_reason) == (DENY, "CONTEXT_TOO_LONG")
    upload = await suite.client.metering.Authorize(ask("upload", upload_bytes=2_000_000))
    assert (upload.decision, upload.deny_reason) == (DENY, "UPLOAD_TOO_LARGE")
    fine = await suite.client.metering.Authorize(ask("fine", context_tokens=8_000))
    assert fine.decision == ALLOW


async def test_a_soft_budget_past_its_threshold_downgrades_to_the_cheaper_model(
    suite: Suite,
) -> None:
    await suite.fund("acme", 1_000)
    await add_budget(suite, "b-soft", 10, enforcement="SOFT_DOWNGRADE", downgrade_at=50)
    cheap = await suite.client.metering.Authorize(ask("before", model="gpt-4.1"))
    assert cheap.decision == ALLOW and cheap.model == "gpt-4.1"
    await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[
        _captured("spend", cheap.reservation_id, input_tokens=24_000, output_tokens=0,
                  model="gpt-4.1")]))
    spent, _ = await budget_usage(suite, "b-soft")
    assert spent >= 5 * CREDIT  # past the 50 % threshold
    after = await suite.client.metering.Authorize(ask("after", model="gpt-4.1"))
    assert after.decision == DOWNGRADE
    assert after.model == "gpt-4.1-mini"
    assert 0 < after.reserved_micros < cheap.reserved_micros
    assert await in_flight(suite) == after.reserved_micros


async def test_64_parallel_flows_never_overshoot_a_hard_budget_and_leave_no_room_unused(
    suite: Suite,
) -> None:
    await suite.fund("acme", 10_000)
    limit = 30 * CREDIT
    await add_budget(suite, "b-hard", limit / CREDIT)
    holding = 0  # flows between an ALLOW and the usage event that captures it
    captures = 0  # usage events recorded so far (each may free part of its hold)
    estimates: list[int] = []
    rng = random.Random(11)

    async def flow(worker: int) -> int:
        nonlocal holding, captures
        allowed = 0
        for attempt in range(10_000):
            quiet = holding == 0
            seen = captures
            answer = await suite.client.metering.Authorize(
                ask(f"w{worker}-{attempt}", input_tokens=20_000, max_output=2_000))
            if answer.decision == DENY:
                assert answer.deny_reason == "BUDGET_EXCEEDED", answer
                if quiet and seen == captures:
                    # nothing was held when we asked and nothing was freed since: the budget
                    # truly has no room for this request (later holders keep trying)
                    return allowed
                await asyncio.sleep(0)
                continue
            holding += 1
            try:
                allowed += 1
                estimates.append(answer.reserved_micros)
                actual = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[
                    _captured(f"e-w{worker}-{attempt}", answer.reservation_id,
                              input_tokens=rng.randint(10_000, 20_000),
                              output_tokens=rng.randint(0, 2_000))]))
                assert actual.results[0].status == ACCEPTED
                captures += 1
            finally:
                holding -= 1
        raise AssertionError("never denied")

    admitted = sum(await asyncio.gather(*(flow(w) for w in range(64))))
    spent, reserved = await budget_usage(suite, "b-hard")
    debited = 10_000 * CREDIT - (await balance(suite)).posted_micros
    assert reserved == 0
    assert spent == debited, "the budget counts exactly what the ledger debited"
    assert spent <= limit, "a hard budget is never overshot"
    assert limit - spent < max(estimates), "room for one more request was never left unused"
    assert admitted == len(estimates)


async def test_each_alarm_threshold_fires_once_per_period_even_across_a_restart(
    db_url: str,
) -> None:
    suite = await start_suite(db_url)
    try:
        await suite.fund("acme", 1_000)
        await add_budget(suite, "b-alarm", 1, enforcement="ALERT_ONLY")

        async def spend(event_id: str, tokens: int) -> None:
            reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
                events=[usage(event_id, model="gpt-4.1", input_tokens=tokens,
                              output_tokens=0, at=datetime.now(UTC))]))
            assert reply.results[0].status == ACCEPTED

        async def fired() -> list[int]:
            rows = await sql(suite, "SELECT threshold_percent FROM metering.budget_alarms "
                             "WHERE budget_id = 'b-alarm' ORDER BY 1")
            return [r["threshold_percent"] for r in rows]

        await spend("a-1", 2_400)   # 250 credits per 1M input tokens on gpt-4.1: 0.6 credit
        assert await fired() == [50]
        await spend("a-2", 40)
        assert await fired() == [50]
        await stop_suite(suite)
        suite = await start_suite(db_url)
        await spend("a-3", 800)   # 0.81 credit
        assert await fired() == [50, 80]
        await spend("a-4", 800)   # 1.01 credits: ALERT_ONLY never blocks
        assert await fired() == [50, 80, 100]
        outbox = await sql(suite, "SELECT type, attributes FROM metering.outbox ORDER BY id")
        assert [r["type"] for r in outbox] == ["BUDGET_THRESHOLD"] * 3
        # the notifier's view: sealed in order, resumable after any sequence
        streamed: list[mpb.OutboxEvent] = []
        async for message in suite.client.metering.StreamEvents(mpb.StreamEventsRequest(
                types=[mpb.OUTBOX_EVENT_TYPE_BUDGET_THRESHOLD])):
            streamed += message.events
            if len(streamed) >= 3:
                break
        assert [(e.budget_id, e.threshold_percent) for e in streamed] == [
            ("b-alarm", 50), ("b-alarm", 80), ("b-alarm", 100)]
        assert [e.sequence for e in streamed] == sorted({e.sequence for e in streamed})
        assert all(e.limit_micros == CREDIT and e.spent_micros >= CREDIT * e.threshold_percent
                   // 100 for e in streamed)
        async for message in suite.client.metering.StreamEvents(mpb.StreamEventsRequest(
                after_sequence=streamed[0].sequence)):
            assert [e.threshold_percent for e in message.events] == [80, 100]
            break
        with pytest.raises(TallyError) as caught:
            async for _ in suite.client.metering.StreamEvents(mpb.StreamEventsRequest(
                    types=[99])):  # type: ignore[list-item]
                pass
        assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT,
                                                             "types[0]")
    finally:
        await stop_suite(suite)


async def test_holds_nobody_captured_leave_the_budget_at_their_ttl(suite: Suite) -> None:
    await suite.fund("acme", 100)
    await add_budget(suite, "b-ttl", 50)
    answer = await suite.client.metering.Authorize(ask("t-1", reservation_ttl_seconds=1))
    assert answer.decision == ALLOW
    assert await budget_usage(suite, "b-ttl") == (0, answer.reserved_micros)
    pool = await db.create_pool(suite.db_url, max_size=1)
    try:
        store = SpendStore(pool)
        assert await store.expire_holds(datetime.now(UTC)) == 0
        assert await store.expire_holds(datetime.now(UTC) + timedelta(seconds=2)) == 1
    finally:
        await pool.close()
    assert await budget_usage(suite, "b-ttl") == (0, 0)
    # a late usage event for the lapsed hold is still charged, as plain spend
    late = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[
        _captured("late", answer.reservation_id, input_tokens=100, output_tokens=10)]))
    assert late.results[0].status == ACCEPTED
    assert (await budget_usage(suite, "b-ttl"))[0] == late.results[0].receipt.cost_micros


async def test_tally_authorize_prints_the_decision_and_the_budget_headroom(
    suite: Suite, capsys: pytest.CaptureFixture[str],
) -> None:
    await suite.fund("acme", 100)
    await add_budget(suite, "b-cli", 50)
    answer = await authorize_cli.authorize(suite.config, ask("cli-1", model="claude-sonnet"))
    printed = capsys.readouterr().out  # the in-process servers log to stdout too
    assert answer.decision == ALLOW
    assert "\nALLOW on claude-sonnet-4: holding " in f"\n{printed}"
    assert answer.reservation_id in printed
    assert "budget:b-cli" in printed and "balance" in printed
    denied = await authorize_cli.authorize(suite.config, ask("cli-2", input_tokens=10**9))
    assert denied.decision == DENY
    assert "\nDENY BUDGET_EXCEEDED: " in f"\n{capsys.readouterr().out}"


async def test_authorize_calls_queued_on_a_budget_are_decided_together_and_exactly(
    suite: Suite,
) -> None:
    """40 Authorize calls (each sent twice at once) pile up behind a held budget lock and are
    decided in shared transactions: each on the holds of the ones before it, so exactly as
    many are allowed as the budget admits, copies get one answer, and both the budget and
    the ledger hold exactly the allowed estimates."""
    await suite.fund("acme", 10_000)
    await suite.fund("other", 100)
    estimate = (await suite.client.metering.Authorize(ask("probe", "other"))).reserved_micros
    # room for 13, and half of another; the first call creates the period's usage row
    await add_budget(suite, "b-group", (13 * estimate + estimate // 2) / CREDIT)
    first = await suite.client.metering.Authorize(ask("first"))
    assert first.decision == ALLOW and first.reserved_micros == estimate
    groups = ("tally_group_commit_size_count", {"group": "metering.authorize"})
    decided = ("tally_group_commit_size_sum", {"group": "metering.authorize"})
    groups_before, decided_before = metrics.sample(*groups), metrics.sample(*decided)
    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM metering.budget_usage WHERE budget_id = 'b-group' "
                               "FOR UPDATE")
            async def authorize(request_id: str) -> mpb.AuthorizeResponse:
                return await suite.client.metering.Authorize(ask(request_id))

            calls = [asyncio.create_task(authorize(f"g-{n // 2}")) for n in range(80)]
            for _ in range(500):  # until a decision waits on the lock
                # (a transaction sees one snapshot of pg_stat_activity unless it is cleared)
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                if await conn.fetchval("SELECT count(*) FROM pg_stat_activity "
                                       "WHERE wait_event_type = 'Lock'"):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("no decision waited for the budget")
        answers = await asyncio.gather(*calls)
    finally:
        await conn.close()
    for n in range(0, 80, 2):
        assert answers[n] == answers[n + 1]
    allowed = [a for a in answers[::2] if a.decision == ALLOW]
    assert len(allowed) == 12
    assert all(a.deny_reason == "BUDGET_EXCEEDED" for a in answers[::2] if a.decision == DENY)
    assert await budget_usage(suite, "b-group") == (0, 13 * estimate)
    assert await in_flight(suite) == 13 * estimate
    assert metrics.sample(*groups) - groups_before < metrics.sample(*decided) - decided_before
