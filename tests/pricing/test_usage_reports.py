"""SimulatePriceChange and MarginReport over usage really recorded by metering.

Pricing, ledger and metering run in process against one database; usage goes in through
metering's RecordUsage (rated, debited) and pricing reads it back through ExportUsage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.ledger.server import build as build_ledger
from services.metering.server import build_for as build_metering
from services.pricing.server import build_for as build_pricing
from tally.common.v1 import common_pb2
from tally.kit.config import load_kit_config
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.pricing.v1 import pricing_pb2 as pb
from tally.sdk.client import TallyClient
from tests.metering.conftest import free_port
from tests.pricing.conftest import catalog_draft, line, scale_rates, ts

CREDIT = 1_000_000


@pytest.fixture
async def tally(db_url: str) -> AsyncIterator[TallyClient]:
    config = dataclasses.replace(load_kit_config({}), pricing_port=free_port(),
                                 ledger_port=free_port(), metering_port=free_port(),
                                 database_url=db_url, migrate_on_start=False)
    servers: list[RunningServer] = []
    try:
        # Pricing stops first with a short grace: metering's price book watch only ends when
        # pricing ends the stream (or at its lifetime cap).
        servers.append(await start_server(await build_pricing(db_url, config),
                                          port=config.pricing_port, grace_seconds=0.5))
        servers.append(await start_server(await build_ledger(config), port=config.ledger_port))
        servers.append(await start_server(await build_metering(db_url, config),
                                          port=config.metering_port))
        async with TallyClient({s: config.address_of(s) for s in
                                ("pricing", "ledger", "metering")},
                               actor="service:test") as client:
            yield client
    finally:
        for server in servers:
            await server.stop()


def event(event_id: str, org: str, model: str, input_tokens: int, output_tokens: int,
          at: datetime) -> mpb.UsageEvent:
    usage = mpb.UsageEvent(
        event_id=event_id, model=model, operation=mpb.OPERATION_CHAT,
        context=common_pb2.RequestContext(org_id=org),
        quantities=[
            common_pb2.MeterQuantity(meter=common_pb2.METER_INPUT_TOKENS, quantity=input_tokens),
            common_pb2.MeterQuantity(meter=common_pb2.METER_OUTPUT_TOKENS,
                                     quantity=output_tokens)])
    usage.occurred_at.FromDatetime(at)
    return usage


async def record(tally: TallyClient, events: list[mpb.UsageEvent]) -> list[mpb.Receipt]:
    for org in sorted({e.context.org_id for e in events}):
        await tally.ledger.Transfer(lpb.TransferRequest(
            transfer_id=f"fund-{org}", org_id=org, kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=1_000 * CREDIT, reason="test funding"))
    reply = await tally.metering.RecordUsage(mpb.RecordUsageRequest(events=events))
    assert all(r.status == mpb.EVENT_STATUS_ACCEPTED for r in reply.results), reply
    return [r.receipt for r in reply.results]


def window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=2), now + timedelta(minutes=1)


async def test_simulating_doubled_rates_doubles_each_orgs_charge(tally: TallyClient) -> None:
    start, end = window()
    at = datetime.now(UTC) - timedelta(minutes=30)
    receipts = await record(tally, [
        event("a-1", "acme", "gpt-4.1-mini", 120_000, 30_000, at),
        event("a-2", "acme", "gpt-4.1", 10_000, 2_000, at + timedelta(seconds=1)),
        event("b-1", "bolt", "gpt-4.1-mini", 50_000, 50_000, at + timedelta(seconds=2)),
    ])
    charged = {"acme": receipts[0].cost_micros + receipts[1].cost_micros,
               "bolt": receipts[2].cost_micros}
    reply = await tally.pricing.SimulatePriceChange(pb.SimulatePriceChangeRequest(
        draft=catalog_draft(scale_rates(2)), start_time=ts(start), end_time=ts(end),
        org_id="acme"))
    (delta,) = reply.deltas
    assert delta.org_id == "acme" and delta.events == 2 and delta.unrated_events == 0
    assert delta.current_micros == charged["acme"]
    assert delta.simulated_micros == 2 * charged["acme"]
    assert delta.delta_micros == charged["acme"]

    every_org = await tally.pricing.SimulatePriceChange(pb.SimulatePriceChangeRequest(
        draft=catalog_draft(scale_rates(2)), start_time=ts(start), end_time=ts(end)))
    assert {d.org_id: d.current_micros for d in every_org.deltas} == charged


async def test_margin_report_gives_revenue_cost_and_margin_per_model_and_provider(
    tally: TallyClient,
) -> None:
    start, end = window()
    at = datetime.now(UTC) - timedelta(minutes=10)
    receipts = await record(tally, [
        event("m-1", "acme", "gpt-4.1-mini", 1_000_000, 100_000, at),
        event("m-2", "bolt", "gpt-4.1-mini-latest", 1_000_000, 100_000, at),
        event("m-3", "acme", "claude-sonnet-4", 10_000, 1_000, at),
    ])
    book = catalog_draft()
    cost_rates = {(c.model, c.meter): Decimal(c.cost_rate) for c in book.costs
                  if c.mode == common_pb2.USAGE_MODE_ONLINE}
    assert line(book, "gpt-4.1-mini/input_tokens/online").tiers[0].rate == "50"
    reply = await tally.pricing.MarginReport(pb.MarginReportRequest(
        start_time=ts(start), end_time=ts(end)))
    rows = {(r.model, r.provider): r for r in reply.rows}
    mini = rows[("gpt-4.1-mini", "openai")]
    assert mini.revenue_micros == receipts[0].cost_micros + receipts[1].cost_micros
    expected_cost = 2 * (cost_rates[("gpt-4.1-mini", common_pb2.METER_INPUT_TOKENS)]
                         + cost_rates[("gpt-4.1-mini", common_pb2.METER_OUTPUT_TOKENS)] // 10)
    assert mini.cost_micros == expected_cost * CREDIT
    assert mini.margin_micros == mini.revenue_micros - mini.cost_micros
    assert mini.margin_bps == mini.margin_micros * 10_000 // mini.revenue_micros
    assert ("claude-sonnet-4", "anthropic") in rows
    assert [r.model for r in reply.rows] == sorted(r.model for r in reply.rows)
