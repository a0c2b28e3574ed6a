"""The official `openai` package pointed at the gateway: chat, streamed chat and embeddings come
back exactly as the upstream answers them, each with its Tally receipt, and the org's posted
balance moves by exactly the receipts' sum; refusals are the statuses and error bodies an
OpenAI client expects; malformed requests charge nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from examples.gateway import tokens
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import CREDIT
from tests.metering.test_authorize import sql
from tests.metering.test_quotas import add_quota

from .conftest import Stack, stack_for

MESSAGES: list[Any] = [{"role": "system", "content": "You answer briefly."},
                       {"role": "user", "content": "What does a credit lease hold, and why?"}]


async def upstream_says(stack: Stack, path: str, body: bytes) -> httpx.Response:
    """The fake upstream's own answer to the same request body."""
    async with httpx.AsyncClient(base_url=stack.gateway.upstream_url) as direct:
        return await direct.post(path, content=body,
                                 headers={"content-type": "application/json"})


async def receipt_of(stack: Stack, request_id: str) -> mpb.Receipt:
    found = await stack.tally.metering.GetUsageEvent(mpb.GetUsageEventRequest(
        org_id=stack.org, event_id=request_id))
    return found.receipt


async def usage_events(stack: Stack) -> int:
    rows = await sql(stack.suite, "SELECT count(*) AS n FROM metering.usage_events "
                     "WHERE org_id = $1", stack.org)
    return int(rows[0]["n"])


async def chat_embed_and_stream(stack: Stack) -> None:
    client = stack.openai()
    before = await stack.posted()
    costs: list[int] = []

    # chat: the upstream's bytes, a receipt, the usage counted from the text
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=MESSAGES, max_tokens=64)
    completion = raw.parse()
    direct = await upstream_says(stack, "/v1/chat/completions", raw.http_request.content)
    assert json.loads(raw.http_response.content) == direct.json()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == tokens.prompt_tokens(MESSAGES) == 16
    assert completion.usage.completion_tokens == len(completion.choices[0].message.content
                                                     .split())
    request_id = raw.headers["x-tally-request-id"]
    assert raw.headers["x-tally-model"] == "gpt-4.1-mini"
    assert [part.split(";")[0] for part in raw.headers["server-timing"].split(", ")] == [
        "authorize", "upstream", "usage"]
    assert int(raw.headers["x-tally-price-version"]) >= 1
    cost = int(raw.headers["x-tally-cost"])
    assert cost > 0
    receipt = await receipt_of(stack, request_id)
    assert (receipt.cost_micros, receipt.balance_after_micros) == (
        cost, int(raw.headers["x-tally-balance"]))
    costs.append(cost)

    # cached prompt prefix and reasoning: their own meters on the receipt
    raw = await client.chat.completions.with_raw_response.create(
        model="o4-mini", messages=MESSAGES, max_completion_tokens=200,
        reasoning_effort="low", prompt_cache_key="acme-docs")
    reasoned = raw.parse()
    assert reasoned.usage is not None and reasoned.usage.prompt_tokens_details is not None
    assert reasoned.usage.prompt_tokens_details.cached_tokens == 5
    assert reasoned.usage.completion_tokens_details is not None
    assert reasoned.usage.completion_tokens_details.reasoning_tokens == 16
    lines = {line.meter: line.quantity
             for line in (await receipt_of(stack, raw.headers["x-tally-request-id"])).lines}
    from tally.common.v1 import common_pb2 as c
    assert lines[c.METER_CACHED_INPUT_TOKENS] == 5
    assert lines[c.METER_INPUT_TOKENS] == 16 - 5
    assert lines[c.METER_REASONING_TOKENS] == 16
    costs.append(int(raw.headers["x-tally-cost"]))

    # streamed chat: the same chunks the upstream streams; the receipt after the stream
    raw_stream = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=MESSAGES, max_tokens=64, stream=True,
        stream_options={"include_usage": True})
    assert "x-tally-cost" not in raw_stream.headers  # not known when the headers leave
    streamed_id = raw_stream.headers["x-tally-request-id"]
    chunks = [chunk async for chunk in raw_stream.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content  # same prompt, same answer
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    direct = await upstream_says(stack, "/v1/chat/completions",
                                 raw_stream.http_request.content)
    expected = [json.loads(line[6:]) for line in direct.text.splitlines()
                if line.startswith("data: {")]
    assert [c.model_dump(exclude_unset=True) for c in chunks] == expected
    streamed = await receipt_of(stack, streamed_id)
    assert streamed.cost_micros == cost  # the same usage as the unstreamed call
    costs.append(streamed.cost_micros)

    # a stream without include_usage: no usage chunk reaches the client, usage still charged
    quiet = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=MESSAGES, max_tokens=64, stream=True)
    quiet_chunks = [chunk async for chunk in quiet.parse()]
    assert all(c.usage is None for c in quiet_chunks)
    costs.append((await receipt_of(stack, quiet.headers["x-tally-request-id"])).cost_micros)

    # embeddings (the openai package asks for base64 and decodes it)
    raw_embed = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["credit lease", "a budget, per month"])
    embedded = raw_embed.parse()
    direct = await upstream_says(stack, "/v1/embeddings", raw_embed.http_request.content)
    assert json.loads(raw_embed.http_response.content) == direct.json()
    assert [len(e.embedding) for e in embedded.data] == [16, 16]
    assert embedded.usage.prompt_tokens == 2 + 5
    costs.append(int(raw_embed.headers["x-tally-cost"]))

    assert all(c > 0 for c in costs)
    assert before - await stack.posted() == sum(costs)


async def test_chat_stream_and_embeddings_through_the_openai_package(stack: Stack) -> None:
    await chat_embed_and_stream(stack)


async def test_the_same_through_one_stream_usage_per_gateway(db_url: str) -> None:
    async with stack_for(db_url, usage="stream") as streaming:
        await chat_embed_and_stream(streaming)


async def test_a_retried_request_id_is_charged_once(stack: Stack) -> None:
    client = stack.openai()
    before = await stack.posted()
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=MESSAGES, max_tokens=32,
        extra_headers={"x-request-id": "retry-me-1"})
    again = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=MESSAGES, max_tokens=32,
        extra_headers={"x-request-id": "retry-me-1"})
    assert "x-tally-cost" in first.headers, first.headers
    assert first.headers["x-tally-cost"] == again.headers["x-tally-cost"], again.headers
    assert before - await stack.posted() == int(first.headers["x-tally-cost"])


async def test_an_exhausted_budget_answers_402_with_the_reason(stack: Stack) -> None:
    await sql(stack.suite, "INSERT INTO metering.budgets (budget_id, org_id, name, scope, "
              "scope_value, period, limit_micros, alarm_thresholds_percent, enforcement, "
              "downgrade_at_percent) VALUES ('b-tiny', $1, 'b-tiny', 'ORG', '', 'MONTHLY', "
              "$2, '{100}', 'HARD', 0)", stack.org, CREDIT // 20)  # 0.05 credits a month
    client = stack.openai()
    served = 0
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(50):
            await client.chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES,
                                                 max_tokens=16)
            served += 1
    assert served >= 1
    assert refused.value.status_code == 402
    assert refused.value.response.headers["x-tally-reason"] == "BUDGET_EXCEEDED"
    error = refused.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert "b-tiny" in error["message"]


async def test_a_quota_answers_429_with_retry_after(stack: Stack) -> None:
    await add_quota(stack.suite, "REQUESTS_PER_DAY", 1, org=stack.org)
    client = stack.openai()
    await client.embeddings.create(model="text-embedding-3-small", input="one")
    with pytest.raises(openai.RateLimitError) as refused:
        await client.embeddings.create(model="text-embedding-3-small", input="two")
    assert refused.value.status_code == 429
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.response.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_context_over_the_org_limit_answers_400_context_length_exceeded(
        stack: Stack) -> None:
    await stack.tally.metering.SetSpendPolicy(mpb.SetSpendPolicyRequest(
        request_id="policy-1", policy=mpb.SpendPolicy(org_id=stack.org, max_context_tokens=10)))
    before = await stack.posted()
    with pytest.raises(openai.BadRequestError) as refused:
        await stack.openai().chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES)
    assert refused.value.response.json()["error"]["code"] == "context_length_exceeded"
    assert await stack.posted() == before


MALFORMED_CHATS: list[tuple[bytes, int, str | None]] = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": MESSAGES}).encode(), 400, "model"),
    (json.dumps({"model": "gpt-4.1-mini", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "gpt-4.1-mini", "messages": [{"role": "wizard", "content": "x"}]}
                ).encode(), 400, "messages[0].role"),
    (json.dumps({"model": "gpt-4.1-mini", "messages": MESSAGES, "max_tokens": 0}).encode(),
     400, "max_tokens"),
    (json.dumps({"model": "gpt-4.1-mini", "messages": MESSAGES, "n": 3}).encode(), 400, "n"),
    (json.dumps({"model": "gpt-4.1-mini", "messages": MESSAGES, "stream": "yes"}).encode(),
     400, "stream"),
    (json.dumps({"model": "no-such-model", "messages": MESSAGES}).encode(), 404, "model"),
]


async def test_malformed_chat_requests_get_openai_errors_and_charge_nothing(
        stack: Stack) -> None:
    before = await stack.posted()
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        for body, status, param in MALFORMED_CHATS:
            reply = await http.post("/chat/completions", content=body, headers={
                "authorization": f"Bearer {stack.api_key}",
                "content-type": "application/json"})
            assert reply.status_code == status, (body, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param and error["message"] and error["type"], body
    assert await stack.posted() == before
    assert await usage_events(stack) == 0
    rows = await sql(stack.suite, "SELECT count(*) AS n FROM metering.authorizations "
                     "WHERE org_id = $1", stack.org)
    assert rows[0]["n"] == 0


async def test_malformed_embeddings_and_bad_keys_charge_nothing(stack: Stack) -> None:
    before = await stack.posted()
    client = stack.openai()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model="text-embedding-3-small", input=[])
    assert refused.value.response.json()["error"]["param"] == "input"
    with pytest.raises(openai.AuthenticationError) as unknown:
        await stack.openai("tly_prod_" + "x" * 32).embeddings.create(
            model="text-embedding-3-small", input="hello")
    assert unknown.value.response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await stack.openai("sk-not-a-tally-key").embeddings.create(
            model="text-embedding-3-small", input="hello")
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        missing = await http.post("/embeddings", json={"model": "text-embedding-3-small",
                                                       "input": "hi"})
        assert missing.status_code == 401
        unknown_url = await http.post("/completions", json={})
        assert unknown_url.status_code == 404 and unknown_url.json()["error"]
    assert await stack.posted() == before
    assert await usage_events(stack) == 0


async def test_the_load_example_reports_latency_with_and_without_tally(stack: Stack) -> None:
    from examples.gateway import load

    report = await load.main(load.parse([
        "--rps", "20", "--seconds", "0.5", "--gateway-url", stack.gateway.url,
        "--upstream-url", f"{stack.gateway.upstream_url}/v1", "--api-key", stack.api_key]))
    assert report["without_tally"]["ok"] == report["with_tally"]["ok"] == 10
    assert set(report["added_by_tally_ms"]) == {"p50", "p99"}
    assert set(report["with_tally"]["phases_p50_ms"]) == {"authorize", "upstream", "usage"}
    assert report["with_tally"]["p99_ms"] >= report["with_tally"]["p50_ms"] > 0
