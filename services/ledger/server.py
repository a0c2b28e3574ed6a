"""Composition root of the ledger: config, pool, stores, payments, servicer, background work.

Besides its gRPC port the ledger serves the payment provider's webhooks over HTTP (an aiohttp
server, TALLY_LEDGER_WEBHOOK_PORT) and, with the default local provider, the provider's hosted
checkout pages (TALLY_LEDGER_CHECKOUT_PORT).
"""

from __future__ import annotations

import asyncio
import gc
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.ledger import domain as d
from services.ledger.payments.catalog import PricingCatalog
from services.ledger.payments.local_provider import LocalProvider
from services.ledger.payments.provider import PaymentProvider
from services.ledger.payments.service import Payments
from services.ledger.payments.store import PaymentStore
from services.ledger.payments.top_up import TopUpWorker
from services.ledger.payments.webhook_endpoint import WebhookEndpoint
from services.ledger.servicer import LedgerServicer
from services.ledger.store import OUTBOX_CHANNEL, SEALED_CHANNEL, LedgerStore
from tally.kit import db, infra
from tally.kit.background import Signal, run_periodically, run_when_notified
from tally.kit.channels import peer_channel
from tally.kit.config import (
    KitConfig,
    load,
    parse_choice,
    parse_fraction,
    parse_port,
    parse_positive_int,
    setting,
)
from tally.kit.group_commit import GroupCommit
from tally.kit.log import get_logger
from tally.kit.server import ServiceApp, run_service
from tally.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tally.pricing.v1 import pricing_pb2_grpc

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
SWEEP_INTERVAL_S = 1.0  # how late an expired hold or grant may be noticed
STREAM_SAFETY_POLL_S = 5.0  # outbox sealing and streams wait on NOTIFY; this is the backstop
LEASE_SWEEP_INTERVAL_S = 5.0  # how late a lease past its ttl may be ended (its hold returned)
REFUND_RETRY_INTERVAL_S = 30.0  # how often the money of an unconfirmed refund is asked again
RESERVE_GROUP_MAX = 256  # Reserve calls of one org that may share one transaction

log = get_logger("ledger.server")


def parse_secrets(raw: str) -> tuple[str, ...]:
    """Comma-separated webhook secrets, the current one first (at least 16 chars each)."""
    values = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not values or any(len(s) < 16 for s in values):
        raise ValueError("each secret needs at least 16 characters")
    return values


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Payments and top-up settings of the ledger (TALLY_LEDGER_*)."""

    payment_provider: str = setting("TALLY_LEDGER_PAYMENT_PROVIDER", parse_choice("local"),
                                    "local", default="local")
    webhook_port: int = setting("TALLY_LEDGER_WEBHOOK_PORT", parse_port,
                                "a port 0-65535 for POST /webhooks/<provider>", default=8053)
    webhook_secrets: tuple[str, ...] | None = setting(
        "TALLY_LEDGER_WEBHOOK_SECRETS", parse_secrets,
        "comma-separated secrets, current first (two during a rotation)", default=None)
    checkout_port: int = setting("TALLY_LEDGER_CHECKOUT_PORT", parse_port,
                                 "a port 0-65535 for the local provider's checkout pages",
                                 default=8153)
    checkout_url: str = setting("TALLY_LEDGER_CHECKOUT_URL", str,
                                "the checkout pages' public base URL", default="")
    # The local provider misbehaves like a real one, so consumers meet duplicates and
    # reordering in development too (a real provider does both, rarely).
    local_duplicate_rate: float = setting(
        "TALLY_LEDGER_LOCAL_DUPLICATE_RATE", parse_fraction,
        "the share 0..1 of webhooks the local provider delivers twice", default=0.05)
    local_reorder_rate: float = setting(
        "TALLY_LEDGER_LOCAL_REORDER_RATE", parse_fraction,
        "the share 0..1 of webhooks the local provider holds back", default=0.05)
    top_up_failures_to_throttle: int = setting(
        "TALLY_LEDGER_TOP_UP_FAILURES_TO_THROTTLE", parse_positive_int,
        "failed automatic top-ups in a row that throttle the org", default=3)
    top_up_poll_ms: int = setting("TALLY_LEDGER_TOP_UP_POLL_MS", parse_positive_int,
                                  "milliseconds > 0", default=200)
    usage_group_max_items: int = setting(
        "TALLY_LEDGER_USAGE_GROUP_MAX_ITEMS", parse_positive_int,
        "usage items > 0 that concurrent PostUsageBatch calls may share a transaction with",
        default=20_000)
    usage_committers: int = setting(
        "TALLY_LEDGER_USAGE_COMMITTERS", parse_positive_int,
        "usage group commits > 0 in flight at once per caller identity", default=1)


PostUsageBatches = Callable[[Sequence[d.UsageBatch]],
                            Awaitable[Sequence[list[d.UsageResult] | Exception]]]


def usage_group_commit(post_batches: PostUsageBatches, *, max_items: int = 20_000,
                       committers: int = 1) -> GroupCommit[d.UsageBatch, list[d.UsageResult]]:
    """PostUsageBatch calls that arrive while a usage transaction runs share the next one
    (LedgerStore.post_usage_batches), if their entries' audit fields agree (the lanes)."""
    return GroupCommit("ledger.usage", post_batches, max_size=max_items,
                       size=lambda batch: len(batch.items), key=d.UsageBatch.audited_as,
                       concurrency=committers)


async def build(config: KitConfig, ledger: LedgerConfig | None = None, *,
                provider: PaymentProvider | None = None) -> ServiceApp:
    """Wires the ledger for `config` (an embedded database when none is configured). With
    `provider`, that provider is used (and started/stopped if it is a LocalProvider)."""
    settings = ledger or load(LedgerConfig)
    url = config.database_url or infra.start_embedded_postgres(config.data_dir,
                                                               keep_running=False)
    if config.migrate_on_start:
        await db.migrate_async("ledger", url)
    pool = await db.create_pool(url, max_size=config.db_pool_size)
    store = LedgerStore(pool)
    webhook_secrets = settings.webhook_secrets
    if webhook_secrets is None:
        # the local provider lives in this process: a fresh secret shared with it will do
        webhook_secrets = (secrets.token_hex(32),)
    if provider is None:
        provider = LocalProvider(secrets=webhook_secrets[:1], host=config.host,
                                 port=settings.checkout_port, public_url=settings.checkout_url,
                                 duplicate_rate=settings.local_duplicate_rate,
                                 reorder_rate=settings.local_reorder_rate)
    pricing_channel = peer_channel(config.address_of("pricing"))
    payment_store = PaymentStore(store,
                                 failures_to_throttle=settings.top_up_failures_to_throttle)
    payments = Payments(payment_store, provider,
                        PricingCatalog(pricing_pb2_grpc.PricingServiceStub(pricing_channel)),
                        webhook_secrets)
    endpoint = WebhookEndpoint(payments, config.host, settings.webhook_port)
    top_up = TopUpWorker(payments, payment_store, store,
                         poll_s=settings.top_up_poll_ms / 1000)
    shutting_down = asyncio.Event()
    usage = usage_group_commit(store.post_usage_batches,
                               max_items=settings.usage_group_max_items,
                               committers=settings.usage_committers)
    holds = GroupCommit("ledger.reserve", store.reserve_many, max_size=RESERVE_GROUP_MAX,
                        key=lambda hold: hold.org_id)
    servicer = LedgerServicer(store, payments, usage=usage, holds=holds,
                              shutting_down=shutting_down)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start_background() -> None:
        await endpoint.start()
        if isinstance(provider, LocalProvider):
            await provider.start()
            provider.set_webhook_url(endpoint.url(provider.name))
            log.info("local_payment_provider", checkout=provider.url,
                     webhooks=endpoint.url(provider.name))
        tasks.append(asyncio.create_task(run_periodically(
            "expire_reservations", SWEEP_INTERVAL_S, store.expire_reservations, stop)))
        tasks.append(asyncio.create_task(run_periodically(
            "expire_grants", SWEEP_INTERVAL_S, store.expire_grants, stop)))
        tasks.append(asyncio.create_task(run_periodically(
            "expire_leases", LEASE_SWEEP_INTERVAL_S, store.leases.expire, stop)))
        # the sealer waits for the outbox's NOTIFY, the event streams for the sealer's
        tasks.append(asyncio.create_task(run_when_notified(
            "seal_outbox", url, OUTBOX_CHANNEL, store.seal_outbox, stop,
            safety_interval_s=STREAM_SAFETY_POLL_S)))
        tasks.append(asyncio.create_task(run_when_notified(
            "outbox_sealed", url, SEALED_CHANNEL, _fire(servicer.sealed), stop,
            safety_interval_s=STREAM_SAFETY_POLL_S)))
        servicer.sealed_by_others = STREAM_SAFETY_POLL_S
        tasks.append(asyncio.create_task(top_up.run(stop)))
        tasks.append(asyncio.create_task(run_periodically(
            "retry_provider_refunds", REFUND_RETRY_INTERVAL_S, payments.retry_refunds, stop)))

    async def close() -> None:
        stop.set()
        await asyncio.gather(*tasks)
        if isinstance(provider, LocalProvider):
            await provider.stop()
        await endpoint.stop()
        await pricing_channel.close()
        await pool.close()

    # What exists now (modules, the pool, the servicer) lives as long as the process: keep it
    # out of the collector's full passes, which a request that allocates a few thousand
    # objects (a usage batch) otherwise triggers over the whole heap every few requests.
    gc.freeze()
    return ServiceApp(
        name="ledger",
        service_names=[SERVICE_NAME],
        register=lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
            servicer, server),
        on_start=[start_background],
        on_stop=[close],
        shutting_down=shutting_down,
    )


def _fire(signal: Signal) -> Callable[[], Awaitable[None]]:
    async def fire() -> None:
        signal.fire()

    return fire


def main() -> None:
    """`python -m services.ledger`."""
    run_service("ledger", build)
