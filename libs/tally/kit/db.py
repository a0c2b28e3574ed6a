"""Database access: one PostgreSQL schema per service, Alembic migrations per service.

Services query through SQLAlchemy 2 Core on asyncpg; hot paths that need COPY or `unnest`
batches take a raw asyncpg pool. Both come from here, built from one URL, so no service invents
its own connection handling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tally.kit.log import get_logger

if TYPE_CHECKING:
    from tally.kit.config import KitConfig

log = get_logger("tally.kit.db")

SERVICES: Final = ("pricing", "metering", "ledger", "notifier", "accounts")
"""Every service that owns a schema, in migration order."""

# Serializes migrations of one schema across replicas starting at once (any 64-bit key works,
# it only has to be the same in every process).
_MIGRATION_LOCK_KEY: Final = 0x7A11_0000


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy form (postgresql+asyncpg://) of a postgresql:// URL."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def asyncpg_url(url: str) -> str:
    """The asyncpg form (postgresql://) of a PostgreSQL URL."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def create_engine(url: str, *, pool_size: int = 8) -> AsyncEngine:
    """An async SQLAlchemy engine on asyncpg."""
    return create_async_engine(
        sqlalchemy_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections go back as they are: asyncpg's default reset (unlock advisory locks,
    UNLISTEN, RESET ALL) is a round trip on every release, and nothing of ours leaves session
    state on a pooled connection — advisory locks are transaction-scoped, LISTEN runs on
    dedicated connections. An open transaction is still rolled back by the pool."""


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 8,
                      custom_plans: bool = False) -> asyncpg.Pool:
    """A raw asyncpg pool for bulk paths (COPY, unnest batches).

    `custom_plans`: plan every statement for its parameters. asyncpg prepares statements, and
    PostgreSQL may settle on a generic plan while a table is still nearly empty (a seq scan)
    and keep it on that connection until the table is next analyzed; a table that grows by
    thousands of rows a second (authorizations) pays for that on every call."""
    settings = {"plan_cache_mode": "force_custom_plan"} if custom_plans else None
    pool = await asyncpg.create_pool(asyncpg_url(url), min_size=min_size, max_size=max_size,
                                     server_settings=settings, reset=_keep_session)
    assert pool is not None
    return pool


def migrations_dir(service: str) -> Path:
    """services/<service>/migrations."""
    package = importlib.import_module(f"services.{service}")
    assert package.__file__ is not None
    return Path(package.__file__).parent / "migrations"


def _alembic_config(service: str, url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir(service)))
    cfg.attributes["database_url"] = url
    cfg.attributes["schema"] = service
    return cfg


def migrate(service: str, url: str, revision: str = "head") -> None:
    """Upgrades `service`'s schema to `revision` (blocking; call from a thread in async code)."""
    command.upgrade(_alembic_config(service, url), revision)
    log.info("migrated", schema=service, revision=revision)


async def migrate_async(service: str, url: str) -> None:
    """`migrate` without blocking the event loop (Alembic runs its own loop in a thread)."""
    await asyncio.to_thread(migrate, service, url)


async def open_service_database(service: str, config: KitConfig, *,
                                custom_plans: bool = False) -> tuple[str, asyncpg.Pool]:
    """The first step of every service's composition root: its database URL (an embedded
    PostgreSQL where none is configured), its schema migrated when the config says so, and a
    pool of `db_pool_size` connections on it."""
    from tally.kit import infra

    url = config.database_url or infra.start_embedded_postgres(config.data_dir,
                                                               keep_running=False)
    if config.migrate_on_start:
        await migrate_async(service, url)
    return url, await create_pool(url, max_size=config.db_pool_size, custom_plans=custom_plans)


def on_database(database_url: str, config: KitConfig | None = None) -> KitConfig:
    """`config` (default: the defaults) pointed at an already migrated database: what each
    service's `build_for` builds on (tests, tools)."""
    from tally.kit.config import load_kit_config

    return dataclasses.replace(config or load_kit_config({}), database_url=database_url,
                               migrate_on_start=False)


def run_alembic_env(context: Any) -> None:
    """The body of every service's migrations/env.py: online migrations in the service schema.

    Takes an advisory lock so replicas that start together migrate one at a time.
    """
    cfg = context.config
    url: str = cfg.attributes["database_url"]
    schema: str = cfg.attributes["schema"]

    def do_migrations(connection: Any) -> None:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.configure(
            connection=connection,
            version_table="alembic_version",
            version_table_schema=schema,
            target_metadata=None,
            transaction_per_migration=False,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run() -> None:
        engine = create_async_engine(sqlalchemy_url(url))
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                await conn.commit()  # the session-level lock outlives this transaction
                try:
                    await conn.run_sync(do_migrations)
                    await conn.commit()
                except BaseException:
                    await conn.rollback()  # so the unlock below can run, and the cause shows
                    raise
                finally:
                    await conn.execute(
                        text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY}
                    )
                    await conn.commit()
        finally:
            await engine.dispose()

    asyncio.run(run())


def run_script(sql: str) -> None:
    """Runs a multi-statement SQL script inside a migration.

    asyncpg prepares every statement SQLAlchemy sends, and a prepared statement holds one
    command; a script goes through asyncpg's simple-query path on the same connection (and so
    in the same transaction) instead.
    """
    from alembic import op
    from sqlalchemy.util import await_only

    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_only(driver.execute(sql))


async def listen(database_url: str, channel: str, wake: Callable[[], None], stop: asyncio.Event,
                 retry_s: float = 1.0) -> None:
    """Calls `wake` on every NOTIFY on `channel` (by any replica), and once on each
    (re)connection to catch up on what was missed, until `stop`. Listens on a dedicated
    connection; reconnects after a loss."""
    while not stop.is_set():
        conn: Any = None
        try:
            conn = await asyncpg.connect(asyncpg_url(database_url))
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.add_listener(channel, lambda *_args: wake())
            wake()
            stopping = asyncio.create_task(stop.wait())
            losing = asyncio.create_task(lost.wait())
            await asyncio.wait({stopping, losing}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            losing.cancel()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("listener_lost", channel=channel, error=str(exc), retry_in_s=retry_s)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()
        if not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), retry_s)
            except TimeoutError:
                pass
