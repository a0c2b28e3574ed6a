"""Composition root of the pricing service.

config -> pool -> store -> cache -> Pricing (bootstrapped with the default catalog on an empty
database) -> servicer -> ServiceApp, plus two background loops: the change feed (LISTEN) and
the refresher that turns its wake-ups (or a periodic poll) into cache updates.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Final

import grpc

from tally.kit import db
from tally.kit.background import run_when_notified
from tally.kit.channels import peer_channel
from tally.kit.config import (
    KitConfig,
    load,
    parse_path,
    parse_positive_int,
    setting,
)
from tally.kit.log import get_logger
from tally.kit.readiness import postgres_probe
from tally.kit.server import ServiceApp, run_service
from tally.metering.v1 import metering_pb2_grpc
from tally.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from tally.rating import DEFAULT_CATALOG, load_catalog

from .adapters import GrpcUsageSource
from .domain import BookCache, Pricing
from .servicer import PricingServicer
from .store import CHANNEL, PriceBookPgStore

NAME = "pricing"
SERVICE_NAME = pricing_pb2.DESCRIPTOR.services_by_name["PricingService"].full_name
log = get_logger("pricing.server")

DEFAULT_CUSTOM_CREDIT_PRICE_MINOR: Final = {"USD": Decimal(1)}
"""The default catalog's unit: 1 credit = 1 US cent."""


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """Pricing's own settings (TALLY_PRICING_*)."""

    catalog_path: Path = setting(  # noqa: RUF009 - `setting` returns a field()
        "TALLY_PRICING_CATALOG", parse_path, "a price book JSON file",
        default=DEFAULT_CATALOG)
    watch_lifetime_s: int = setting(
        "TALLY_PRICING_WATCH_LIFETIME_S", parse_positive_int, "seconds > 0", default=300)
    max_watchers: int = setting(
        "TALLY_PRICING_MAX_WATCHERS", parse_positive_int, "an integer > 0", default=1000)
    refresh_interval_ms: int = setting(
        "TALLY_PRICING_REFRESH_INTERVAL_MS", parse_positive_int,
        "milliseconds > 0: how often to refresh when no notification came (a safety net)",
        default=30_000)
    max_report_events: int = setting(
        "TALLY_PRICING_MAX_REPORT_EVENTS", parse_positive_int, "an integer > 0",
        default=2_000_000)


async def build(config: KitConfig, settings: PricingConfig | None = None) -> ServiceApp:
    """Wires pricing; publishes the default catalog as version 1 on an empty database."""
    settings = settings or load(PricingConfig)
    url, pool = await db.open_service_database(NAME, config)
    store = PriceBookPgStore(pool, db.asyncpg_url(url))
    metering_channel = peer_channel(config.address_of("metering"))
    cache = BookCache(max_watchers=settings.max_watchers)
    pricing = Pricing(store, GrpcUsageSource(metering_pb2_grpc.MeteringServiceStub(
        metering_channel)), cache, max_report_events=settings.max_report_events)
    await pricing.bootstrap(load_catalog(settings.catalog_path), DEFAULT_CUSTOM_CREDIT_PRICE_MINOR)
    shutting_down = asyncio.Event()
    servicer = PricingServicer(pricing, watch_lifetime_s=settings.watch_lifetime_s,
                               shutting_down=shutting_down)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start_loops() -> None:
        # runs on the store's NOTIFY (by any replica); the interval is only a safety net
        tasks.append(asyncio.create_task(run_when_notified(
            "price-book", pricing.refresh, stop, listen=(url, CHANNEL),
            safety_interval_s=settings.refresh_interval_ms / 1000, min_interval_s=0.0),
            name="price-book-refresher"))

    async def close() -> None:
        stop.set()
        cache.close_subscribers()
        await asyncio.gather(*tasks)
        await metering_channel.close()
        await pool.close()

    def register(server: grpc.aio.Server) -> None:
        pricing_pb2_grpc.add_PricingServiceServicer_to_server(servicer, server)

    return ServiceApp(name=NAME, service_names=[SERVICE_NAME], register=register,
                      audit_database_url=url,
                      on_start=[start_loops], on_stop=[close], shutting_down=shutting_down,
                      readiness_probes=[postgres_probe(pool)])


async def build_for(database_url: str, config: KitConfig | None = None,
                    settings: PricingConfig | None = None) -> ServiceApp:
    """`build` against an already migrated database, other settings from `config` or defaults."""
    return await build(db.on_database(database_url, config), settings)


def main() -> None:
    """Runs the pricing service until SIGTERM/SIGINT."""
    run_service(NAME, build)
