"""A real ledger server (in process, port 0, real PostgreSQL) and a client to it; and, after
every test of these modules that had a database, the money check: the reconciliation finds no
mismatch and the ledger verifies (hash chains, zero sum), or the test fails."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import pytest
from aiohttp import web

from services.ledger.billing import reconcile
from services.ledger.domain import ChainReport
from services.ledger.server import build
from services.ledger.store import LedgerStore
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


ALL_TIME = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


@pytest.fixture(autouse=True)
def money_reconciles(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that had a database (its own, cloned from the template: so only what the
    test moved is checked, in a few milliseconds), every paid order has its invoice and
    credit, every refund its credit note and reversal, every usage receipt its debit, and the
    ledger's hash chains and zero sum verify. Tests that alter the ledger on purpose are
    marked `ledger_tampered`. (A plain fixture: it asks for `db_url` only when the test does,
    and checks on a loop of its own once the test's loop is done.)"""
    if "db_url" not in request.fixturenames or request.node.get_closest_marker(
            "ledger_tampered"):
        yield
        return
    url = request.getfixturevalue("db_url")
    yield
    if hasattr(request.node, "rep_call") and not request.node.rep_call.passed:
        return  # the test failed already; its own failure is the one to read
    found, report = asyncio.run(_check_money(url))
    assert found.mismatches == [], f"money does not reconcile: {found.mismatches}"
    assert report.ok, f"the ledger does not verify: {report}"


async def _check_money(url: str) -> tuple[reconcile.Reconciliation, ChainReport]:
    checked = await db.create_pool(url, min_size=1, max_size=1)
    try:
        async with checked.acquire() as conn:
            found = await reconcile.reconcile(conn, *ALL_TIME)
        return found, await LedgerStore(checked).verify()
    finally:
        await checked.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    """Keeps the call phase's report on the item, for money_reconciles to read."""
    report: pytest.TestReport = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


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
