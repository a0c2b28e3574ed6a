"""Real infrastructure for the whole suite.

PostgreSQL: the server named by TALLY_DATABASE_URL, else an embedded one started here. The
schemas of all four services are migrated once into a template database; every test that asks
for `db_url` gets its own database cloned from it, so tests never see each other's rows.
Redis: TALLY_REDIS_URL, else an embedded Valkey. If neither a configured nor an embedded server
can be had, the session errors out: a missing database never turns into skipped tests.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tally.kit import db, infra
from tests.support.money import money_problems

REPO = Path(__file__).resolve().parent.parent
TEST_DATA_DIR = REPO / ".tally" / "test"

# Every ledger a test starts serves webhooks and checkout pages over HTTP too; on the default
# ports two of them (or a `tally up` on this machine) would collide.
os.environ.setdefault("TALLY_LEDGER_WEBHOOK_PORT", "0")
os.environ.setdefault("TALLY_LEDGER_CHECKOUT_PORT", "0")
# The suites written before identity landed call without credentials: they run the servers in
# development mode, explicitly. The identity tests (tests/auth) pass a real guard and real
# credentials to the servers they start.
os.environ.setdefault("TALLY_AUTH_MODE", "trust")
# A ledger asks metering for the usage events of its batches (statements, Reconcile). A test
# ledger without a metering of its own would ask whatever listens on metering's default port
# on this machine: only suites that start metering beside the ledger turn it on.
os.environ.setdefault("TALLY_LEDGER_ITEMIZE_USAGE", "false")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def server_url() -> str:
    """A PostgreSQL server we may create databases on (configured, else embedded)."""
    configured = os.environ.get("TALLY_DATABASE_URL")
    if configured:
        return configured
    try:
        return infra.start_embedded_postgres(TEST_DATA_DIR, keep_running=False)
    except infra.InfraError as exc:
        pytest.exit(f"no PostgreSQL: TALLY_DATABASE_URL is unset and {exc}", returncode=3)
        raise


@pytest.fixture(scope="session")
def template_url(server_url: str) -> Iterator[str]:
    """A database with every service's schema migrated, used as the template for tests."""
    name = f"tally_tpl_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(db.asyncpg_url(server_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = _with_database(server_url, name)
    for service in db.SERVICES:
        db.migrate(service, url)
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@asynccontextmanager
async def fresh_database(server_url: str, template_url: str, prefix: str = "tally_t",
                         check_money: Callable[[], bool] = lambda: True
                         ) -> AsyncIterator[str]:
    """A fresh, fully migrated database copied from the template, dropped afterwards (for a
    test, a module, or each region of a residency test).

    Before it is dropped, if `check_money()` says so and the ledger was used, the money check
    runs over it (tests/support/money.py: reconciliation including metering's events, hash
    chains, zero sum, snapshots and statements) and fails the test with what does not add
    up. So every test that moves money is checked, whichever suite it is in; tests that alter
    money on purpose are marked `ledger_tampered`."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    template = urlsplit(template_url).path.lstrip("/")
    conn = await asyncpg.connect(db.asyncpg_url(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    url = _with_database(server_url, name)
    try:
        yield url
        if check_money():
            problems = await money_problems(url)
            assert not problems, "money check failed:\n" + "\n".join(problems)
    finally:
        conn = await asyncpg.connect(db.asyncpg_url(server_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def _money_checked(node: pytest.Item | pytest.Collector) -> Callable[[], bool]:
    """Whether to run the money check once `node` is done: not when it is marked
    `ledger_tampered`, nor after a test that failed already (its own failure is the one to
    read)."""
    def check() -> bool:
        if node.get_closest_marker("ledger_tampered"):
            return False
        report = getattr(node, "rep_call", None)
        return report is None or report.passed
    return check


@pytest.fixture
async def db_url(server_url: str, template_url: str, request: pytest.FixtureRequest
                 ) -> AsyncIterator[str]:
    """A fresh, fully migrated database for one test, money-checked and dropped afterwards."""
    async with fresh_database(server_url, template_url,
                              check_money=_money_checked(request.node)) as url:
        yield url


@pytest.fixture(scope="module")
async def module_db_url(server_url: str, template_url: str, request: pytest.FixtureRequest
                        ) -> AsyncIterator[str]:
    """A fresh, fully migrated database shared by one test module, money-checked and dropped
    afterwards."""
    async with fresh_database(server_url, template_url, prefix="tally_m",
                              check_money=_money_checked(request.node)) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis-compatible server (configured, else an embedded Valkey stopped at the end)."""
    configured = os.environ.get("TALLY_REDIS_URL")
    if configured:
        yield configured
        return
    try:
        server = infra.start_embedded_redis(TEST_DATA_DIR)
    except infra.InfraError as exc:
        pytest.exit(f"no Redis: TALLY_REDIS_URL is unset and {exc}", returncode=3)
        raise
    yield server.url
    server.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    """Keeps the call phase's report on the item, for the money check to read."""
    report: pytest.TestReport = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
