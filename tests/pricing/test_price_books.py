"""Price books through a real pricing server: bootstrap, publish, versions, idempotency,
validation, effective dating and ListCreditPackages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.pricing.server import build_for
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason
from tally.kit.server import start_server
from tally.pricing.v1 import pricing_pb2 as pb
from tally.rating import load_catalog
from tests.pricing.conftest import (
    Stub,
    catalog_draft,
    line,
    pricing_server,
    publish,
    quantity,
    scale_rates,
    soon,
    tally_error,
    ts,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def versions(stub: Stub) -> list[int]:
    reply = await stub.ListPriceBookVersions(pb.ListPriceBookVersionsRequest())
    return [v.version for v in reply.versions]


async def test_first_start_publishes_the_default_catalog_as_version_1_from_the_epoch(
    pricing: Stub,
) -> None:
    book = (await pricing.GetPriceBook(pb.GetPriceBookRequest())).book
    catalog = load_catalog()
    assert book.version == 1
    assert book.effective_from.ToDatetime(tzinfo=UTC) == EPOCH
    assert book.published_by == "system:pricing-bootstrap"
    assert len(book.lines) == len(catalog.lines) and len(book.models) == len(catalog.models)
    assert {m.kind for m in book.models} >= {pb.MODEL_KIND_CHAT, pb.MODEL_KIND_EMBEDDING,
                                             pb.MODEL_KIND_RERANK}
    assert any(c.mode == common_pb2.USAGE_MODE_BATCH for c in book.costs)
    assert dict(book.custom_credit_price_minor) == {"USD": "1"}
    assert await versions(pricing) == [1]


async def test_two_replicas_starting_on_an_empty_database_publish_one_version(
    db_url: str,
) -> None:
    apps = await asyncio.gather(build_for(db_url), build_for(db_url), build_for(db_url))
    servers = [await start_server(app, port=0) for app in apps]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as channel:
            from tally.pricing.v1 import pricing_pb2_grpc

            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            assert await versions(stub) == [1]
    finally:
        for server in servers:
            await server.stop()


async def test_restarting_on_a_published_database_keeps_every_version(db_url: str) -> None:
    async with pricing_server(db_url) as (_, stub):
        await publish(stub, "p-2", catalog_draft(scale_rates(2)), soon(60))
    async with pricing_server(db_url) as (_, stub):
        assert await versions(stub) == [2, 1]
        second = (await stub.GetPriceBook(pb.GetPriceBookRequest(version=2))).book
        assert line(second, "gpt-4.1-mini/input_tokens/online").tiers[0].rate == "100"


async def test_publish_assigns_the_next_version_and_every_version_stays_readable(
    pricing: Stub,
) -> None:
    effective = soon(60)
    reply = await publish(pricing, "p-2", catalog_draft(scale_rates(2)), effective)
    assert reply.book.version == 2 and not reply.is_replay
    assert reply.book.published_by == "user:pricing-admin"
    assert reply.book.effective_from.ToDatetime(tzinfo=UTC) == effective.replace(
        microsecond=effective.microsecond)
    second = (await pricing.GetPriceBook(pb.GetPriceBookRequest(version=2))).book
    first = (await pricing.GetPriceBook(pb.GetPriceBookRequest(version=1))).book
    assert line(second, "gpt-4.1/input_tokens/online").tiers[0].rate == str(
        2 * int(line(first, "gpt-4.1/input_tokens/online").tiers[0].rate))
    now_book = (await pricing.GetPriceBook(pb.GetPriceBookRequest())).book
    assert now_book.version == 1, "v2 takes effect in a minute"
    later = (await pricing.GetPriceBook(pb.GetPriceBookRequest(at=ts(effective)))).book
    assert later.version == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pricing.GetPriceBook(pb.GetPriceBookRequest(version=9))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert tally_error(caught.value).reason is Reason.PRICE_NOT_FOUND


async def test_publish_replays_on_request_id_and_refuses_a_different_payload(
    pricing: Stub,
) -> None:
    draft = catalog_draft(scale_rates(2))
    effective = soon(60)
    first = await publish(pricing, "p-same", draft, effective)
    again = await publish(pricing, "p-same", draft, effective)
    assert again.is_replay and again.book == first.book
    assert await versions(pricing) == [2, 1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(pricing, "p-same", catalog_draft(scale_rates(3)), effective)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert tally_error(caught.value).reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert await versions(pricing) == [2, 1]


async def test_concurrent_publishes_get_consecutive_versions_ascending_in_time(
    pricing: Stub,
) -> None:
    base = datetime.now(UTC) + timedelta(minutes=5)
    outcomes = await asyncio.gather(*(
        publish(pricing, f"p-{i}", catalog_draft(), base + timedelta(minutes=i))
        for i in range(6)), return_exceptions=True)
    accepted = [o for o in outcomes if isinstance(o, pb.PublishPriceBookResponse)]
    refused = [o for o in outcomes if not isinstance(o, pb.PublishPriceBookResponse)]
    # A publish that lost the race to a later-effective book is refused (versions and
    # effective times ascend together); every accepted one got the next version.
    assert accepted
    assert sorted(r.book.version for r in accepted) == list(range(2, 2 + len(accepted)))
    for error in refused:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert [v.field for v in tally_error(error).violations] == ["effective_from"]
    by_version = sorted(accepted, key=lambda r: r.book.version)
    starts = [r.book.effective_from.ToDatetime() for r in by_version]
    assert starts == sorted(starts)
    assert await versions(pricing) == list(range(1 + len(accepted), 0, -1))


def _broken(draft: pb.PriceBook) -> None:
    mini = line(draft, "gpt-4.1-mini/input_tokens/online")
    mini.tiers[0].rate = "-1"  # negative rate
    storage = line(draft, "storage/gb_hours")
    storage.tiers[1].up_to = 5_000  # overlaps tier 0 (up_to 10000)
    bandwidth = line(draft, "network/bandwidth_gb")
    bandwidth.tiers[1].up_to = 0  # an unbounded tier that is not the last: a gap/overlap
    nano_output = line(draft, "gpt-4.1-nano/output_tokens/online")
    draft.lines.remove(nano_output)  # a chat model without an online output rate
    line(draft, "gpu/minutes").tier_mode = pb.TIER_MODE_UNSPECIFIED
    line(draft, "gpt-4.1/output_tokens/online").tiers[0].rate = "cheap"


async def test_an_invalid_book_is_refused_listing_every_problem_and_the_current_stays(
    pricing: Stub,
) -> None:
    before = (await pricing.GetPriceBook(pb.GetPriceBookRequest())).book
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(pricing, "p-bad", catalog_draft(_broken), soon(60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in tally_error(caught.value).violations]
    expected = [
        "draft.lines[gpt-4.1-mini/input_tokens/online].tiers[0].rate",
        "draft.lines[storage/gb_hours].tiers[1].up_to",
        "draft.lines[network/bandwidth_gb].tiers[1].up_to",
        "draft.models[gpt-4.1-nano]",
        "tier_mode",
        ".rate",
    ]
    for wanted in expected:
        assert any(wanted in f for f in fields), (wanted, fields)
    assert any(f.endswith("].tier_mode") for f in fields)
    assert any("'cheap'" in v.description for v in tally_error(caught.value).violations)
    assert await versions(pricing) == [1]
    after = (await pricing.GetPriceBook(pb.GetPriceBookRequest())).book
    assert after == before
    quote = await pricing.Quote(pb.QuoteRequest(
        model="gpt-4.1-nano", quantities=[quantity(common_pb2.METER_OUTPUT_TOKENS, 1000)]))
    assert quote.price_book_version == 1


@pytest.mark.parametrize("offset", [timedelta(seconds=-30), timedelta(0)])
async def test_effective_from_in_the_past_or_not_after_the_latest_is_refused(
    pricing: Stub, offset: timedelta,
) -> None:
    if offset:  # in the past
        effective = datetime.now(UTC) + offset
    else:  # not later than an already scheduled book
        effective = soon(120)
        await publish(pricing, "p-scheduled", catalog_draft(), effective)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(pricing, "p-late", catalog_draft(), effective)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in tally_error(caught.value).violations] == ["effective_from"]


async def test_a_price_below_provider_cost_is_flagged_but_published(pricing: Stub) -> None:
    def cheap(draft: pb.PriceBook) -> None:
        line(draft, "gpt-4.1-mini/input_tokens/online").tiers[0].rate = "30"  # cost is 40

    reply = await publish(pricing, "p-cheap", catalog_draft(cheap), soon(60))
    assert reply.book.version == 2
    (warning,) = [w for w in reply.below_cost_warnings if w.region == ""]
    assert warning.line_id == "gpt-4.1-mini/input_tokens/online"
    assert warning.model == "gpt-4.1-mini"
    assert warning.meter == common_pb2.METER_INPUT_TOKENS
    assert warning.mode == common_pb2.USAGE_MODE_ONLINE
    assert (warning.price_rate, warning.cost_rate) == ("30", "40")
    assert warning.tier_index == 0 and "below provider cost" in warning.message


async def test_versions_page_newest_first(pricing: Stub) -> None:
    base = datetime.now(UTC) + timedelta(minutes=5)
    for i in range(4):
        await publish(pricing, f"p-{i}", catalog_draft(), base + timedelta(minutes=i))
    seen: list[int] = []
    token = ""
    while True:
        reply = await pricing.ListPriceBookVersions(
            pb.ListPriceBookVersionsRequest(page_size=2, page_token=token))
        seen.extend(v.version for v in reply.versions)
        token = reply.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]


async def test_credit_packages_come_from_the_book_in_force(pricing: Stub) -> None:
    def fewer(draft: pb.PriceBook) -> None:
        del draft.packages[1:]
        draft.packages[0].bonus_credits_micros = 7_000_000

    first = await pricing.ListCreditPackages(pb.ListCreditPackagesRequest())
    assert first.price_book_version == 1 and len(first.packages) == 4
    await publish(pricing, "p-packages", catalog_draft(fewer), soon(0.5))
    await asyncio.sleep(0.6)  # the book takes effect at a wall-clock instant
    second = await pricing.ListCreditPackages(pb.ListCreditPackagesRequest())
    assert second.price_book_version == 2
    (package,) = second.packages
    assert package.effective_credits_micros == package.credits_micros + 7_000_000


async def test_an_empty_draft_is_refused_and_the_current_book_stays(pricing: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pricing.PublishPriceBook(pb.PublishPriceBookRequest(
            request_id="p-empty", draft=pb.PriceBook(), effective_from=ts(soon(60))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in tally_error(caught.value).violations] == ["draft"]
    assert await versions(pricing) == [1]


def _drop_model(name: str) -> Callable[[pb.PriceBook], None]:
    def edit(draft: pb.PriceBook) -> None:
        kept = [m for m in draft.models if m.model != name]
        del draft.models[:]
        draft.models.extend(kept)
        lines = [x for x in draft.lines if x.model != name]
        del draft.lines[:]
        draft.lines.extend(lines)
        costs = [x for x in draft.costs if x.model != name]
        del draft.costs[:]
        draft.costs.extend(costs)
        for entry in draft.models:  # nothing of the draft may name it any more
            if entry.downgrade_to == name:
                entry.downgrade_to = ""
            fallbacks = [m for m in entry.fallback_models if m != name]
            del entry.fallback_models[:]
            entry.fallback_models.extend(fallbacks)
    return edit


async def test_dropping_a_model_is_refused_unless_the_request_lists_it(
        pricing_with_metering: Stub) -> None:
    pricing = pricing_with_metering
    draft = catalog_draft(_drop_model("gpt-4.1-nano"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(pricing, "p-drop", draft, soon(60))
    violations = tally_error(caught.value).violations
    assert [v.field for v in violations] == ["draft.models"]
    assert "gpt-4.1-nano" in violations[0].description
    assert await versions(pricing) == [1]

    reply = await pricing.PublishPriceBook(pb.PublishPriceBookRequest(
        request_id="p-drop-listed", draft=draft, effective_from=ts(soon(60)),
        removed_models=["gpt-4.1-nano"]))
    assert reply.book.version == 2
    assert all(m.model != "gpt-4.1-nano" for m in reply.book.models)


async def test_a_meter_no_longer_priced_is_refused_unless_the_request_lists_it(
        pricing_with_metering: Stub) -> None:
    pricing = pricing_with_metering
    def drop_gpu(draft: pb.PriceBook) -> None:
        lines = [x for x in draft.lines if x.meter != common_pb2.METER_GPU_MINUTES]
        del draft.lines[:]
        draft.lines.extend(lines)

    draft = catalog_draft(drop_gpu)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(pricing, "p-gpu", draft, soon(60))
    assert [v.field for v in tally_error(caught.value).violations] == ["draft.lines"]
    reply = await pricing.PublishPriceBook(pb.PublishPriceBookRequest(
        request_id="p-gpu-listed", draft=draft, effective_from=ts(soon(60)),
        removed_meters=[common_pb2.METER_GPU_MINUTES]))
    assert reply.book.version == 2
