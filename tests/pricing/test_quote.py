"""Quote through a real pricing server: lines, tiers, allowances, modes, regions, versions, and
bad input named by field."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from tally.common.v1 import common_pb2
from tally.kit.errors import Reason
from tally.pricing.v1 import pricing_pb2 as pb
from tests.pricing.conftest import (
    Stub,
    catalog_draft,
    publish,
    quantity,
    scale_rates,
    tally_error,
    ts,
)

INPUT = common_pb2.METER_INPUT_TOKENS
OUTPUT = common_pb2.METER_OUTPUT_TOKENS
STORAGE = common_pb2.METER_STORAGE_GB_HOURS
BANDWIDTH = common_pb2.METER_BANDWIDTH_GB
READS = common_pb2.METER_EMBEDDING_READS


async def test_a_quote_has_a_line_per_meter_with_rate_tier_and_version(pricing: Stub) -> None:
    reply = await pricing.Quote(pb.QuoteRequest(
        model="gpt-4.1-mini-latest", quantities=[quantity(OUTPUT, 300), quantity(INPUT, 1200)]))
    assert (reply.resolved_model, reply.provider) == ("gpt-4.1-mini", "openai")
    assert reply.price_book_version == 1
    by_meter = {line.meter: line for line in reply.lines}
    assert set(by_meter) == {INPUT, OUTPUT}
    first = by_meter[INPUT]
    assert (first.quantity, first.rate, first.per_units) == (1200, "50", 1_000_000)
    assert (first.tier_index, first.tier_mode) == (0, pb.TIER_MODE_FLAT)
    assert first.line_id == "gpt-4.1-mini/input_tokens/online"
    assert first.cost_micros == 60_000  # 1200 tokens * 50 credits / 1M = 0.06 credits
    assert first.region_multiplier == "1"
    assert reply.total_micros == sum(line.cost_micros for line in reply.lines)


async def test_batch_usage_is_priced_at_the_batch_rate(pricing: Stub) -> None:
    online = await pricing.Quote(pb.QuoteRequest(
        model="gpt-4.1-mini", quantities=[quantity(INPUT, 1_000_000)]))
    batch = await pricing.Quote(pb.QuoteRequest(
        model="gpt-4.1-mini", mode=common_pb2.USAGE_MODE_BATCH,
        quantities=[quantity(INPUT, 1_000_000)]))
    assert online.total_micros == 2 * batch.total_micros == 50_000_000
    assert batch.lines[0].line_id == "gpt-4.1-mini/input_tokens/batch"


async def test_period_quantities_apply_allowance_tiers_and_region(pricing: Stub) -> None:
    reply = await pricing.Quote(pb.QuoteRequest(
        region="eu-west", quantities=[quantity(STORAGE, 200)],
        period_quantities=[quantity(STORAGE, 9_950)]))
    (storage,) = reply.lines
    # 9,950 used: 50 more at tier 0 (0.04), 150 at tier 1 (0.03); x1.1 in eu-west
    assert storage.tier_mode == pb.TIER_MODE_GRADUATED
    assert storage.tier_index == 1 and storage.region_multiplier == "1.1"
    assert storage.cost_micros == int((50 * 0.04 + 150 * 0.03) * 1.1 * 1_000_000 + 0.5)
    fresh = await pricing.Quote(pb.QuoteRequest(quantities=[quantity(READS, 1_500_000)]))
    (reads,) = fresh.lines
    assert reads.included_applied == 1_000_000 and reads.overage_quantity == 500_000
    assert reads.cost_micros == 5_000_000  # 0.5M reads above the allowance at 10 per 1M


async def test_volume_tier_is_chosen_by_the_period_total(pricing: Stub) -> None:
    reply = await pricing.Quote(pb.QuoteRequest(
        quantities=[quantity(BANDWIDTH, 10)], period_quantities=[quantity(BANDWIDTH, 995)]))
    (bandwidth,) = reply.lines
    assert (bandwidth.tier_mode, bandwidth.tier_index, bandwidth.rate) == (
        pb.TIER_MODE_VOLUME, 1, "7")
    assert bandwidth.cost_micros == 70_000_000


async def test_an_estimate_is_priced_the_same_and_labelled(pricing: Stub) -> None:
    usage = [quantity(INPUT, 5000), quantity(OUTPUT, 5000)]
    actual = await pricing.Quote(pb.QuoteRequest(model="gpt-4.1", quantities=usage))
    estimate = await pricing.Quote(pb.QuoteRequest(model="gpt-4.1", quantities=usage,
                                                   is_estimate=True))
    assert estimate.is_estimate and not actual.is_estimate
    assert estimate.total_micros == actual.total_micros


async def test_an_event_before_a_new_books_effective_time_is_rated_with_the_old_book(
    pricing: Stub,
) -> None:
    effective = datetime.now(UTC) + timedelta(seconds=30)
    await publish(pricing, "p-double", catalog_draft(scale_rates(2)), effective)
    usage = [quantity(INPUT, 1_000_000)]

    async def quote_at(at: datetime | None) -> pb.QuoteResponse:
        request = pb.QuoteRequest(model="gpt-4.1-mini", quantities=usage)
        if at is not None:
            request.at.CopyFrom(ts(at))
        reply: pb.QuoteResponse = await pricing.Quote(request)
        return reply

    now, just_before, at_start = await asyncio.gather(
        quote_at(None), quote_at(effective - timedelta(microseconds=1)), quote_at(effective))
    assert (now.price_book_version, now.total_micros) == (1, 50_000_000)
    assert (just_before.price_book_version, just_before.total_micros) == (1, 50_000_000)
    assert (at_start.price_book_version, at_start.total_micros) == (2, 100_000_000)
    late = await quote_at(datetime(2024, 1, 1, tzinfo=UTC))
    assert late.price_book_version == 1, "the bootstrap book covers any past instant"


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"model": "gpt-99"}, Reason.UNKNOWN_MODEL, "model"),
        ({"quantities": []}, Reason.INVALID_ARGUMENT, "quantities"),
        ({"quantities": [quantity(0, 5)]}, Reason.UNKNOWN_METER, "quantities[0].meter"),
        ({"quantities": [quantity(INPUT, -1)]}, Reason.INVALID_ARGUMENT,
         "quantities[0].quantity"),
        ({"quantities": [quantity(INPUT, 1), quantity(INPUT, 2)]}, Reason.INVALID_ARGUMENT,
         "quantities[1].meter"),
        ({"quantities": [quantity(INPUT, 1)] * 21}, Reason.INVALID_ARGUMENT, "quantities"),
        ({"mode": 99}, Reason.INVALID_ARGUMENT, "mode"),
        ({"period_quantities": [quantity(INPUT, -5)]}, Reason.INVALID_ARGUMENT,
         "period_quantities[0].quantity"),
    ],
)
async def test_bad_quote_input_names_the_field(
    pricing: Stub, fields: dict[str, Any], reason: Reason, field: str,
) -> None:
    request: dict[str, Any] = {"model": "gpt-4.1", "quantities": [quantity(INPUT, 10)]}
    request.update(fields)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pricing.Quote(pb.QuoteRequest(**request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = tally_error(caught.value)
    assert error.reason is reason
    assert field in [v.field for v in error.violations], error.violations


async def test_a_meter_the_model_has_no_price_for_is_price_not_found(pricing: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pricing.Quote(pb.QuoteRequest(
            model="text-embedding-3-small", quantities=[quantity(OUTPUT, 10)]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
