"""Composition root of the accounts service.

config -> pool -> store -> Accounts + CredentialHub -> servicer -> ServiceApp, plus two
background loops: the change feed (LISTEN accounts_credentials) and the refresher that turns
its wake-ups (or a periodic poll, should a notification be lost) into one read of the new
changes, fanned out to every WatchCredentials stream.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from tally.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from tally.kit import db
from tally.kit.background import run_periodically, run_when_notified
from tally.kit.config import (
    ConfigError,
    KitConfig,
    exit_on_config_error,
    load,
    parse_non_negative_int,
    parse_path,
    parse_positive_int,
    setting,
)
from tally.kit.log import get_logger
from tally.kit.server import ServiceApp, run_service

from .domain import Accounts, CredentialHub
from .servicer import AccountsServicer
from .store import CHANNEL, AccountsPgStore, AuditPgStore

NAME = "accounts"
SERVICE_NAME = accounts_pb2.DESCRIPTOR.services_by_name["AccountsService"].full_name
log = get_logger("accounts.server")


def parse_regions(raw: str) -> frozenset[str]:
    """A comma-separated list of region names."""
    regions = frozenset(part.strip() for part in raw.split(",") if part.strip())
    if not regions:
        raise ValueError("no region")
    return regions


@dataclass(frozen=True, slots=True)
class AccountsConfig:
    """Accounts' own settings (TALLY_ACCOUNTS_*)."""

    regions: frozenset[str] = setting(
        "TALLY_ACCOUNTS_REGIONS", parse_regions, "comma-separated region names",
        default=frozenset({"local"}))
    watch_lifetime_s: int = setting(
        "TALLY_ACCOUNTS_WATCH_LIFETIME_S", parse_positive_int, "seconds > 0", default=300)
    max_watchers: int = setting(
        "TALLY_ACCOUNTS_MAX_WATCHERS", parse_positive_int, "an integer > 0", default=1000)
    refresh_interval_ms: int = setting(
        "TALLY_ACCOUNTS_REFRESH_INTERVAL_MS", parse_positive_int,
        "milliseconds > 0: how often to refresh when no notification came (a safety net)",
        default=30_000)
    audit_retention_days: int = setting(
        "TALLY_ACCOUNTS_AUDIT_RETENTION_DAYS", parse_non_negative_int,
        "days >= 0 audit records are kept in the database (0: forever)", default=0)
    audit_archive_dir: Path | None = setting(  # noqa: RUF009 - setting() returns a field()
        "TALLY_ACCOUNTS_AUDIT_ARCHIVE_DIR", parse_path,
        "a directory (a mounted volume) expired audit records are archived to before they "
        "are deleted", default=None)
    audit_expiry_interval_s: int = setting(
        "TALLY_ACCOUNTS_AUDIT_EXPIRY_INTERVAL_S", parse_positive_int,
        "seconds > 0 between retention runs", default=3600)


def archive_to(directory: Path) -> Callable[[str, bytes], None]:
    """Writes an archive file under `directory`, durable before it returns (written to a
    temporary name, fsynced, renamed), so the records are never deleted before their copy
    is on disk."""
    def write(name: str, lines: bytes) -> None:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as out:
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)

    return write


async def build(config: KitConfig, settings: AccountsConfig | None = None) -> ServiceApp:
    """Wires accounts."""
    settings = settings or load(AccountsConfig)
    if settings.audit_retention_days and settings.audit_archive_dir is None:
        raise ConfigError([("TALLY_ACCOUNTS_AUDIT_ARCHIVE_DIR",
                            "is required with TALLY_ACCOUNTS_AUDIT_RETENTION_DAYS: records are "
                            "archived before they are deleted")])
    url, pool = await db.open_service_database(NAME, config)
    store = AccountsPgStore(pool, db.asyncpg_url(url))
    hub = CredentialHub(store, max_watchers=settings.max_watchers)
    hub.revision = (await store.credentials_snapshot()).revision
    shutting_down = asyncio.Event()
    audit_store = AuditPgStore(pool)
    servicer = AccountsServicer(Accounts(store, settings.regions), store, hub,
                                audit_store,
                                watch_lifetime_s=settings.watch_lifetime_s,
                                shutting_down=shutting_down)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def expire_audit() -> None:
        assert settings.audit_archive_dir is not None
        before = datetime.now(UTC) - timedelta(days=settings.audit_retention_days)
        removed = await audit_store.expire(before, archive_to(settings.audit_archive_dir))
        if removed:
            log.info("audit_expired", records=removed, before=before.isoformat(),
                     archive=str(settings.audit_archive_dir))

    async def start_loops() -> None:
        if settings.audit_retention_days:
            tasks.append(asyncio.create_task(run_periodically(
                "audit-expiry", settings.audit_expiry_interval_s, expire_audit, stop),
                name="audit-expiry"))
        # runs on the store's NOTIFY (by any replica); the interval is only a safety net
        tasks.append(asyncio.create_task(run_when_notified(
            "credentials", hub.refresh, stop, listen=(url, CHANNEL),
            safety_interval_s=settings.refresh_interval_ms / 1000, min_interval_s=0.0),
            name="credentials-refresher"))

    async def close() -> None:
        stop.set()
        hub.close()
        await asyncio.gather(*tasks)
        await pool.close()

    def register(server: grpc.aio.Server) -> None:
        accounts_pb2_grpc.add_AccountsServiceServicer_to_server(servicer, server)

    return ServiceApp(name=NAME, service_names=[SERVICE_NAME], register=register,
                      audit_database_url=url,
                      on_start=[start_loops], on_stop=[close], shutting_down=shutting_down)


async def build_for(database_url: str, config: KitConfig | None = None,
                    settings: AccountsConfig | None = None) -> ServiceApp:
    """`build` against an already migrated database, other settings from `config` or defaults."""
    return await build(db.on_database(database_url, config), settings)


def main() -> None:
    """Runs the accounts service until SIGTERM/SIGINT. Settings that cannot work together
    (retention without an archive) stop it like bad kit settings: exit status 2."""
    async def build_or_exit(config: KitConfig) -> ServiceApp:
        try:
            return await build(config)
        except ConfigError as exc:
            exit_on_config_error(exc)
            raise

    run_service(NAME, build_or_exit)
