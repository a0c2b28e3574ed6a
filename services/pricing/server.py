"""Composition root of the pricing service: config -> catalog -> servicer -> ServiceApp."""

from __future__ import annotations

import dataclasses

import grpc

from tally.kit import db, infra
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.server import ServiceApp, run_service
from tally.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from tally.rating import load_catalog

from .domain import CreditPackageCatalog
from .servicer import PricingServicer

NAME = "pricing"
SERVICE_NAME = pricing_pb2.DESCRIPTOR.services_by_name["PricingService"].full_name


async def build(config: KitConfig) -> ServiceApp:
    """Migrates the pricing schema (if configured) and serves the default catalog.

    Nothing reads the database yet — published books arrive with PublishPriceBook — so no
    connection pool is opened; the schema is still migrated so it exists for the writer.
    """
    url = config.database_url or infra.start_embedded_postgres(config.data_dir, keep_running=False)
    if config.migrate_on_start:
        await db.migrate_async(NAME, url)
    # The stubs mark every RPC abstract; the ones not overridden keep the generated base's
    # UNIMPLEMENTED answer on purpose until their issue lands.
    servicer = PricingServicer(CreditPackageCatalog(load_catalog()))  # type: ignore[abstract]

    def register(server: grpc.aio.Server) -> None:
        pricing_pb2_grpc.add_PricingServiceServicer_to_server(servicer, server)

    return ServiceApp(name=NAME, service_names=[SERVICE_NAME], register=register)


async def build_for(database_url: str) -> ServiceApp:
    """`build` against an already migrated database, with every other setting at its default."""
    config = dataclasses.replace(
        load_kit_config({}), database_url=database_url, migrate_on_start=False
    )
    return await build(config)


def main() -> None:
    """Runs the pricing service until SIGTERM/SIGINT."""
    run_service(NAME, build)
