"""Composition root of the notifier service.

config -> engine/pool -> stores -> outbox follower (ledger and metering StreamEvents) ->
delivery worker (webhook and e-mail senders) and the Subscribe hub -> servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

import grpc

from tally.kit import db, regions
from tally.kit.channels import peer_channel
from tally.kit.config import (
    KitConfig,
    load,
    parse_port,
    parse_positive_int,
    setting,
)
from tally.kit.log import get_logger
from tally.kit.readiness import postgres_probe
from tally.kit.secrets import sealer_from_env
from tally.kit.server import ServiceApp, run_service
from tally.ledger.v1 import ledger_pb2_grpc
from tally.metering.v1 import metering_pb2_grpc
from tally.notifier.v1 import notifier_pb2, notifier_pb2_grpc

from .alerting import Notification
from .channels import EmailSender, WebhookSender
from .deliveries import DeliveryWorker
from .delivery_store import DeliveryStore
from .domain import AlertRules, Channel, SigningSecrets
from .follower import Follower, LedgerSource, MeteringSource
from .hub import NotificationHub
from .servicer import NotifierServicer
from .store import AlertRuleRepository, WebhookSecrets

log = get_logger("notifier.server")
NAME = "notifier"
SERVICE_NAME = notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name


@dataclass(frozen=True, slots=True)
class NotifierConfig:
    """Where e-mail goes and how deliveries are paced (TALLY_NOTIFIER_*)."""

    smtp_host: str = setting("TALLY_NOTIFIER_SMTP_HOST", str, "a host name",
                             default="127.0.0.1")
    smtp_port: int = setting("TALLY_NOTIFIER_SMTP_PORT", parse_port, "a port", default=25)
    email_from: str = setting("TALLY_NOTIFIER_EMAIL_FROM", str, "an e-mail address",
                              default="alerts@tally.local")
    first_retry_ms: int = setting(
        "TALLY_NOTIFIER_FIRST_RETRY_MS", parse_positive_int, "milliseconds > 0", default=1000)
    poll_ms: int = setting(
        "TALLY_NOTIFIER_POLL_MS", parse_positive_int, "milliseconds > 0", default=500)


async def build(config: KitConfig, notifier: NotifierConfig | None = None, *,
                region: str = "") -> ServiceApp:
    """Wires the notifier; follows the ledger and metering once serving. With `region` (one
    copy per region, tally.kit.regions), the event streams it follows are that region's
    (its calls name the region), so its deliveries are its region's orgs' only."""
    settings = notifier or load(NotifierConfig)
    url, pool = await db.open_service_database(NAME, config)
    engine = db.create_engine(url, pool_size=config.db_pool_size)
    route = {regions.ROUTE_HEADER: region} if region else None
    ledger_channel = peer_channel(config.address_of("ledger"), route)
    metering_channel = peer_channel(config.address_of("metering"), route)
    sealer = sealer_from_env()
    if sealer is None:
        log.warning("secrets_not_encrypted", detail="no TALLY_KEK / TALLY_KEK_FILE: webhook "
                    "signing secrets and webhook URLs are stored unencrypted")
    deliveries = DeliveryStore(pool, sealer)
    secrets = WebhookSecrets(engine, sealer)
    webhooks = WebhookSender(secrets)
    worker = DeliveryWorker(
        deliveries, {Channel.WEBHOOK: webhooks,
                     Channel.EMAIL: EmailSender(settings.smtp_host, settings.smtp_port,
                                                settings.email_from)},
        first_retry=timedelta(milliseconds=settings.first_retry_ms))
    hub = NotificationHub()

    def on_new(fresh: list[Notification]) -> None:
        hub.publish(fresh)
        worker.wake.set()

    follower = Follower(deliveries, [
        LedgerSource(ledger_pb2_grpc.LedgerServiceStub(ledger_channel)),
        MeteringSource(metering_pb2_grpc.MeteringServiceStub(metering_channel))], on_new)
    stop = asyncio.Event()
    shutting_down = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    servicer = NotifierServicer(
        AlertRules(AlertRuleRepository(engine, sealer)), deliveries=deliveries, hub=hub,
        secrets=SigningSecrets(secrets), on_replayed=worker.wake.set,
        shutting_down=shutting_down)

    def register(server: grpc.aio.Server) -> None:
        notifier_pb2_grpc.add_NotifierServiceServicer_to_server(servicer, server)

    async def start() -> None:
        tasks.append(asyncio.create_task(follower.run(stop), name="outbox-follower"))
        tasks.append(asyncio.create_task(worker.run(stop, settings.poll_ms / 1000),
                                         name="delivery-worker"))

    async def close() -> None:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await webhooks.close()
        await ledger_channel.close()
        await metering_channel.close()
        await pool.close()
        await engine.dispose()

    return ServiceApp(name=NAME, service_names=[SERVICE_NAME], register=register,
                      audit_database_url=url,
                      on_start=[start], on_stop=[close], shutting_down=shutting_down,
                      readiness_probes=[postgres_probe(pool)])


async def build_for(database_url: str, config: KitConfig | None = None,
                    notifier: NotifierConfig | None = None) -> ServiceApp:
    """`build` against an already migrated database, other settings from `config` or
    defaults."""
    return await build(db.on_database(database_url, config), notifier)


async def build_regions(config: KitConfig) -> ServiceApp:
    """The notifier of every region of TALLY_REGION_DATABASES in one process, each on its own
    database and following its region's ledger and metering events (tally.kit.regions):
    alert rules, signing secrets and deliveries are an org's data and stay in its region.
    Without it, `build`."""
    settings = load(NotifierConfig)

    async def one(region_config: KitConfig, region: str, index: int) -> ServiceApp:
        return await build(region_config, settings, region=region)

    return await regions.build_regional(config, one)


def main() -> None:
    """Runs the notifier service until SIGTERM/SIGINT."""
    run_service(NAME, build_regions)
