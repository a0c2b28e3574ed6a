"""Quotas and rate limits through Authorize, on the real services: every applicable counter
is consumed or none, token and long-context quotas count what they say, a THROTTLED org runs
at its policy's reduced rate, and replicas sharing Redis share the limit.

The limiters here read a clock the test moves, so "per second" is exact, not a race."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

import pytest

from tally.common.v1 import common_pb2
from tally.kit import infra
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.limits import SECOND_US, InProcessLimiter, RedisLimiter
from tally.metering.v1 import metering_pb2 as mpb
from tests.limits.test_contract import Clock
from tests.metering.conftest import Suite, start_suite, stop_suite
from tests.metering.test_authorize import ALLOW, DENY, ask, in_flight, lease_sees, sql

_ids = itertools.count()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def suite(db_url: str, clock: Clock) -> AsyncIterator[Suite]:
    running = await start_suite(db_url, limiter=InProcessLimiter(clock))
    await running.fund("acme", 1_000)
    yield running
    await stop_suite(running)


async def add_quota(suite: Suite, kind: str, limit: int, *, scope: str = "ORG",
                    scope_value: str = "", enforcement: str = "HARD", burst: int = 0,
                    long_context_threshold: int = 0, org: str = "acme") -> str:
    # Quotas are made with SQL here; the management RPCs have their own tests.
    quota_id = f"q-{scope.lower()}-{next(_ids)}"
    await sql(suite, "INSERT INTO metering.quotas (quota_id, org_id, scope, scope_value, kind, "
              "limit_value, burst, enforcement, long_context_threshold_tokens) "
              "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)", quota_id, org, scope, scope_value,
              kind, limit, burst, enforcement, long_context_threshold)
    return quota_id


def request(project: str = "p1", key: str = "k1", **fields: object) -> mpb.AuthorizeRequest:
    asked = ask(uuid.uuid4().hex, project_id=project, **fields)
    asked.context.api_key_id = key
    return asked


async def decisions(suite: Suite, count: int, **fields: object) -> list[mpb.AuthorizeResponse]:
    return [await suite.client.metering.Authorize(request(**fields)) for _ in range(count)]


def allowed(replies: list[mpb.AuthorizeResponse]) -> int:
    return sum(r.decision == ALLOW for r in replies)


async def test_a_project_denial_consumes_neither_the_org_nor_the_key_counter(
        suite: Suite) -> None:
    org = await add_quota(suite, "REQUESTS_PER_SECOND", 5)
    project = await add_quota(suite, "REQUESTS_PER_SECOND", 2, scope="PROJECT", scope_value="p1")
    key = await add_quota(suite, "REQUESTS_PER_SECOND", 5, scope="API_KEY", scope_value="k1")
    admitted = await decisions(suite, 2)
    assert allowed(admitted) == 2
    refused = await decisions(suite, 5)
    assert allowed(refused) == 0
    for reply in refused:
        assert (reply.decision, reply.deny_reason) == (DENY, "QUOTA_EXCEEDED")
        assert project in reply.message and org not in reply.message
        # the two admitted stay in the project's window for a second and one slot (0.1 s)
        assert reply.retry_after_ms == 1_100
        assert not reply.reservation_id
    # the refusals hold nothing (of the org's credit lease)
    assert await in_flight(suite) == sum(r.reserved_micros for r in admitted)
    headroom = {h.scope: h.remaining for h in refused[0].headroom}
    assert headroom == {f"quota:{org}": 3, f"quota:{project}": 0, f"quota:{key}": 3}
    # another project on the same key: the org and key counters still have 3 each
    other = await decisions(suite, 5, project="p2")
    assert allowed(other) == 3
    assert key in other[3].message and org in other[3].message


async def test_counters_refill_at_their_rate(suite: Suite, clock: Clock) -> None:
    await add_quota(suite, "REQUESTS_PER_SECOND", 4, burst=2)
    assert allowed(await decisions(suite, 10)) == 6
    clock.advance(SECOND_US // 2)
    assert allowed(await decisions(suite, 10)) == 0  # no window of 1 s holds more than 4 + 2
    clock.advance(SECOND_US // 2 + SECOND_US // 10)
    # the window has emptied; the burst is paid back at 4/s: 1.1 s refilled 4
    assert allowed(await decisions(suite, 10)) == 4


async def test_tokens_per_minute_count_estimated_input_plus_max_output(
        suite: Suite, clock: Clock) -> None:
    quota = await add_quota(suite, "TOKENS_PER_MINUTE", 10_000)
    first = await suite.client.metering.Authorize(request(input_tokens=6_000, max_output=1_000))
    assert first.decision == ALLOW
    assert {h.scope: (h.unit, h.remaining) for h in first.headroom}[f"quota:{quota}"] == (
        "tokens", 3_000)
    second = await suite.client.metering.Authorize(request(input_tokens=3_000, max_output=1_000))
    assert (second.decision, second.deny_reason) == (DENY, "QUOTA_EXCEEDED")
    # the 7,000 leave the one-minute window a minute and a slot (6 s) after they came
    assert second.retry_after_ms == 66_000
    clock.advance(6 * SECOND_US)
    assert (await suite.client.metering.Authorize(
        request(input_tokens=3_000, max_output=1_000))).decision == DENY
    clock.advance(60 * SECOND_US)
    assert (await suite.client.metering.Authorize(
        request(input_tokens=3_000, max_output=1_000))).decision == ALLOW


async def test_long_context_requests_have_their_own_lower_rate(suite: Suite) -> None:
    await sql(suite, "INSERT INTO metering.spend_policies (org_id, long_context_threshold_tokens)"
              " VALUES ('acme', 100000)")
    await add_quota(suite, "LONG_CONTEXT_REQUESTS_PER_SECOND", 1)
    await add_quota(suite, "REQUESTS_PER_SECOND", 10)
    long = await decisions(suite, 3, context_tokens=150_000)
    assert [r.decision for r in long] == [ALLOW, DENY, DENY]
    assert long[1].deny_reason == "QUOTA_EXCEEDED"
    assert allowed(await decisions(suite, 10, context_tokens=50_000)) == 9


async def test_requests_per_day_reset_at_midnight_utc(suite: Suite, clock: Clock) -> None:
    day = 86_400 * SECOND_US
    clock.now_us = (clock.now_us // day + 1) * day - SECOND_US  # one second before midnight
    await add_quota(suite, "REQUESTS_PER_DAY", 3)
    replies = await decisions(suite, 4)
    assert allowed(replies) == 3 and replies[3].retry_after_ms == 1_000
    clock.advance(SECOND_US)
    assert allowed(await decisions(suite, 4)) == 3


async def test_a_soft_quota_reports_but_never_denies(suite: Suite) -> None:
    quota = await add_quota(suite, "REQUESTS_PER_SECOND", 2, enforcement="SOFT")
    replies = await decisions(suite, 4)
    assert allowed(replies) == 4
    assert [{h.scope: h.remaining for h in r.headroom}[f"quota:{quota}"] for r in replies] == [
        1, 0, -1, -2]


async def test_a_throttled_org_runs_at_its_policys_reduced_rate(suite: Suite) -> None:
    await sql(suite, "INSERT INTO metering.spend_policies (org_id, throttled_requests_per_second)"
              " VALUES ('acme', 2)")
    await suite.client.ledger.SetBillingState(lpb.SetBillingStateRequest(
        request_id="overdue", org_id="acme", state=common_pb2.BILLING_STATE_THROTTLED,
        cause="invoice overdue"))
    replies = await decisions(suite, 4)
    assert [r.decision for r in replies] == [ALLOW, ALLOW, DENY, DENY]
    assert replies[2].deny_reason == "ACCOUNT_THROTTLED" and replies[2].retry_after_ms > 0
    # the refused requests hold nothing (of the org's credit lease)
    assert await in_flight(suite) == sum(r.reserved_micros for r in replies[:2])
    await suite.client.ledger.SetBillingState(lpb.SetBillingStateRequest(
        request_id="paid", org_id="acme", state=common_pb2.BILLING_STATE_ACTIVE,
        cause="invoice paid"))
    await lease_sees(suite, "ACTIVE")  # the ledger's outbox reaches metering's lease
    assert allowed(await decisions(suite, 4)) == 4


async def test_a_throttled_org_whose_policy_allows_nothing_is_denied(suite: Suite) -> None:
    await suite.client.ledger.SetBillingState(lpb.SetBillingStateRequest(
        request_id="review", org_id="acme", state=common_pb2.BILLING_STATE_THROTTLED,
        cause="fraud review"))
    reply = await suite.client.metering.Authorize(request())
    assert (reply.decision, reply.deny_reason) == (DENY, "ACCOUNT_THROTTLED")
    assert await in_flight(suite) == 0


async def test_three_replicas_sharing_redis_admit_the_limit_once_not_three_times(
        db_url: str, redis_url: str, clock: Clock) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"  # fresh Redis counters
    shared = [RedisLimiter(redis_url, clock_us=clock) for _ in range(3)]
    suite = await start_suite(db_url, limiter=shared[0])
    replicas = [await suite.start_metering_replica(limiter) for limiter in shared[1:]]
    clients = [suite.client, *(client for _, client in replicas)]
    try:
        await suite.fund(org, 1_000)
        await add_quota(suite, "REQUESTS_PER_SECOND", 100, org=org)
        per_second = []
        for _ in range(3):
            replies = await asyncio.gather(*(
                clients[i % 3].metering.Authorize(ask(uuid.uuid4().hex, org=org))
                for i in range(240)))
            per_second.append(allowed(list(replies)))
            clock.advance(SECOND_US + SECOND_US // 10)  # a period and a slot: a fresh window
        assert per_second == [100, 100, 100]
    finally:
        for server, client in replicas:
            await client.close()
            await server.stop()
        await stop_suite(suite)


async def test_with_redis_unreachable_hard_quotas_fail_closed(db_url: str) -> None:
    dead = RedisLimiter(f"redis://127.0.0.1:{infra.free_port()}/0")
    suite = await start_suite(db_url, limiter=dead)
    try:
        await suite.fund("acme", 100)
        assert (await suite.client.metering.Authorize(request())).decision == ALLOW
        await add_quota(suite, "REQUESTS_PER_SECOND", 100)
        reply = await suite.client.metering.Authorize(request())
        assert (reply.decision, reply.deny_reason) == (DENY, "QUOTA_EXCEEDED")
        assert "unavailable" in reply.message and reply.retry_after_ms == 1_000
    finally:
        await stop_suite(suite)


async def test_64_concurrent_retries_of_one_request_id_consume_one_unit(suite: Suite) -> None:
    await add_quota(suite, "REQUESTS_PER_SECOND", 5)
    same = request()
    copies = await asyncio.gather(*(suite.client.metering.Authorize(same) for _ in range(64)))
    assert copies[0].decision == ALLOW and all(c == copies[0] for c in copies)
    # the 64 copies took one of the 5: four more fit, then the quota is spent
    fresh = await decisions(suite, 5)
    assert [r.decision for r in fresh] == [ALLOW] * 4 + [DENY]
    # a retry once the quota is spent is still the original answer, and consumes nothing
    assert await suite.client.metering.Authorize(same) == copies[0]
    assert await in_flight(suite) == sum(r.reserved_micros for r in (copies[0], *fresh[:4]))
