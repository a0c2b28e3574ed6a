"""Data residency with two databases as two regions: one ledger and one metering process
serve both, and nothing about an EU org is written to the US database (or the other way);
a process without a region's database refuses that region's orgs, naming the region."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.ledger.server import LedgerConfig
from services.ledger.server import build_regions as build_ledger
from services.metering.server import build_regions as build_metering
from services.notifier.server import build_regions as build_notifier
from services.pricing.server import build_for as build_pricing
from tally.accounts.v1 import accounts_pb2 as apb
from tally.common.v1 import common_pb2 as cpb
from tally.kit import db
from tally.kit.config import KitConfig, load, load_kit_config
from tally.kit.errors import Reason, TallyError
from tally.kit.infra import free_port
from tally.kit.regions import ROUTE_HEADER
from tally.kit.server import start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.ledger.v1 import ledger_pb2_grpc
from tally.metering.v1 import metering_pb2 as mpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.sdk.client import TallyClient
from tests.conftest import fresh_database
from tests.ledger.payments_support import PACKAGE, PACKAGE_BONUS, PACKAGE_CREDITS, SECRET, signed
from tests.metering.test_authorize import ask
from tests.metering.test_ingestion import ACCEPTED, usage

from .conftest import Identities

EU, US = "eu-west", "us-east"
CREDIT = 1_000_000


@pytest.fixture
async def regions(server_url: str, template_url: str) -> AsyncIterator[dict[str, str]]:
    """Two migrated databases on the one server, standing for two regions."""
    async with (fresh_database(server_url, template_url, prefix="tally_region_eu") as eu,
                fresh_database(server_url, template_url, prefix="tally_region_us") as us):
        yield {EU: eu, US: us}


async def two_regions(ids: Identities, regions: dict[str, str]) -> KitConfig:
    """Accounts places "yankee" in US ("acme" is EU, the tests' default region); the config of
    a process serving both regions, each service on a free port."""
    await ids.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id="yankee", name="Yankee", region=US, seat_limit=2, owner_subject="o@y.test"))
    return dataclasses.replace(
        load_kit_config({}), pricing_port=free_port(), ledger_port=free_port(),
        metering_port=free_port(), notifier_port=free_port(), accounts_address=ids.address,
        migrate_on_start=False, region_databases=regions)


async def rows_of(url: str, org: str, schemas: tuple[str, ...] = ("ledger", "metering")
                  ) -> dict[str, int]:
    """Rows naming `org` in every table of `schemas` in the database at `url`."""
    conn = await asyncpg.connect(db.asyncpg_url(url))
    try:
        tables = await conn.fetch(
            "SELECT c.table_schema, c.table_name FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.column_name = 'org_id' AND t.table_type = 'BASE TABLE' "
            "AND c.table_schema = ANY($1::text[])", list(schemas))
        found = {}
        for schema, table in tables:
            count = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}"."{table}" WHERE org_id::text = $1', org)
            if count:
                found[f"{schema}.{table}"] = count
        return found
    finally:
        await conn.close()


async def test_each_orgs_rows_live_only_in_its_regions_database(
        ids: Identities, db_url: str, regions: dict[str, str]) -> None:
    config = await two_regions(ids, regions)
    pricing = await start_server(await build_pricing(db_url), port=config.pricing_port)
    ledger = await start_server(await build_ledger(config), port=config.ledger_port)
    metering = await start_server(await build_metering(config), port=config.metering_port)
    client = TallyClient({s: config.address_of(s) for s in ("pricing", "ledger", "metering")},
                         actor="service:test")
    try:
        for org in ("acme", "yankee"):
            await client.ledger.Transfer(lpb.TransferRequest(
                transfer_id=f"fund-{org}", org_id=org, amount_micros=50 * CREDIT,
                kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, reason="residency test"))
            decision = await client.metering.Authorize(ask(f"auth-{org}", org))
            assert decision.decision == mpb.DECISION_ALLOW, decision
            recorded = await client.metering.RecordUsage(mpb.RecordUsageRequest(
                events=[usage(f"event-{org}", org)]))
            assert [r.status for r in recorded.results] == [ACCEPTED]
            got = await client.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))
            assert 0 < got.balance.available_micros < 50 * CREDIT
        in_eu, in_us = await rows_of(regions[EU], "acme"), await rows_of(regions[US], "acme")
        assert in_us == {}, f"EU org rows in the US database: {in_us}"
        assert {"ledger", "metering"} <= {table.split(".")[0] for table in in_eu}, in_eu
        yankee_eu, yankee_us = (await rows_of(regions[EU], "yankee"),
                                await rows_of(regions[US], "yankee"))
        assert yankee_eu == {}, f"US org rows in the EU database: {yankee_eu}"
        assert {"ledger", "metering"} <= {table.split(".")[0] for table in yankee_us}
        assert await rows_of(db_url, "acme") == {} and await rows_of(db_url, "yankee") == {}

        # what uses a model is every region's business: pricing asks (naming no org) before
        # it drops one, and the home region alone knows only acme's event
        in_use = await client.metering.GetPricingUse(mpb.GetPricingUseRequest(
            models=["gpt-4.1-mini", "unused-model"], meters=[cpb.METER_INPUT_TOKENS]))
        assert [(u.item, u.recent_events) for u in in_use.uses] == [
            ("model gpt-4.1-mini", 2), ("meter input_tokens", 2)], in_use

        # an event stream names no org: the region header picks whose events (metering's
        # copy for a region follows its region's ledger events this way)
        async with grpc.aio.insecure_channel(config.address_of("ledger")) as channel:
            ledger_stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            for region, org in ((US, "yankee"), (EU, "acme")):
                stream = ledger_stub.StreamEvents(lpb.StreamEventsRequest(),
                                                  metadata=((ROUTE_HEADER, region),))
                first = await stream.read()
                stream.cancel()
                assert {e.org_id for e in first.events} == {org}, (region, first)

        # one call naming orgs of two regions would write to both: refused, nothing written
        batch = lpb.TransferBatchRequest(transfers=[
            lpb.TransferRequest(transfer_id="mixed-1", org_id="acme", amount_micros=CREDIT,
                                kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, reason="mixed"),
            lpb.TransferRequest(transfer_id="mixed-2", org_id="yankee", amount_micros=CREDIT,
                                kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, reason="mixed")])
        with pytest.raises(TallyError) as mixed:
            await client.ledger.TransferBatch(batch)
        assert mixed.value.reason is Reason.WRONG_REGION
        assert "different regions" in mixed.value.message
        assert {t: n for t, n in (await rows_of(regions[EU], "acme")).items()
                if t.startswith("ledger.")} == {t: n for t, n in in_eu.items()
                                                 if t.startswith("ledger.")}
        # an org accounts never created has no region, so no database to write to
        with pytest.raises(TallyError) as unknown:
            await client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="nobody"))
        assert unknown.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "'nobody' is not known to accounts" in unknown.value.message
    finally:
        await client.close()
        for server in (metering, ledger, pricing):
            await server.stop()


async def test_a_process_without_a_regions_database_refuses_its_orgs(
        ids: Identities, regions: dict[str, str]) -> None:
    config = dataclasses.replace(
        load_kit_config({}), ledger_port=free_port(), accounts_address=ids.address,
        migrate_on_start=False, region_databases={US: regions[US]})
    ledger = await start_server(await build_ledger(config), port=config.ledger_port)
    client = TallyClient({"ledger": config.address_of("ledger")}, actor="service:test")
    try:
        with pytest.raises(TallyError) as refused:
            await client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="acme"))
        error = refused.value
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason is Reason.WRONG_REGION
        assert error.metadata == {"org_id": "acme", "region": EU}
        assert "org 'acme' lives in region 'eu-west'" in error.message
        with pytest.raises(TallyError) as write:
            await client.ledger.Transfer(lpb.TransferRequest(
                transfer_id="t-1", org_id="acme", amount_micros=CREDIT,
                kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, reason="wrong region"))
        assert write.value.reason is Reason.WRONG_REGION
        assert await rows_of(regions[US], "acme") == {}
    finally:
        await client.close()
        await ledger.stop()


async def ledger_rows(url: str) -> dict[str, int]:
    """The row count of every ledger table in the database at `url` but outbox_cursors (the
    top-up worker's place in the outbox, which it writes on its own schedule whatever the
    calls do)."""
    conn = await asyncpg.connect(db.asyncpg_url(url))
    try:
        tables = await conn.fetch("SELECT table_name FROM information_schema.tables "
                                  "WHERE table_schema = 'ledger' AND table_type = 'BASE TABLE' "
                                  "AND table_name <> 'outbox_cursors'")
        return {t: await conn.fetchval(f'SELECT count(*) FROM ledger."{t}"')
                for (t,) in tables}
    finally:
        await conn.close()


async def test_id_only_calls_find_their_order_in_any_region_and_write_only_there(
        ids: Identities, regions: dict[str, str]) -> None:
    """ApproveManualPayment and Refund name a payment order, not an org: the home region (EU)
    answers NOT_FOUND for a US order, so the call is asked of the US copy, which does it; the
    EU database is left exactly as it was. An id no region knows is NOT_FOUND."""
    config = await two_regions(ids, regions)
    ledger = await start_server(await build_ledger(config), port=config.ledger_port)
    client = TallyClient({"ledger": config.address_of("ledger")}, actor="service:test")
    try:
        eu_before = await ledger_rows(regions[EU])
        recorded = await client.ledger.RecordManualPayment(lpb.RecordManualPaymentRequest(
            payment_order_id="bank-us-1", org_id="yankee", amount_minor=10_000,
            currency="USD", credits_micros=100 * CREDIT, reference="wire #1",
            method=lpb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER,
            context=cpb.RequestContext(actor="user:bob-billing")))
        assert recorded.order.org_id == "yankee"
        approved = await client.ledger.ApproveManualPayment(lpb.ApproveManualPaymentRequest(
            payment_order_id="bank-us-1", context=cpb.RequestContext(actor="user:alice-fin")))
        assert approved.order.state == lpb.PAYMENT_ORDER_STATE_SUCCEEDED, approved.order
        balance = await client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="yankee"))
        assert balance.balance.available_micros == 100 * CREDIT
        refunded = await client.ledger.Refund(lpb.RefundRequest(
            refund_id="refund-us-1", payment_order_id="bank-us-1", amount_micros=40 * CREDIT,
            reason="asked", context=cpb.RequestContext(actor="user:carol-support")))
        assert refunded.reversed_micros == 40 * CREDIT, refunded
        balance = await client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="yankee"))
        assert balance.balance.available_micros == 60 * CREDIT
        # a retry of the same refund is answered from the US region, not charged again
        again = await client.ledger.Refund(lpb.RefundRequest(
            refund_id="refund-us-1", payment_order_id="bank-us-1", amount_micros=40 * CREDIT,
            reason="asked", context=cpb.RequestContext(actor="user:carol-support")))
        assert again.transfer == refunded.transfer
        for unknown in (
            client.ledger.ApproveManualPayment(lpb.ApproveManualPaymentRequest(
                payment_order_id="nowhere", context=cpb.RequestContext(actor="user:al"))),
            client.ledger.Refund(lpb.RefundRequest(
                refund_id="refund-nowhere", payment_order_id="nowhere", amount_micros=CREDIT,
                reason="asked", context=cpb.RequestContext(actor="user:carol-support")))):
            with pytest.raises(TallyError) as missing:
                await unknown
            assert missing.value.code is grpc.StatusCode.NOT_FOUND, missing.value
        assert await ledger_rows(regions[EU]) == eu_before
        assert await rows_of(regions[EU], "yankee") == {}
    finally:
        await client.close()
        await ledger.stop()


async def test_the_notifiers_rules_and_secrets_live_only_in_their_orgs_region(
        ids: Identities, regions: dict[str, str]) -> None:
    """Alert rules (their webhook URLs and signing secrets) are an org's data: one notifier
    process serving both regions keeps each org's in its region's database, and refuses an
    org accounts never placed."""
    config = await two_regions(ids, regions)
    notifier = await start_server(await build_notifier(config), port=config.notifier_port)
    client = TallyClient({"notifier": config.address_of("notifier")}, actor="service:test")
    try:
        for org in ("acme", "yankee"):
            await client.notifier.CreateAlertRule(npb.CreateAlertRuleRequest(
                request_id=f"rule-{org}", rule=npb.AlertRule(
                    org_id=org, types=[npb.NOTIFICATION_TYPE_LOW_BALANCE],
                    channel=npb.CHANNEL_WEBHOOK, webhook_url="https://hooks.example.com/t",
                    low_balance_threshold_micros=CREDIT, enabled=True)))
            await client.notifier.RotateWebhookSecret(npb.RotateWebhookSecretRequest(
                request_id=f"secret-{org}", org_id=org))
            listed = await client.notifier.ListAlertRules(npb.ListAlertRulesRequest(
                org_id=org))
            assert [r.org_id for r in listed.rules] == [org]
        schemas = ("notifier",)
        assert await rows_of(regions[US], "acme", schemas) == {}
        assert await rows_of(regions[EU], "yankee", schemas) == {}
        assert await rows_of(regions[EU], "acme", schemas)
        assert await rows_of(regions[US], "yankee", schemas)
        with pytest.raises(TallyError) as unknown:
            await client.notifier.ListAlertRules(npb.ListAlertRulesRequest(org_id="nobody"))
        assert unknown.value.reason is Reason.WRONG_REGION
    finally:
        await client.close()
        await notifier.stop()


async def test_a_provider_webhook_over_grpc_is_applied_in_its_orders_region_only(
        ids: Identities, db_url: str, regions: dict[str, str]) -> None:
    """ConfirmPayment carries neither an org nor an order id outside its signed payload: the
    home region (EU) must not record a US order's event as one it ignored; the US copy
    credits it, once, and the EU database is left exactly as it was."""
    config = await two_regions(ids, regions)
    settings = dataclasses.replace(load(LedgerConfig), webhook_secrets=(SECRET,))
    pricing = await start_server(await build_pricing(db_url), port=config.pricing_port)
    ledger = await start_server(await build_ledger(config, settings), port=config.ledger_port)
    client = TallyClient({"ledger": config.address_of("ledger")}, actor="service:test")
    try:
        order = (await client.ledger.Purchase(lpb.PurchaseRequest(
            payment_order_id="po-us-1", org_id="yankee", package_id=PACKAGE,
            context=cpb.RequestContext(actor="user:alice")))).order
        eu_before = await ledger_rows(regions[EU])
        body = json.dumps({
            "object": "event", "id": "evt_us_1", "type": "checkout.session.completed",
            "created": int(time.time()), "data": {"object": {
                "id": "cs_us_1", "client_reference_id": "po-us-1",
                "amount_total": order.amount_minor, "currency": order.currency.lower()}}},
        ).encode()
        answers = [await client.ledger.ConfirmPayment(lpb.ConfirmPaymentRequest(
            provider="local", payload=body, signature_header=signed(body)))
            for _ in range(2)]
        assert [a.processed_first_time for a in answers] == [True, False]
        assert answers[0].order.state == lpb.PAYMENT_ORDER_STATE_SUCCEEDED, answers[0]
        balance = await client.ledger.GetBalance(lpb.GetBalanceRequest(org_id="yankee"))
        assert balance.balance.posted_micros == PACKAGE_CREDITS + PACKAGE_BONUS
        assert await ledger_rows(regions[EU]) == eu_before
        # an event for an order no region has: NOT_FOUND, recorded nowhere
        stray = body.replace(b"po-us-1", b"po-nowhere").replace(b"evt_us_1", b"evt_stray")
        with pytest.raises(TallyError) as missing:
            await client.ledger.ConfirmPayment(lpb.ConfirmPaymentRequest(
                provider="local", payload=stray, signature_header=signed(stray)))
        assert missing.value.code is grpc.StatusCode.NOT_FOUND, missing.value
        assert await ledger_rows(regions[EU]) == eu_before
    finally:
        await client.close()
        for server in (ledger, pricing):
            await server.stop()
