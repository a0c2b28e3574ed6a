"""The real pricing, ledger and metering services, in process on free ports, one database."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from services.ledger.server import LedgerConfig
from services.ledger.server import build as build_ledger
from services.metering.server import MeteringConfig, build_for
from services.pricing.server import build_for as build_pricing
from tally.kit.config import KitConfig, load, load_kit_config
from tally.kit.infra import free_port
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.limits import Limiter
from tally.sdk.client import TallyClient

CREDIT = 1_000_000


@dataclass
class Suite:
    """Running servers and a client to all of them."""

    config: KitConfig
    db_url: str
    pricing: RunningServer
    ledger: RunningServer
    metering: RunningServer
    client: TallyClient

    async def fund(self, org: str, credits: int) -> None:
        await self.client.ledger.Transfer(lpb.TransferRequest(
            transfer_id=f"fund-{org}-{credits}", org_id=org,
            kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=credits * CREDIT,
            reason="test funding"))

    async def start_metering_replica(self, limiter: Limiter | None = None
                                     ) -> tuple[RunningServer, TallyClient]:
        """One more metering server on the same database and neighbours, and a client to it
        (the caller stops both)."""
        server = await start_server(await build_for(self.db_url, self.config, MeteringConfig(
            policy_cache_ms=0), limiter), port=0)  # bound by the server: no port race
        config = dataclasses.replace(self.config, metering_port=server.port)
        client = TallyClient({"metering": config.address_of("metering")},
                             actor="service:test")
        return server, client

    async def restart_ledger(self) -> None:
        await self.ledger.stop()
        config = dataclasses.replace(self.config, database_url=self.db_url,
                                     migrate_on_start=False)
        self.ledger = await start_server(await build_ledger(config),
                                         port=self.config.ledger_port)


async def start_suite(db_url: str, metering: MeteringConfig | None = None,
                      limiter: Limiter | None = None) -> Suite:
    # Pricing and the ledger bind port 0 and report the port they got (a port picked free and
    # bound later can be taken in between by a parallel run), each started before the ones
    # that call it. Metering's port alone is picked ahead: pricing calls metering (usage
    # reports, what still uses a model) and metering waits for pricing's book at start.
    config = dataclasses.replace(load_kit_config({}), database_url=db_url,
                                 migrate_on_start=False, metering_port=free_port())
    pricing = await start_server(await build_pricing(db_url, config), port=0)
    config = dataclasses.replace(config, pricing_port=pricing.port)
    # this ledger has a metering: statements and Reconcile itemize usage through it
    ledger = await start_server(await build_ledger(config, dataclasses.replace(
        load(LedgerConfig), itemize_usage=True)), port=0)
    config = dataclasses.replace(config, ledger_port=ledger.port)
    # Tests change policies with SQL behind Authorize's policy cache: no cache unless asked.
    metering = metering or MeteringConfig(policy_cache_ms=0)
    metering_server = await start_server(await build_for(db_url, config, metering, limiter),
                                         port=config.metering_port)
    client = TallyClient({s: config.address_of(s) for s in ("pricing", "ledger", "metering")},
                         actor="service:test")
    return Suite(config, db_url, pricing, ledger, metering_server, client)


async def stop_suite(suite: Suite) -> None:
    await suite.client.close()
    for server in (suite.metering, suite.ledger, suite.pricing):
        await server.stop()


@pytest.fixture
async def suite(db_url: str) -> AsyncIterator[Suite]:
    running = await start_suite(db_url)
    yield running
    await stop_suite(running)
