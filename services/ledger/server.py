"""Composition root of the ledger: config, pool, stores, payments, servicer, background work.

Besides its gRPC port the ledger serves the payment provider's webhooks over HTTP (an aiohttp
server, TALLY_LEDGER_WEBHOOK_PORT) and, with the default local provider, the provider's hosted
checkout pages (TALLY_LEDGER_CHECKOUT_PORT).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import grpc

from services.ledger import domain as d
from services.ledger import usage_work
from services.ledger.billing.domain import COUNTRIES
from services.ledger.billing.metering_usage import MeteringItemizer
from services.ledger.billing.service import Billing
from services.ledger.billing.servicer import BillingServicer
from services.ledger.billing.store import DEFAULT_ISSUER, BillingStore
from services.ledger.billing.tax import Issuer
from services.ledger.payments.catalog import PricingCatalog
from services.ledger.payments.local_provider import LocalProvider
from services.ledger.payments.local_store import PostgresPayments
from services.ledger.payments.provider import PaymentProvider
from services.ledger.payments.service import Payments
from services.ledger.payments.store import PaymentStore
from services.ledger.payments.stripe_provider import StripeProvider
from services.ledger.payments.top_up import TopUpWorker
from services.ledger.payments.webhook_endpoint import WebhookEndpoint
from services.ledger.servicer import LedgerServicer
from services.ledger.store import OUTBOX_CHANNEL, SEALED_CHANNEL, LedgerStore
from tally.kit import db, regions
from tally.kit.background import Deadline, Signal, run_periodically, run_when_notified
from tally.kit.channels import peer_channel
from tally.kit.config import (
    ConfigError,
    KitConfig,
    exit_on_config_error,
    load,
    parse_bool,
    parse_choice,
    parse_fraction,
    parse_port,
    parse_positive_int,
    parse_secret_file,
    setting,
)
from tally.kit.group_commit import GroupCommit
from tally.kit.log import get_logger
from tally.kit.readiness import postgres_probe
from tally.kit.server import ServiceApp, run_service
from tally.ledger.v1 import billing_pb2, billing_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from tally.metering.v1 import metering_pb2_grpc
from tally.pricing.v1 import pricing_pb2_grpc

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
BILLING_SERVICE_NAME = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name
SWEEP_SAFETY_INTERVAL_S = 30.0  # a sweeper's look when no deadline of its own is nearer
SWEEP_RETRY_S = 1.0  # what a sweep left behind (held, locked, past a page) is retried after
GRANT_SWEEP_INTERVAL_S = 5.0  # how late an expired grant may be noticed (no request-path hint)
STREAM_SAFETY_POLL_S = 5.0  # outbox sealing and streams wait on NOTIFY; this is the backstop
REFUND_RETRY_INTERVAL_S = 30.0  # how often the money of an unconfirmed refund is asked again
# how often the daily-snapshot job looks for closed days to write (a day is written once it
# is SETTLE_MARGIN old; a run writes a bounded number of rows, catching up over several)
SNAPSHOT_INTERVAL_S = 300.0
RESERVE_GROUP_MAX = 256  # Reserve calls of one org that may share one transaction

log = get_logger("ledger.server")


def parse_stripe_key(raw: str) -> str:
    """A Stripe API key: secret (sk_) or restricted (rk_), live or test."""
    key = raw.strip()
    if not key.startswith(("sk_", "rk_")) or len(key) < 16:
        raise ValueError("not an sk_ or rk_ key")
    return key


def parse_url(raw: str) -> str:
    """An http(s) URL."""
    if not raw.startswith(("https://", "http://")):
        raise ValueError("must start with https:// or http://")
    return raw.strip()


def parse_secrets(raw: str) -> tuple[str, ...]:
    """Comma-separated webhook secrets, the current one first (at least 16 chars each)."""
    values = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not values or any(len(s) < 16 for s in values):
        raise ValueError("each secret needs at least 16 characters")
    return values


def parse_country(raw: str) -> str:
    """An ISO 3166-1 alpha-2 country code."""
    code = raw.strip().upper()
    if code not in COUNTRIES:
        raise ValueError("not an ISO 3166-1 alpha-2 country code")
    return code


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Payments and top-up settings of the ledger (TALLY_LEDGER_*)."""

    environment: str = setting(
        "TALLY_ENVIRONMENT", parse_choice("development", "production"),
        "development or production", default="development")
    payment_provider: str = setting(
        "TALLY_LEDGER_PAYMENT_PROVIDER", parse_choice("local", "stripe"),
        "local (development only) or stripe", default="local")
    stripe_secret_key: str = setting(
        "TALLY_LEDGER_STRIPE_SECRET_KEY", parse_stripe_key,
        "a Stripe secret or restricted key (sk_... / rk_...)", default="", secret=True)
    stripe_secret_key_file: str = setting(
        "TALLY_LEDGER_STRIPE_SECRET_KEY_FILE", parse_secret_file,
        "a readable file holding the Stripe secret key", default="", secret=True)
    stripe_success_url: str = setting(
        "TALLY_LEDGER_STRIPE_SUCCESS_URL", parse_url,
        "an https:// URL Stripe sends customers to after paying", default="")
    stripe_cancel_url: str = setting(
        "TALLY_LEDGER_STRIPE_CANCEL_URL", parse_url,
        "an https:// URL Stripe sends customers to when they cancel", default="")
    stripe_api_base: str = setting(
        "TALLY_LEDGER_STRIPE_API_BASE", parse_url,
        "Stripe's API address (only to point at a test double)", default="")
    webhook_port: int = setting("TALLY_LEDGER_WEBHOOK_PORT", parse_port,
                                "a port 0-65535 for POST /webhooks/<provider>", default=8053)
    webhook_secrets: tuple[str, ...] | None = setting(
        "TALLY_LEDGER_WEBHOOK_SECRETS", parse_secrets,
        "comma-separated secrets, current first (two during a rotation)", default=None,
        secret=True)
    webhook_secrets_file: tuple[str, ...] | None = setting(
        "TALLY_LEDGER_WEBHOOK_SECRETS_FILE", lambda raw: parse_secrets(parse_secret_file(raw)),
        "a readable file of comma-separated secrets, current first", default=None,
        secret=True)
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
                                  "milliseconds > 0: how often the top-up worker looks when "
                                  "no outbox event woke it (a safety net)", default=5_000)
    usage_group_max_items: int = setting(
        "TALLY_LEDGER_USAGE_GROUP_MAX_ITEMS", parse_positive_int,
        "usage items > 0 that concurrent PostUsageBatch calls may share a transaction with",
        default=20_000)
    issuer_name: str = setting("TALLY_LEDGER_ISSUER_NAME", str,
                               "the legal name invoices are issued in",
                               default=DEFAULT_ISSUER.legal_name)
    issuer_country: str = setting("TALLY_LEDGER_ISSUER_COUNTRY", parse_country,
                                  "the issuer's ISO 3166-1 alpha-2 country, e.g. DE",
                                  default=DEFAULT_ISSUER.country)
    issuer_tax_id: str = setting("TALLY_LEDGER_ISSUER_TAX_ID", str,
                                 "the issuer's tax id (VAT number)",
                                 default=DEFAULT_ISSUER.tax_id)
    issuer_address: str = setting("TALLY_LEDGER_ISSUER_ADDRESS", str,
                                  "the issuer's postal address, one line",
                                  default=DEFAULT_ISSUER.address)
    usage_committers: int = setting(
        "TALLY_LEDGER_USAGE_COMMITTERS", parse_positive_int,
        "usage group commits > 0 in flight at once per caller identity", default=1)
    itemize_usage: bool = setting(
        "TALLY_LEDGER_ITEMIZE_USAGE", parse_bool,
        "true or false: statements and Reconcile ask metering (TALLY_METERING_ADDRESS) for "
        "the usage events of the ledger's usage batches", default=True)


PostUsageBatches = Callable[[Sequence[d.UsageBatch]],
                            Awaitable[Sequence[d.UsageResults | Exception]]]


def usage_group_commit(post_batches: PostUsageBatches, *, max_items: int = 20_000,
                       committers: int = 1) -> GroupCommit[d.UsageBatch, d.UsageResults]:
    """PostUsageBatch calls that arrive while a usage transaction runs share the next one
    (LedgerStore.post_usage_batches), if their entries' audit fields agree (the lanes)."""
    return GroupCommit("ledger.usage", post_batches, max_size=max_items,
                       size=lambda batch: batch.size, key=d.UsageBatch.audited_as,
                       concurrency=committers)


async def build(config: KitConfig, ledger: LedgerConfig | None = None, *,
                provider: PaymentProvider | None = None, region: str = "") -> ServiceApp:
    """Wires the ledger for `config` (an embedded database when none is configured). With
    `provider`, that provider is used as it is (a LocalProvider keeps its own state); else the
    one the settings ask for (payment_provider), a local one keeping its state in PostgreSQL.
    With `region`, it is that region's copy in a process serving several (build_regions)."""
    settings = ledger or load(LedgerConfig)
    webhook_secrets = settings.webhook_secrets or settings.webhook_secrets_file
    shares_state = provider is None
    if provider is None:  # checked before anything starts: a bad setting stops the process
        provider = payment_provider(config, settings, webhook_secrets)
    if webhook_secrets is None:
        if not isinstance(provider, LocalProvider):
            raise ConfigError([("TALLY_LEDGER_WEBHOOK_SECRETS",
                                "is required with a real payment provider")])
        webhook_secrets = provider.secrets
    url, pool = await db.open_service_database("ledger", config)
    store = LedgerStore(pool)
    webhook_pool: asyncpg.Pool | None = None
    if shares_state and isinstance(provider, LocalProvider):
        # every replica of this ledger sees the same checkouts (one opened through one
        # replica is paid on another's page) and sends the webhooks a dead one left; a
        # delivery attempt holds its claim on a connection of its own pool while this very
        # process's webhook endpoint answers it from the main pool
        webhook_pool = await db.create_pool(url, max_size=2)
        provider.keep_state_in(PostgresPayments(pool, attempts_pool=webhook_pool))
    pricing_channel = peer_channel(config.address_of("pricing"))
    billing_store = BillingStore(store, Issuer(settings.issuer_name, settings.issuer_country,
                                               settings.issuer_tax_id, settings.issuer_address))
    payment_store = PaymentStore(store,
                                 failures_to_throttle=settings.top_up_failures_to_throttle)
    payments = Payments(payment_store, provider,
                        PricingCatalog(pricing_pb2_grpc.PricingServiceStub(pricing_channel)),
                        webhook_secrets, profiles=billing_store)
    payment_store.on_order_created = billing_store.record_tax
    payment_store.on_order_paid = billing_store.issue_invoice
    payment_store.on_refund = billing_store.issue_credit_note
    endpoint = WebhookEndpoint(payments, config.host, settings.webhook_port)
    top_up = TopUpWorker(payments, payment_store, store,
                         poll_s=settings.top_up_poll_ms / 1000)
    shutting_down = asyncio.Event()
    usage = usage_group_commit(functools.partial(usage_work.post_usage_batches, store),
                               max_items=settings.usage_group_max_items,
                               committers=settings.usage_committers)
    holds = GroupCommit("ledger.reserve", store.reserve_many, max_size=RESERVE_GROUP_MAX,
                        key=lambda hold: hold.org_id)
    servicer = LedgerServicer(store, payments, usage=usage, holds=holds,
                              shutting_down=shutting_down, one_of_regions=bool(region))
    metering_channel = peer_channel(config.address_of("metering"))
    billing = Billing(billing_store, MeteringItemizer(
        metering_pb2_grpc.MeteringServiceStub(metering_channel))
        if settings.itemize_usage else None)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    http_urls: dict[str, str] = {}

    async def start_background() -> None:
        await endpoint.start()
        http_urls["webhooks"] = endpoint.url(provider.name).rsplit("/", 1)[0]
        if isinstance(provider, LocalProvider):
            await provider.start()
            provider.set_webhook_url(endpoint.url(provider.name))
            http_urls["checkout"] = provider.url
            log.info("local_payment_provider", checkout=provider.url,
                     webhooks=endpoint.url(provider.name))
        # the sweepers wait for their next deadline (what their last run found, moved
        # earlier by this replica's own requests), the safety interval covering the rest
        tasks.append(asyncio.create_task(run_when_notified(
            "expire_reservations", store.expire_reservations, stop,
            deadline=store.reservation_expiry, next_due=store.next_reservation_expiry,
            safety_interval_s=SWEEP_SAFETY_INTERVAL_S, retry_s=SWEEP_RETRY_S)))
        tasks.append(asyncio.create_task(run_when_notified(
            "expire_grants", store.expire_grants, stop, deadline=Deadline(),
            next_due=store.next_grant_expiry, safety_interval_s=GRANT_SWEEP_INTERVAL_S,
            retry_s=SWEEP_RETRY_S)))
        tasks.append(asyncio.create_task(run_when_notified(
            "expire_leases", store.leases.expire, stop, deadline=store.lease_expiry,
            next_due=store.leases.next_expiry, safety_interval_s=SWEEP_SAFETY_INTERVAL_S,
            retry_s=SWEEP_RETRY_S)))
        # the sealer waits for the outbox's NOTIFY, the event streams for the sealer's
        tasks.append(asyncio.create_task(run_when_notified(
            "seal_outbox", store.seal_outbox, stop, listen=(url, OUTBOX_CHANNEL),
            safety_interval_s=STREAM_SAFETY_POLL_S)))
        tasks.append(asyncio.create_task(run_when_notified(
            "outbox_sealed", _fire(servicer.sealed), stop, listen=(url, SEALED_CHANNEL),
            safety_interval_s=STREAM_SAFETY_POLL_S)))
        servicer.sealed_by_others = STREAM_SAFETY_POLL_S
        tasks.append(asyncio.create_task(top_up.run(stop, wake=servicer.sealed)))
        tasks.append(asyncio.create_task(run_periodically(
            "retry_provider_refunds", REFUND_RETRY_INTERVAL_S, payments.retry_refunds, stop)))
        tasks.append(asyncio.create_task(run_periodically(
            "daily_snapshots", SNAPSHOT_INTERVAL_S, billing.statements.write_daily_snapshots,
            stop)))

    async def close() -> None:
        stop.set()
        await asyncio.gather(*tasks)
        if isinstance(provider, (LocalProvider, StripeProvider)):
            await provider.stop()
        await endpoint.stop()
        await pricing_channel.close()
        await metering_channel.close()
        if webhook_pool is not None:
            await webhook_pool.close()
        await pool.close()

    # What exists now (modules, the pool, the servicer) lives as long as the process: keep it
    # out of the collector's full passes, which a request that allocates a few thousand
    # objects (a usage batch) otherwise triggers over the whole heap every few requests.
    gc.freeze()
    return ServiceApp(
        name="ledger",
        service_names=[SERVICE_NAME, BILLING_SERVICE_NAME],
        audit_database_url=url,
        register=functools.partial(_register, servicer, BillingServicer(billing)),
        on_start=[start_background],
        on_stop=[close],
        shutting_down=shutting_down,
        readiness_probes=[postgres_probe(pool)],
        http_urls=http_urls,
    )


async def build_regions(config: KitConfig, ledger: LedgerConfig | None = None) -> ServiceApp:
    """The ledger of every region of TALLY_REGION_DATABASES in one process, each on its own
    database (tally.kit.regions); without it, `build`. Region i (the home being 0) serves its
    webhooks and checkout pages on the configured ports + i (0 stays 0: any free port)."""
    settings = ledger or load(LedgerConfig)

    async def one(region_config: KitConfig, region: str, index: int) -> ServiceApp:
        return await build(region_config, dataclasses.replace(
            settings, webhook_port=_shifted(settings.webhook_port, index),
            checkout_port=_shifted(settings.checkout_port, index)), region=region)

    return await regions.build_regional(config, one)


def _shifted(port: int, index: int) -> int:
    return port + index if port else 0


def _register(ledger: LedgerServicer, billing: BillingServicer, server: grpc.aio.Server) -> None:
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(ledger, server)
    billing_pb2_grpc.add_BillingServiceServicer_to_server(billing, server)


def payment_provider(config: KitConfig, settings: LedgerConfig,
                     webhook_secrets: tuple[str, ...] | None) -> PaymentProvider:
    """The provider the settings ask for. The local one is for development only: configured
    in production, the ledger refuses to start and says which settings to change."""
    if settings.payment_provider == "local":
        if settings.environment == "production":
            raise ConfigError([(
                "TALLY_LEDGER_PAYMENT_PROVIDER",
                "is local (the development provider: simulated checkout, no real money) "
                "while TALLY_ENVIRONMENT=production; set it to stripe with "
                "TALLY_LEDGER_STRIPE_SECRET_KEY, TALLY_LEDGER_WEBHOOK_SECRETS and "
                "TALLY_LEDGER_STRIPE_SUCCESS_URL")])
        # the local provider lives in this process: a fresh secret shared with it will do
        own = webhook_secrets or (secrets.token_hex(32),)
        return LocalProvider(secrets=own[:1], host=config.host, port=settings.checkout_port,
                             public_url=settings.checkout_url,
                             duplicate_rate=settings.local_duplicate_rate,
                             reorder_rate=settings.local_reorder_rate)
    key = settings.stripe_secret_key or settings.stripe_secret_key_file
    problems = [(var, f"is required with TALLY_LEDGER_PAYMENT_PROVIDER=stripe; expected {what}")
                for var, missing, what in (
                    ("TALLY_LEDGER_STRIPE_SECRET_KEY", not key,
                     "a Stripe secret key (or TALLY_LEDGER_STRIPE_SECRET_KEY_FILE)"),
                    ("TALLY_LEDGER_WEBHOOK_SECRETS", not webhook_secrets,
                     "the webhook endpoint's signing secret, whsec_... (or "
                     "TALLY_LEDGER_WEBHOOK_SECRETS_FILE)"),
                    ("TALLY_LEDGER_STRIPE_SUCCESS_URL", not settings.stripe_success_url,
                     "where Stripe sends customers after paying"))
                if missing]
    if problems:
        raise ConfigError(problems)
    if settings.environment == "production" and key.startswith(("sk_test_", "rk_test_")):
        raise ConfigError([("TALLY_LEDGER_STRIPE_SECRET_KEY",
                            "is a test-mode key while TALLY_ENVIRONMENT=production")])
    return StripeProvider(key, success_url=settings.stripe_success_url,
                          cancel_url=settings.stripe_cancel_url,
                          api_base=settings.stripe_api_base)


def _fire(signal: Signal) -> Callable[[], Awaitable[None]]:
    async def fire() -> None:
        signal.fire()

    return fire


def main() -> None:
    """`python -m services.ledger`. Settings of its own that cannot work (the local provider
    in production, Stripe without its keys) stop it like bad kit settings: exit status 2, one
    line per setting."""
    async def build_or_exit(config: KitConfig) -> ServiceApp:
        try:
            return await build_regions(config)
        except ConfigError as exc:
            exit_on_config_error(exc)
            raise

    run_service("ledger", build_or_exit)
