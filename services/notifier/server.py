"""Composition root of the notifier service: config -> engine -> store -> servicer."""

from __future__ import annotations

import dataclasses

import grpc

from tally.kit import db, infra
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.server import ServiceApp, run_service
from tally.notifier.v1 import notifier_pb2, notifier_pb2_grpc

from .domain import AlertRules
from .servicer import NotifierServicer
from .store import AlertRuleRepository

NAME = "notifier"
SERVICE_NAME = notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name


async def build(config: KitConfig) -> ServiceApp:
    """Migrates the notifier schema (if configured) and wires the alert-rule store."""
    url = config.database_url or infra.start_embedded_postgres(config.data_dir, keep_running=False)
    if config.migrate_on_start:
        await db.migrate_async(NAME, url)
    engine = db.create_engine(url, pool_size=config.db_pool_size)
    # The stubs mark every RPC abstract; the ones not overridden keep the generated base's
    # UNIMPLEMENTED answer on purpose until their issue lands.
    servicer = NotifierServicer(AlertRules(AlertRuleRepository(engine)))  # type: ignore[abstract]

    def register(server: grpc.aio.Server) -> None:
        notifier_pb2_grpc.add_NotifierServiceServicer_to_server(servicer, server)

    return ServiceApp(
        name=NAME, service_names=[SERVICE_NAME], register=register, on_stop=[engine.dispose]
    )


async def build_for(database_url: str) -> ServiceApp:
    """`build` against an already migrated database, with every other setting at its default."""
    config = dataclasses.replace(
        load_kit_config({}), database_url=database_url, migrate_on_start=False
    )
    return await build(config)


def main() -> None:
    """Runs the notifier service until SIGTERM/SIGINT."""
    run_service(NAME, build)
