"""The first real call of pricing, metering and notifier, through real servers and Postgres.

Each test starts its service in process on port 0 against a fresh, migrated database and calls
it through the generated grpc.aio stubs, so the kit's interceptor, error mapping and the
service's store all take part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from services.metering.server import build as build_metering
from services.notifier.server import build as build_notifier
from services.pricing.server import build as build_pricing
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.errors import from_rpc_error
from tally.kit.server import ServiceApp, start_server
from tally.metering.v1 import metering_pb2, metering_pb2_grpc
from tally.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from tally.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from tally.rating import load_catalog

Build = Callable[[KitConfig], Awaitable[ServiceApp]]


@asynccontextmanager
async def serving(build: Build, db_url: str) -> AsyncIterator[grpc.aio.Channel]:
    """The service `build` makes, started on port 0, and a channel to it.

    Metering will not serve without a price book, so pricing is started beside it (and
    stopped first, with a short grace, since it holds metering's price book watch open).
    """
    config = dataclasses.replace(load_kit_config({}), database_url=db_url, migrate_on_start=False)
    pricing = None
    if build is build_metering:
        pricing = await start_server(await build_pricing(config), port=0, grace_seconds=0.5)
        config = dataclasses.replace(config, pricing_port=pricing.port)
    running = await start_server(await build(config), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel
    finally:
        if pricing is not None:
            await pricing.stop()
        await running.stop()


def assert_invalid(exc: grpc.aio.AioRpcError, field: str) -> None:
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    error = from_rpc_error(exc)
    assert error is not None, "the status carries Tally's ErrorInfo"
    assert field in [v.field for v in error.violations], error.violations


# --- pricing ---------------------------------------------------------------------------------


async def test_list_credit_packages_answers_the_catalog_with_bonus_in_effective_credits(
    db_url: str,
) -> None:
    catalog = load_catalog().packages
    async with serving(build_pricing, db_url) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        response = await stub.ListCreditPackages(pricing_pb2.ListCreditPackagesRequest())

    assert len(response.packages) == 4
    assert [p.package_id for p in response.packages] == [p.package_id for p in catalog]
    for sent, source in zip(response.packages, catalog, strict=True):
        assert sent.effective_credits_micros == sent.credits_micros + sent.bonus_credits_micros
        assert sent.credits_micros == source.credits_micros
        assert sent.bonus_credits_micros == source.bonus_credits_micros
        assert sent.price_minor == source.price_minor
        assert sent.cost_per_credit_minor == str(source.cost_per_credit_minor)
        assert sent.tier != pricing_pb2.PACKAGE_TIER_UNSPECIFIED
    assert response.next_page_token == ""
    assert response.price_book_version == 1, "the default catalog is published as version 1"


async def test_list_credit_packages_pages_through_every_package_once(db_url: str) -> None:
    async with serving(build_pricing, db_url) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        first = await stub.ListCreditPackages(pricing_pb2.ListCreditPackagesRequest(page_size=3))
        second = await stub.ListCreditPackages(
            pricing_pb2.ListCreditPackagesRequest(page_size=3, page_token=first.next_page_token)
        )

    assert len(first.packages) == 3 and first.next_page_token
    assert len(second.packages) == 1 and second.next_page_token == ""
    ids = [p.package_id for p in [*first.packages, *second.packages]]
    assert ids == [p.package_id for p in load_catalog().packages]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
async def test_list_credit_packages_rejects_bad_paging_naming_the_field(
    db_url: str, request_fields: dict[str, Any], field: str
) -> None:
    async with serving(build_pricing, db_url) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListCreditPackages(pricing_pb2.ListCreditPackagesRequest(**request_fields))
    assert_invalid(caught.value, field)


async def test_pricing_bootstraps_the_default_catalog_as_version_1(db_url: str) -> None:
    async with serving(build_pricing, db_url) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        response = await stub.GetPriceBook(pricing_pb2.GetPriceBookRequest())
    assert response.book.version == 1
    assert len(response.book.lines) == len(load_catalog().lines)


# --- metering --------------------------------------------------------------------------------

_USAGE_COLUMNS = (
    "org_id", "day", "user_id", "model", "operation", "meter",
    "quantity", "credits_micros", "event_count",
)


async def insert_usage(db_url: str, rows: Sequence[tuple[object, ...]]) -> None:
    """Writes roll-up rows directly (RecordUsage, which maintains them, is a later issue).

    Each event here has exactly the meters listed for its group, so the distinct-event roll-up
    holds each group's largest per-meter count.
    """
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await conn.copy_records_to_table(
            "usage_daily", schema_name="metering", records=rows, columns=_USAGE_COLUMNS
        )
        await conn.execute(
            """
            INSERT INTO metering.usage_daily_events
                   (org_id, day, user_id, model, operation, event_count)
            SELECT org_id, day, user_id, model, operation, max(event_count)
              FROM metering.usage_daily
             GROUP BY org_id, day, user_id, model, operation
            """
        )
    finally:
        await conn.close()


MARCH_USAGE = [
    # org, day, user, model, operation, meter, quantity, credits_micros, events
    ("org-a", date(2026, 3, 1), "u1", "gpt-4.1", "chat", "input_tokens", 1000, 2_000, 2),
    ("org-a", date(2026, 3, 1), "u1", "gpt-4.1", "chat", "output_tokens", 400, 3_200, 2),
    ("org-a", date(2026, 3, 31), "u2", "gpt-4.1", "chat", "input_tokens", 500, 1_000, 1),
    ("org-a", date(2026, 3, 31), "u2", "gpt-4.1", "chat", "output_tokens", 100, 800, 1),
    ("org-a", date(2026, 3, 15), "u1", "text-embed-3", "embedding_write", "input_tokens",
     3000, 60, 3),
    # Outside the question: another month and another org.
    ("org-a", date(2026, 2, 28), "u1", "gpt-4.1", "chat", "input_tokens", 99_999, 99_999, 9),
    ("org-a", date(2026, 4, 1), "u1", "gpt-4.1", "chat", "input_tokens", 99_999, 99_999, 9),
    ("org-b", date(2026, 3, 10), "u9", "gpt-4.1", "chat", "input_tokens", 99_999, 99_999, 9),
]


async def test_usage_summary_sums_each_meter_of_the_org_and_month_only(db_url: str) -> None:
    await insert_usage(db_url, MARCH_USAGE)
    async with serving(build_metering, db_url) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        summary = await stub.GetUsageSummary(
            metering_pb2.GetUsageSummaryRequest(org_id="org-a", year=2026, month=3)
        )

    by_meter = {row.meter: row for row in summary.rows}
    assert set(by_meter) == {common_pb2.METER_INPUT_TOKENS, common_pb2.METER_OUTPUT_TOKENS}
    assert by_meter[common_pb2.METER_INPUT_TOKENS].quantity == 1000 + 500 + 3000
    assert by_meter[common_pb2.METER_INPUT_TOKENS].credits_micros == 2_000 + 1_000 + 60
    assert by_meter[common_pb2.METER_INPUT_TOKENS].event_count == 2 + 1 + 3
    assert by_meter[common_pb2.METER_OUTPUT_TOKENS].quantity == 400 + 100
    assert by_meter[common_pb2.METER_OUTPUT_TOKENS].credits_micros == 3_200 + 800
    assert all(dict(row.key) == {} for row in summary.rows)
    assert summary.total_credits_micros == 2_000 + 3_200 + 1_000 + 800 + 60
    assert {q.meter: q.quantity for q in summary.total_quantities} == {
        common_pb2.METER_INPUT_TOKENS: 4500,
        common_pb2.METER_OUTPUT_TOKENS: 500,
    }
    assert summary.total_event_count == 2 + 1 + 3, "an event with two meters counts once"
    assert not summary.truncated
    assert summary.as_of.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)


async def test_usage_summary_groups_by_model_operation_and_user(db_url: str) -> None:
    await insert_usage(db_url, MARCH_USAGE)
    async with serving(build_metering, db_url) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        summary = await stub.GetUsageSummary(
            metering_pb2.GetUsageSummaryRequest(
                org_id="org-a",
                year=2026,
                month=3,
                group_by=[metering_pb2.USAGE_GROUP_BY_MODEL, metering_pb2.USAGE_GROUP_BY_USER,
                          metering_pb2.USAGE_GROUP_BY_OPERATION],
            )
        )

    got = {
        (row.key["model"], row.key["user"], row.key["operation"], row.meter): row.quantity
        for row in summary.rows
    }
    assert got == {
        ("gpt-4.1", "u1", "OPERATION_CHAT", common_pb2.METER_INPUT_TOKENS): 1000,
        ("gpt-4.1", "u1", "OPERATION_CHAT", common_pb2.METER_OUTPUT_TOKENS): 400,
        ("gpt-4.1", "u2", "OPERATION_CHAT", common_pb2.METER_INPUT_TOKENS): 500,
        ("gpt-4.1", "u2", "OPERATION_CHAT", common_pb2.METER_OUTPUT_TOKENS): 100,
        ("text-embed-3", "u1", "OPERATION_EMBEDDING_WRITE", common_pb2.METER_INPUT_TOKENS): 3000,
    }
    keys = [(row.key["model"], row.key["user"]) for row in summary.rows]
    assert keys == sorted(keys), "rows are ordered by key, then meter"


async def test_usage_summary_filters_by_meter_and_model(db_url: str) -> None:
    await insert_usage(db_url, MARCH_USAGE)
    async with serving(build_metering, db_url) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        summary = await stub.GetUsageSummary(
            metering_pb2.GetUsageSummaryRequest(
                org_id="org-a",
                year=2026,
                month=3,
                group_by=[metering_pb2.USAGE_GROUP_BY_METER],
                filters=metering_pb2.UsageFilter(
                    model="gpt-4.1", meter=common_pb2.METER_OUTPUT_TOKENS
                ),
            )
        )

    assert [(dict(r.key), r.quantity) for r in summary.rows] == [
        ({"meter": "METER_OUTPUT_TOKENS"}, 500)
    ]
    assert summary.total_credits_micros == 4_000
    assert summary.total_event_count == 3


async def test_usage_summary_of_an_org_without_usage_is_empty_with_zero_totals(
    db_url: str,
) -> None:
    async with serving(build_metering, db_url) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        summary = await stub.GetUsageSummary(
            metering_pb2.GetUsageSummaryRequest(org_id="org-a", year=2026, month=12)
        )
    assert list(summary.rows) == []
    assert list(summary.total_quantities) == []
    assert summary.total_credits_micros == 0
    assert summary.total_event_count == 0


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"org_id": "", "year": 2026, "month": 3}, "org_id"),
        ({"org_id": "org-a", "year": 2026, "month": 0}, "month"),
        ({"org_id": "org-a", "year": 2026, "month": 13}, "month"),
        ({"org_id": "org-a", "year": 0, "month": 3}, "year"),
        ({"org_id": "org-a", "year": 2026, "month": 3,
          "group_by": [metering_pb2.USAGE_GROUP_BY_LABEL]}, "label_key"),
        ({"org_id": "org-a", "year": 2026, "month": 3, "label_key": "team",
          "group_by": [metering_pb2.USAGE_GROUP_BY_LABEL, metering_pb2.USAGE_GROUP_BY_USER]},
         "group_by[1]"),
        ({"org_id": "org-a", "year": 2026, "month": 3,
          "group_by": [metering_pb2.USAGE_GROUP_BY_UNSPECIFIED]}, "group_by[0]"),
        ({"org_id": "org-a", "year": 2026, "month": 3,
          "group_by": [metering_pb2.USAGE_GROUP_BY_MODEL, metering_pb2.USAGE_GROUP_BY_MODEL]},
         "group_by[1]"),
        ({"org_id": "org-a", "year": 2026, "month": 3,
          "filters": metering_pb2.UsageFilter(labels={"team": "x"})}, "filters.labels"),
    ],
)
async def test_usage_summary_rejects_bad_input_naming_the_field(
    db_url: str, request_fields: dict[str, Any], field: str
) -> None:
    async with serving(build_metering, db_url) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUsageSummary(metering_pb2.GetUsageSummaryRequest(**request_fields))
    assert_invalid(caught.value, field)


async def test_usage_summary_names_every_bad_field_at_once(db_url: str) -> None:
    async with serving(build_metering, db_url) as channel:
        stub = metering_pb2_grpc.MeteringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUsageSummary(metering_pb2.GetUsageSummaryRequest(month=13))
    error = from_rpc_error(caught.value)
    assert error is not None
    assert [v.field for v in error.violations] == ["org_id", "year", "month"]


# --- notifier --------------------------------------------------------------------------------


async def test_list_alert_rules_is_empty_before_any_rule_exists(db_url: str) -> None:
    async with serving(build_notifier, db_url) as channel:
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        response = await stub.ListAlertRules(notifier_pb2.ListAlertRulesRequest(org_id="org-a"))
    assert list(response.rules) == []
    assert response.next_page_token == ""


async def test_list_alert_rules_pages_live_rules_newest_first(db_url: str) -> None:
    # CreateAlertRule is a later issue: write rows the way it will (body shape of store.py).
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await conn.executemany(
            """
            INSERT INTO notifier.alert_rules
                   (rule_id, org_id, request_id, body, created_at, deleted_at)
            VALUES ($1, $2, $1, $3::jsonb, $4, $5)
            """,
            [
                ("r1", "org-a", '{"types": ["low_balance"], "channel": "webhook", '
                 '"webhook_url": "https://example.test/hook", "enabled": true}',
                 datetime(2026, 1, 1, tzinfo=UTC), None),
                ("r2", "org-a", '{"types": ["budget_threshold", "hard_limit_hit"], '
                 '"channel": "email", "email_to": "ops@example.test", "cooldown_seconds": 600}',
                 datetime(2026, 1, 2, tzinfo=UTC), None),
                ("r3", "org-a", '{"types": ["low_balance"], "channel": "stream"}',
                 datetime(2026, 1, 3, tzinfo=UTC), datetime(2026, 1, 4, tzinfo=UTC)),
                ("r4", "org-b", '{"types": ["low_balance"], "channel": "stream"}',
                 datetime(2026, 1, 5, tzinfo=UTC), None),
            ],
        )
    finally:
        await conn.close()

    async with serving(build_notifier, db_url) as channel:
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        first = await stub.ListAlertRules(
            notifier_pb2.ListAlertRulesRequest(org_id="org-a", page_size=1)
        )
        second = await stub.ListAlertRules(
            notifier_pb2.ListAlertRulesRequest(
                org_id="org-a", page_size=1, page_token=first.next_page_token
            )
        )

    assert [r.rule_id for r in first.rules] == ["r2"] and first.next_page_token
    assert [r.rule_id for r in second.rules] == ["r1"] and second.next_page_token == ""
    newest = first.rules[0]
    assert list(newest.types) == [notifier_pb2.NOTIFICATION_TYPE_BUDGET_THRESHOLD,
                                  notifier_pb2.NOTIFICATION_TYPE_HARD_LIMIT_HIT]
    assert newest.channel == notifier_pb2.CHANNEL_EMAIL
    assert newest.cooldown_seconds == 600
    assert second.rules[0].webhook_url == "https://example.test/hook"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"org_id": ""}, "org_id"),
        ({"org_id": "org-a", "page_size": 1001}, "page_size"),
        ({"org_id": "org-a", "page_token": "!!"}, "page_token"),
    ],
)
async def test_list_alert_rules_rejects_bad_input_naming_the_field(
    db_url: str, request_fields: dict[str, Any], field: str
) -> None:
    async with serving(build_notifier, db_url) as channel:
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListAlertRules(notifier_pb2.ListAlertRulesRequest(**request_fields))
    assert_invalid(caught.value, field)
