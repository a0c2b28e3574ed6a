"""Composition root of the ledger: config, pool, store, servicer, background sweepers."""

from __future__ import annotations

import asyncio
import gc

from services.ledger.servicer import LedgerServicer
from services.ledger.store import LedgerStore
from tally.kit import db, infra
from tally.kit.background import run_periodically
from tally.kit.config import KitConfig
from tally.kit.server import ServiceApp, run_service
from tally.ledger.v1 import ledger_pb2, ledger_pb2_grpc

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
SWEEP_INTERVAL_S = 1.0  # how late an expired hold or grant may be noticed
OUTBOX_SEAL_INTERVAL_S = 0.1  # how late an outbox event may become visible to consumers


async def build(config: KitConfig) -> ServiceApp:
    """Wires the ledger for `config` (an embedded database when none is configured)."""
    url = config.database_url or infra.start_embedded_postgres(config.data_dir,
                                                               keep_running=False)
    if config.migrate_on_start:
        await db.migrate_async("ledger", url)
    pool = await db.create_pool(url, max_size=config.db_pool_size)
    store = LedgerStore(pool)
    # Payment RPCs are declared but belong to a later issue: they answer UNIMPLEMENTED.
    shutting_down = asyncio.Event()
    servicer = LedgerServicer(store, shutting_down=shutting_down)  # type: ignore[abstract]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start_sweepers() -> None:
        tasks.append(asyncio.create_task(run_periodically(
            "expire_reservations", SWEEP_INTERVAL_S, store.expire_reservations, stop)))
        tasks.append(asyncio.create_task(run_periodically(
            "expire_grants", SWEEP_INTERVAL_S, store.expire_grants, stop)))
        tasks.append(asyncio.create_task(run_periodically(
            "seal_outbox", OUTBOX_SEAL_INTERVAL_S, store.seal_outbox, stop)))

    async def close() -> None:
        stop.set()
        await asyncio.gather(*tasks)
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
        on_start=[start_sweepers],
        on_stop=[close],
        shutting_down=shutting_down,
    )


def main() -> None:
    """`python -m services.ledger`."""
    run_service("ledger", build)
