"""Data residency with two databases as two regions: one ledger and one metering process
serve both, and nothing about an EU org is written to the US database (or the other way);
a process without a region's database refuses that region's orgs, naming the region."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.ledger.server import build_regions as build_ledger
from services.metering.server import build_regions as build_metering
from services.pricing.server import build_for as build_pricing
from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit import db
from tally.kit.config import load_kit_config
from tally.kit.errors import Reason, TallyError
from tally.kit.infra import free_port
from tally.kit.regions import ROUTE_HEADER
from tally.kit.server import start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.ledger.v1 import ledger_pb2_grpc
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient
from tests.conftest import fresh_database
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


async def rows_of(url: str, org: str) -> dict[str, int]:
    """Rows naming `org` in every ledger and metering table of the database at `url`."""
    conn = await asyncpg.connect(db.asyncpg_url(url))
    try:
        tables = await conn.fetch(
            "SELECT c.table_schema, c.table_name FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.column_name = 'org_id' AND t.table_type = 'BASE TABLE' "
            "AND c.table_schema IN ('ledger', 'metering')")
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
    await ids.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id="yankee", name="Yankee", region=US, seat_limit=2, owner_subject="o@y.test"))
    config = dataclasses.replace(
        load_kit_config({}), pricing_port=free_port(), ledger_port=free_port(),
        metering_port=free_port(), accounts_address=ids.address, migrate_on_start=False,
        region_databases=regions)
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
