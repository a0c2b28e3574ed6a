"""Envoy's rate-limit protocol on metering, through a client generated from the vendored
data-plane-api protos: ShouldRateLimit's OK / OVER_LIMIT is Authorize's quota outcome, the
hits land in Authorize's counters, exhausted budgets and credit refuse with the reason in the
headers and an OpenAI error body, and bad descriptors are INVALID_ARGUMENT counting nothing.

The limiter reads a clock the test moves, so "per second" is exact, not a race."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tally.limits import InProcessLimiter
from tally.metering.v1 import metering_pb2 as mpb
from tests.limits.test_contract import Clock
from tests.metering.conftest import Suite, start_suite, stop_suite
from tests.metering.test_authorize import ALLOW, DENY, add_budget, ask, sql
from tests.metering.test_quotas import add_quota

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def suite(db_url: str, clock: Clock) -> AsyncIterator[Suite]:
    running = await start_suite(db_url, limiter=InProcessLimiter(clock))
    yield running
    await stop_suite(running)


@pytest.fixture
async def rls(suite: Suite) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    async with grpc.aio.insecure_channel(suite.config.address_of("metering")) as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def descriptor(org: str, **entries: str) -> ratelimit_pb2.RateLimitDescriptor:
    return ratelimit_pb2.RateLimitDescriptor(entries=[
        ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)
        for k, v in {"org_id": org, **entries}.items()])


def should(org: str, domain: str = "tally", **entries: str) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=[descriptor(org, **entries)])


def authorize(org: str, project: str, key: str) -> mpb.AuthorizeRequest:
    asked = ask(uuid.uuid4().hex, org, project_id=project, input_tokens=100, max_output=50)
    asked.context.api_key_id = key
    return asked


async def quotas_for(suite: Suite, org: str) -> None:
    await add_quota(suite, "REQUESTS_PER_SECOND", 12, org=org, burst=4)
    await add_quota(suite, "REQUESTS_PER_SECOND", 4, scope="PROJECT", scope_value="p1", org=org)
    await add_quota(suite, "REQUESTS_PER_SECOND", 3, scope="API_KEY", scope_value="k2", org=org)
    await add_quota(suite, "REQUESTS_PER_DAY", 450, org=org)


async def test_should_rate_limit_matches_authorize_over_a_mixed_sequence_of_1000_requests(
        suite: Suite, rls: rls_pb2_grpc.RateLimitServiceStub, clock: Clock) -> None:
    # Two orgs with the same quotas: Authorize asks for one, Envoy's protocol for the other,
    # the same descriptors in the same order on one clock.
    for org in ("acme", "mirror"):
        await suite.fund(org, 1_000)
        await quotas_for(suite, org)
    rng = random.Random(22)
    outcomes: dict[tuple[bool, bool], int] = {}
    for step in range(1_000):
        project, key = rng.choice(("p1", "p2")), rng.choice(("k1", "k2", "k3"))
        if rng.random() < 0.15:
            clock.advance(rng.randrange(50_000, 400_000))
        decided = await suite.client.metering.Authorize(authorize("acme", project, key))
        answer = await rls.ShouldRateLimit(should("mirror", project_id=project,
                                                  api_key_id=key))
        denied_by_quota = decided.decision == DENY
        if denied_by_quota:
            assert decided.deny_reason == "QUOTA_EXCEEDED", decided
        else:
            assert decided.decision == ALLOW
        over = answer.overall_code == OVER
        assert over == denied_by_quota, (step, project, key, decided, answer)
        [status] = answer.statuses
        if over:
            reset = status.duration_until_reset
            assert reset.seconds * 1000 + reset.nanos // 1_000_000 == decided.retry_after_ms
            headers = {h.key: h.value for h in answer.response_headers_to_add}
            assert headers["x-tally-reason"] == "QUOTA_EXCEEDED"
            assert int(headers["retry-after"]) >= 1
        outcomes[(over, project == "p1")] = outcomes.get((over, project == "p1"), 0) + 1
    # the sequence is mixed: admitted and refused, in both projects, and the day quota bit
    assert all(outcomes.get((o, p), 0) > 20 for o in (True, False) for p in (True, False))
    rows = await sql(suite, "SELECT count(*) AS n FROM metering.authorizations WHERE org_id = $1",
                     "mirror")
    assert rows[0]["n"] == 0  # the mesh's question holds nothing and records no decision


async def test_hits_land_in_the_counters_authorize_uses(
        suite: Suite, rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await suite.fund("acme", 100)
    await add_quota(suite, "REQUESTS_PER_SECOND", 3)
    first = await rls.ShouldRateLimit(rls_pb2.RateLimitRequest(
        domain="tally", descriptors=[descriptor("acme")], hits_addend=2))
    assert first.overall_code == OK
    assert first.statuses[0].current_limit.requests_per_unit == 3
    assert first.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.SECOND
    assert first.statuses[0].limit_remaining == 1
    assert (await suite.client.metering.Authorize(authorize("acme", "p1", "k1"))).decision == ALLOW
    refused = await suite.client.metering.Authorize(authorize("acme", "p1", "k1"))
    assert (refused.decision, refused.deny_reason) == (DENY, "QUOTA_EXCEEDED")
    assert (await rls.ShouldRateLimit(should("acme"))).overall_code == OVER


async def test_an_exhausted_budget_is_over_limit_with_the_reason_and_an_openai_body(
        suite: Suite, rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await suite.fund("acme", 100)
    await add_budget(suite, "b-team", 1, scope="PROJECT", scope_value="p1")
    admitted = await suite.client.metering.Authorize(authorize("acme", "p1", "k1"))
    assert admitted.decision == ALLOW
    assert (await rls.ShouldRateLimit(should("acme", project_id="p1"))).overall_code == OK
    # the budget's month is spent (as usage would have spent it)
    await sql(suite, "UPDATE metering.budget_usage SET spent_micros = 1000000 "
              "WHERE budget_id = 'b-team'")
    refused = await suite.client.metering.Authorize(authorize("acme", "p1", "k1"))
    assert (refused.decision, refused.deny_reason) == (DENY, "BUDGET_EXCEEDED")
    answer = await rls.ShouldRateLimit(should("acme", project_id="p1"))
    assert answer.overall_code == OVER
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert headers["x-tally-reason"] == "BUDGET_EXCEEDED"
    assert "b-team" in headers["x-tally-message"]
    assert answer.statuses[0].duration_until_reset.seconds > 0  # until the month ends
    body = json.loads(answer.raw_body)
    assert body["error"]["type"] == "insufficient_quota"
    assert body["error"]["code"] == "budget_exceeded"
    # another project is not under that budget
    assert (await rls.ShouldRateLimit(should("acme", project_id="p2"))).overall_code == OK


async def test_an_org_without_credit_is_over_limit_insufficient_credits(
        suite: Suite, rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    answer = await rls.ShouldRateLimit(should("broke"))
    assert answer.overall_code == OVER
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert headers["x-tally-reason"] == "INSUFFICIENT_CREDITS"
    assert "retry-after" not in headers  # waiting does not help: credit does
    refused = await suite.client.metering.Authorize(authorize("broke", "p1", "k1"))
    assert refused.deny_reason == "INSUFFICIENT_CREDITS"


BAD_REQUESTS: list[tuple[rls_pb2.RateLimitRequest, str]] = [
    (should("acme", team="x"), "descriptors[0].entries[1].key"),
    (rls_pb2.RateLimitRequest(domain="tally", descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="project_id", value="p1")])]),
     "descriptors[0].entries"),
    (should("acme", domain="envoy"), "domain"),
    (rls_pb2.RateLimitRequest(domain="tally"), "descriptors"),
    (should("acme", model="no-such-model"), "descriptors[0].entries"),
    (should("acme", tokens="many"), "descriptors[0].entries"),
    (rls_pb2.RateLimitRequest(domain="tally", descriptors=[descriptor("acme")],
                              hits_addend=2_000_000), "descriptors[0].hits_addend"),
]


async def test_bad_descriptors_are_invalid_argument_naming_the_field_and_count_nothing(
        suite: Suite, rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await suite.fund("acme", 100)
    await add_quota(suite, "REQUESTS_PER_SECOND", 1)
    for request, field in BAD_REQUESTS:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rls.ShouldRateLimit(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or ""), (field, refused.value.details())
    # nothing was counted: the one request a second is still there
    assert (await rls.ShouldRateLimit(should("acme"))).overall_code == OK
    assert (await rls.ShouldRateLimit(should("acme"))).overall_code == OVER


async def test_concurrent_mesh_and_authorize_callers_share_one_limit_exactly(
        suite: Suite, rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    # a day quota of 30 requests, 48 from the mesh and 48 through Authorize at once
    await suite.fund("acme", 1_000)
    await add_quota(suite, "REQUESTS_PER_DAY", 30)

    async def mesh() -> bool:
        return (await rls.ShouldRateLimit(should("acme"))).overall_code == OK

    async def direct() -> bool:
        decided = await suite.client.metering.Authorize(authorize("acme", "p1", "k1"))
        assert decided.decision == ALLOW or decided.deny_reason == "QUOTA_EXCEEDED"
        return decided.decision == ALLOW

    admitted = await asyncio.gather(*(mesh() for _ in range(48)),
                                    *(direct() for _ in range(48)))
    assert sum(admitted) == 30
    assert (await rls.ShouldRateLimit(should("acme"))).overall_code == OVER
