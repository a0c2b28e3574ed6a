"""Composition root of the metering service.

config -> pool/engine -> stores -> price books (watched from pricing) -> ledger client ->
group committer -> servicer. The service refuses to serve until it holds a price book.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.metering.adapters import GrpcLeasingLedger, GrpcLedger, WatchedPriceBooks
from services.metering.ingestion.committer import CommitSettings, GroupCommitter
from services.metering.ingestion.rollup import CaughtUpRollups, RollupWorker
from services.metering.ingestion.store import UsageEventStore
from services.metering.policy_store import PolicyStore
from services.metering.spend.authorizer import Authorizer
from services.metering.spend.lease import LeaseSettings
from services.metering.spend.lease_manager import LeaseManager
from services.metering.spend.lease_store import LeaseStore
from services.metering.spend.store import OUTBOX_CHANNEL, SEALED_CHANNEL, SpendStore
from tally.kit import db, regions
from tally.kit.background import run_when_notified
from tally.kit.channels import peer_channel
from tally.kit.config import (
    ConfigError,
    KitConfig,
    exit_on_config_error,
    load,
    parse_choice,
    parse_non_negative_int,
    parse_positive_int,
    setting,
)
from tally.kit.readiness import Probe, postgres_probe
from tally.kit.server import ServiceApp, run_service
from tally.ledger.v1 import ledger_pb2_grpc
from tally.limits import InProcessLimiter, Limiter, OutagePolicy, RedisLimiter
from tally.metering.v1 import metering_pb2, metering_pb2_grpc
from tally.pricing.v1 import pricing_pb2_grpc

from . import convert_policies
from .policy_cache import PolicyCache
from .ratelimit_servicer import RateLimitServicer
from .reports.domain import UsageReports
from .reports.store import UsageStore
from .servicer import MeteringServicer
from .spend.quotas import LimiterGate
from .spend.ratelimit import PricedModels, RateLimitChecker

NAME = "metering"
SERVICE_NAME = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name
RATE_LIMIT_SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name


@dataclass(frozen=True, slots=True)
class MeteringConfig:
    """Bounds of ingestion (TALLY_METERING_*)."""

    max_inflight_batches: int = setting(
        "TALLY_METERING_MAX_INFLIGHT_BATCHES", parse_positive_int, "an integer > 0", default=4)
    stream_lifetime_s: int = setting(
        "TALLY_METERING_STREAM_LIFETIME_S", parse_positive_int, "seconds > 0", default=300)
    max_batch_events: int = setting(
        "TALLY_METERING_MAX_BATCH_EVENTS", parse_positive_int, "an integer > 0", default=2000)
    flush_interval_ms: int = setting(
        "TALLY_METERING_FLUSH_INTERVAL_MS", parse_positive_int, "milliseconds > 0", default=5)
    max_buffered_events: int = setting(
        "TALLY_METERING_MAX_BUFFERED_EVENTS", parse_positive_int, "an integer > 0",
        default=50_000)
    buffer_wait_ms: int = setting(
        "TALLY_METERING_BUFFER_WAIT_MS", parse_positive_int, "milliseconds > 0", default=5_000)
    max_inflight_commits: int = setting(
        "TALLY_METERING_MAX_INFLIGHT_COMMITS", parse_positive_int, "an integer > 0", default=2)
    sweep_interval_s: int = setting(
        "TALLY_METERING_SWEEP_INTERVAL_S", parse_positive_int,
        "seconds > 0: how often the hold sweeper looks when no deadline of its own is nearer",
        default=30)
    price_book_wait_s: int = setting(
        "TALLY_METERING_PRICE_BOOK_WAIT_S", parse_positive_int, "seconds > 0", default=30)
    policy_cache_ms: int = setting(
        "TALLY_METERING_POLICY_CACHE_MS", parse_non_negative_int,
        "milliseconds >= 0 (how late a policy, quota or budget change may reach Authorize)",
        default=1000)
    limiter: str = setting(
        "TALLY_METERING_LIMITER", parse_choice("in-process", "redis"),
        "in-process (one replica) or redis (replicas share quotas; needs TALLY_REDIS_URL)",
        default="in-process")
    workers: int = setting(
        "TALLY_METERING_WORKERS", parse_positive_int,
        "metering processes > 0 serving the one port (SO_REUSEPORT); more than 1 needs "
        "TALLY_METERING_LIMITER=redis (quotas are shared between processes)", default=1)
    lease_window_s: int = setting(
        "TALLY_METERING_LEASE_WINDOW_S", parse_positive_int,
        "seconds > 0 (of an org's recent spend its credit lease holds)", default=20)
    lease_floor_micros: int = setting(
        "TALLY_METERING_LEASE_FLOOR_MICROS", parse_positive_int,
        "micro-credits > 0 (the smallest lease asked for)", default=10_000_000)
    lease_cap_micros: int = setting(
        "TALLY_METERING_LEASE_CAP_MICROS", parse_positive_int,
        "micro-credits > 0 (the largest lease: what the ledger taking credit back may be "
        "overshot by before metering sees it)", default=1_000_000_000)
    lease_ttl_s: int = setting(
        "TALLY_METERING_LEASE_TTL_S", parse_positive_int,
        "seconds > 0 (an unrenewed lease returns its credit then)", default=120)
    limiter_on_outage: str = setting(
        "TALLY_METERING_LIMITER_ON_OUTAGE", parse_choice("deny", "local"),
        "deny (hard quotas fail closed) or local (each replica enforces them alone)",
        default="deny")


def make_limiter(config: KitConfig, settings: MeteringConfig) -> Limiter:
    """The quota limiter the settings ask for."""
    if settings.limiter == "in-process":
        return InProcessLimiter()
    if not config.redis_url:
        raise RuntimeError("TALLY_METERING_LIMITER=redis needs TALLY_REDIS_URL")
    return RedisLimiter(config.redis_url, on_outage=OutagePolicy(settings.limiter_on_outage))


def readiness_probes(pool: asyncpg.Pool, limiter: Limiter) -> list[Probe]:
    """NOT_SERVING while the database is unreachable, or Redis when hard quotas fail closed
    without it (with the local policy a replica still decides alone)."""
    probes = [postgres_probe(pool)]
    if isinstance(limiter, RedisLimiter) and limiter.on_outage is OutagePolicy.DENY:
        probes.append(limiter.ping)
    return probes


async def build(config: KitConfig, metering: MeteringConfig | None = None,
                limiter: Limiter | None = None, *, region: str = "") -> ServiceApp:
    """Wires metering; waits (bounded) for the first price book from pricing. `limiter`
    replaces the one the settings name (tests share one clock between replicas). With
    `region` (one copy per region, tally.kit.regions), its calls to the ledger name that
    region, so the ledger's event stream it follows is its region's."""
    settings = metering or load(MeteringConfig)
    limiter = limiter if limiter is not None else make_limiter(config, settings)
    url, pool = await db.open_service_database(NAME, config, custom_plans=True)
    engine = db.create_engine(url, pool_size=config.db_pool_size)
    pricing_channel = peer_channel(config.address_of("pricing"))
    ledger_channel = peer_channel(config.address_of("ledger"),
                                  {regions.ROUTE_HEADER: region} if region else None)
    books = WatchedPriceBooks(pricing_pb2_grpc.PricingServiceStub(pricing_channel))
    stop = asyncio.Event()
    watcher = asyncio.create_task(books.watch(stop), name="price-book-watch")
    try:
        await asyncio.wait_for(books.ready.wait(), settings.price_book_wait_s)
    except TimeoutError:
        stop.set()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await limiter.close()
        raise RuntimeError(f"no price book from pricing at {config.address_of('pricing')} "
                           f"within {settings.price_book_wait_s}s; refusing to serve") from None
    events = UsageEventStore(pool)
    rollup = RollupWorker(pool)
    committer = GroupCommitter(
        events, GrpcLedger(ledger_pb2_grpc.LedgerServiceStub(ledger_channel)), books,
        CommitSettings(max_batch_events=settings.max_batch_events,
                       flush_interval_ms=settings.flush_interval_ms,
                       max_buffered_events=settings.max_buffered_events,
                       buffer_wait_ms=settings.buffer_wait_ms,
                       max_inflight_commits=settings.max_inflight_commits),
        on_commit=rollup.wake)
    spend = SpendStore(pool)
    policies = PolicyCache(spend, settings.policy_cache_ms / 1000)
    leases = LeaseManager(LeaseStore(pool), GrpcLeasingLedger(
        ledger_pb2_grpc.LedgerServiceStub(ledger_channel)), LeaseSettings(
            window=timedelta(seconds=settings.lease_window_s),
            floor_micros=settings.lease_floor_micros, cap_micros=settings.lease_cap_micros,
            ttl=timedelta(seconds=settings.lease_ttl_s),
            renew_before=timedelta(seconds=settings.lease_ttl_s / 3)))
    gate = LimiterGate(limiter)  # one gate: Authorize and Envoy's ShouldRateLimit count alike
    authorizer = Authorizer(spend, policies, books, leases, gate)
    rate_limits = RateLimitServicer(RateLimitChecker(
        policies, gate, leases.store, leases, spend, PricedModels(books)))
    shutting_down = asyncio.Event()
    servicer = MeteringServicer(
        UsageReports(CaughtUpRollups(UsageStore(engine), rollup)), committer, events,
        authorizer, spend,
        policies=PolicyStore(pool, on_change=policies.forget,
                             catch_up_usage=rollup.catch_up),
        max_inflight_batches=settings.max_inflight_batches,
        stream_lifetime_s=settings.stream_lifetime_s, shutting_down=shutting_down)

    def register(server: grpc.aio.Server) -> None:
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(rate_limits, server)

    # the sweeper waits for the next hold's ttl (what its last run found, moved earlier by this
    # replica's own holds); the interval is the safety net for other replicas' holds
    sweeper = asyncio.create_task(run_when_notified(
        "expire-authorizations", lambda: spend.expire_holds(datetime.now(UTC)), stop,
        deadline=spend.hold_expiry, next_due=spend.next_hold_expiry,
        safety_interval_s=settings.sweep_interval_s, retry_s=1.0),
        name="expire-authorizations")

    # budget alarms are rare: the sealer waits for the outbox's NOTIFY instead of polling
    sealer = asyncio.create_task(run_when_notified(
        "seal-outbox", spend.seal_outbox, stop, listen=(url, OUTBOX_CHANNEL)),
        name="seal-outbox")

    async def fire_sealed() -> None:
        servicer.sealed.fire()

    servicer.outbox_poll_s = 5.0  # a backstop: streams wake on the sealer's NOTIFY
    announcer = asyncio.create_task(run_when_notified(
        "outbox-sealed", fire_sealed, stop, listen=(url, SEALED_CHANNEL)),
        name="outbox-sealed")
    # credit leases: top-ups and renewals (queue and timers), the ledger's changes (its stream)
    lease_tasks = [asyncio.create_task(leases.run(stop), name="lease-renewals"),
                   asyncio.create_task(leases.follow(stop), name="lease-follower")]

    async def close() -> None:
        await committer.stop()
        await rollup.stop()
        stop.set()
        lease_tasks[1].cancel()  # it may be parked inside the ledger's StreamEvents
        for task in (sweeper, sealer, announcer, *lease_tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watcher.cancel()  # it may be parked inside a long-lived WatchPriceBook stream
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await pricing_channel.close()
        await ledger_channel.close()
        await limiter.close()
        await pool.close()
        await engine.dispose()

    # What exists now lives as long as the process: keep it out of the collector's full
    # passes (as the ledger does), which the hot paths would otherwise trigger over the heap.
    gc.freeze()
    return ServiceApp(name=NAME, service_names=[SERVICE_NAME, RATE_LIMIT_SERVICE_NAME],
                      register=register, audit_database_url=url,
                      on_start=[committer.start, rollup.start], on_stop=[close],
                      shutting_down=shutting_down,
                      readiness_probes=readiness_probes(pool, limiter))


async def build_for(database_url: str, config: KitConfig | None = None,
                    metering: MeteringConfig | None = None,
                    limiter: Limiter | None = None) -> ServiceApp:
    """`build` against an already migrated database, other settings from `config` or defaults."""
    return await build(db.on_database(database_url, config), metering, limiter)


async def build_regions(config: KitConfig) -> ServiceApp:
    """Metering for every region of TALLY_REGION_DATABASES in one process, each on its own
    database (tally.kit.regions); without it, `build`. Each region has its own quota limiter:
    an org's quotas live with the org, in one region."""
    settings = load(MeteringConfig)

    async def one(region_config: KitConfig, region: str, index: int) -> ServiceApp:
        return await build(region_config, settings, region=region)

    # what uses a model or meter is the sum over every region's orgs: pricing asks before it
    # drops one, and one region's answer would let it drop what another region still uses
    return await regions.build_regional(config, one, every_region={
        f"/{SERVICE_NAME}/GetPricingUse": convert_policies.merge_pricing_use})


def _die_with_parent() -> None:
    """In a worker process, before exec: the kernel kills it when the first process dies
    (SIGKILL included), so a killed service never leaves a worker serving its port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1
_WORKER_OF = "TALLY_METERING_WORKER_OF"  # set in the worker processes the first one starts


def main() -> None:
    """Runs the metering service until SIGTERM/SIGINT: TALLY_METERING_WORKERS processes on
    one port, each a whole metering (its own pools, committer and roll-up worker; per-org
    state is guarded in the database by per-org advisory locks, as between replicas)."""
    try:
        settings = load(MeteringConfig)
    except ConfigError as exc:
        exit_on_config_error(exc)
        return
    if settings.workers > 1 and settings.limiter != "redis":
        exit_on_config_error(ConfigError([(
            "TALLY_METERING_WORKERS", "more than 1 needs TALLY_METERING_LIMITER=redis (each "
            "process would otherwise count quotas alone)")]))
        return
    # the other workers: the same service, one process each (no /metrics of their own)
    is_worker = bool(os.environ.get(_WORKER_OF))
    env = dict(os.environ, TALLY_METRICS_PORT="0", **{_WORKER_OF: str(os.getpid())})
    workers = [] if is_worker else [
        subprocess.Popen([sys.executable, "-m", "services.metering"], env=env,
                         preexec_fn=_die_with_parent)
        for _ in range(settings.workers - 1)]
    try:
        run_service(NAME, build_regions, reuse_port=settings.workers > 1)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait()
