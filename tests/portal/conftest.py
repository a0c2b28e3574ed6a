"""Portal tests share one suite per module (starting five services, the OIDC provider and
the portal takes seconds) on a database of their own; tests that change state use their own
order ids and keys."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tally.kit import db
from tests.portal.support import Suite, open_suite


@pytest.fixture(scope="module")
async def module_db_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test module, dropped afterwards."""
    name = f"tally_m_{uuid.uuid4().hex[:12]}"
    template = urlsplit(template_url).path.lstrip("/")
    conn = await asyncpg.connect(db.asyncpg_url(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    parts = urlsplit(server_url)
    yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    conn = await asyncpg.connect(db.asyncpg_url(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def suite(module_db_url: str) -> AsyncIterator[Suite]:
    async with open_suite(module_db_url) as opened:
        yield opened
