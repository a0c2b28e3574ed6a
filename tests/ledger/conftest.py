"""A real ledger server (in process, port 0, real PostgreSQL) and a client to it. (The money
check after every test with a database is the shared one: tests/conftest.py.)"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp import web

from services.ledger.server import build
from tally.kit import db
from tally.kit.config import load_kit_config
from tally.kit.server import RunningServer, start_server
from tally.sdk.client import TallyClient
from tests.ledger.payments_support import Receiver


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test database, for tests of the store itself."""
    created = await db.create_pool(db_url, max_size=4)
    yield created
    await created.close()


@pytest.fixture
async def ledger_server(db_url: str) -> AsyncIterator[RunningServer]:
    config = dataclasses.replace(load_kit_config({}), database_url=db_url,
                                 migrate_on_start=False, db_pool_size=16)
    running = await start_server(await build(config), port=0)
    yield running
    await running.stop()


@pytest.fixture
async def tally(ledger_server: RunningServer) -> AsyncIterator[TallyClient]:
    async with TallyClient({"ledger": f"127.0.0.1:{ledger_server.port}"},
                           actor="user:test-operator") as client:
        yield client


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks/local", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/local"
    yield receiver
    await runner.cleanup()
