"""A real notifier server (in process, free port, real PostgreSQL) and a client to it.

The notifier follows the ledger's and metering's outboxes once serving; none run here, so it
keeps retrying them in the background, which alert-rule tests do not need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from services.notifier.server import build_for
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.infra import free_port
from tally.kit.server import RunningServer, start_server
from tally.sdk.client import TallyClient


@dataclass
class Notifier:
    """A running notifier, the config that reaches it, and a client to it."""

    db_url: str
    config: KitConfig
    server: RunningServer
    client: TallyClient


@asynccontextmanager
async def notifier_server(db_url: str) -> AsyncIterator[Notifier]:
    """A notifier on `db_url` (peers at ports nobody listens on) and a client to it."""
    config = dataclasses.replace(load_kit_config({}), ledger_port=free_port(),
                                 metering_port=free_port())
    # bound by the server (port 0), then told to the client: no window for another to take it
    server = await start_server(await build_for(db_url, config), port=0)
    config = dataclasses.replace(config, notifier_port=server.port)
    client = TallyClient({"notifier": config.address_of("notifier")}, actor="service:test")
    try:
        yield Notifier(db_url, config, server, client)
    finally:
        await client.close()
        await server.stop()


@pytest.fixture
async def notifier(db_url: str) -> AsyncIterator[Notifier]:
    async with notifier_server(db_url) as running:
        yield running
