"""A book that drops a model or meter on purpose (removed_models / removed_meters) is still
refused, FAILED_PRECONDITION PRICE_IN_USE naming each use, while something uses it: usage
within the late-event window, open authorization holds priced by the model, quotas that count
the meter. Metering answers what uses what (GetPricingUse); nothing is published."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.errors import Reason
from tally.metering.v1 import metering_pb2 as mpb
from tally.pricing.v1 import pricing_pb2 as pb
from tests.metering.conftest import Suite, start_suite, stop_suite
from tests.metering.test_authorize import ask
from tests.metering.test_ingestion import ACCEPTED, usage
from tests.pricing.conftest import catalog_draft, soon, tally_error, ts
from tests.pricing.test_price_books import _drop_model

NANO = "gpt-4.1-nano"


@pytest.fixture
async def suite(db_url: str) -> Any:
    running = await start_suite(db_url)
    yield running
    await stop_suite(running)


async def _publish(suite: Suite, request_id: str, draft: pb.PriceBook,
                   **removed: Any) -> pb.PublishPriceBookResponse:
    async with grpc.aio.insecure_channel(suite.config.address_of("pricing")) as channel:
        from tally.pricing.v1 import pricing_pb2_grpc
        return await pricing_pb2_grpc.PricingServiceStub(channel).PublishPriceBook(
            pb.PublishPriceBookRequest(request_id=request_id, draft=draft,
                                       effective_from=ts(soon(60)), **removed))


async def _versions(suite: Suite) -> list[int]:
    reply = await suite.client.pricing.ListPriceBookVersions(pb.ListPriceBookVersionsRequest())
    return [v.version for v in reply.versions]


async def _refused(suite: Suite, request_id: str, draft: pb.PriceBook, **removed: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _publish(suite, request_id, draft, **removed)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    error = tally_error(caught.value)
    assert error.reason is Reason.PRICE_IN_USE
    assert await _versions(suite) == [1], "nothing was published"
    return error.message


async def test_a_model_with_usage_in_the_late_window_cannot_be_removed(suite: Suite) -> None:
    await suite.fund("acme", 100)
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("nano-1", model=NANO), usage("nano-2", model=NANO)]))
    assert {r.status for r in reply.results} == {ACCEPTED}
    message = await _refused(suite, "drop-nano", catalog_draft(_drop_model(NANO)),
                             removed_models=[NANO])
    assert f"model {NANO}: 2 usage events within the late-event window" in message


async def test_a_model_an_open_hold_is_priced_by_cannot_be_removed(suite: Suite) -> None:
    await suite.fund("acme", 100)
    held = await suite.client.metering.Authorize(ask("held-1", model=NANO))
    assert held.decision == mpb.DECISION_ALLOW
    message = await _refused(suite, "drop-nano", catalog_draft(_drop_model(NANO)),
                             removed_models=[NANO])
    assert f"model {NANO}: 1 open authorization holds" in message


async def test_metering_names_the_quotas_that_count_a_meter(suite: Suite) -> None:
    # a book cannot drop a token meter while it prices chat models (draft validation), so
    # metering's answer is asked directly: a token quota counts input and output tokens
    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:
        await conn.execute(
            "INSERT INTO metering.quotas (quota_id, org_id, scope, scope_value, kind, "
            "limit_value, enforcement) VALUES ('q-tpm', 'acme', 'ORG', '', "
            "'TOKENS_PER_MINUTE', 100000, 'HARD'), ('q-rps', 'acme', 'ORG', '', "
            "'REQUESTS_PER_SECOND', 10, 'HARD')")
    finally:
        await conn.close()
    reply = await suite.client.metering.GetPricingUse(mpb.GetPricingUseRequest(
        models=["no-such-model"], meters=[common_pb2.METER_OUTPUT_TOKENS,
                                          common_pb2.METER_GPU_MINUTES]))
    assert [(u.item, list(u.quota_ids), u.recent_events) for u in reply.uses] == [
        ("meter output_tokens", ["q-tpm"], 0)]


async def test_what_nothing_uses_is_removed(suite: Suite) -> None:
    # usage of another model does not keep this one
    await suite.fund("acme", 100)
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("mini-1", at=datetime.now(UTC))]))
    assert reply.results[0].status == ACCEPTED
    published = await _publish(suite, "drop-nano", catalog_draft(_drop_model(NANO)),
                               removed_models=[NANO])
    assert published.book.version == 2
    assert all(m.model != NANO for m in published.book.models)
