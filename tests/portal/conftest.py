"""Portal tests share one suite per module (starting five services, the OIDC provider and
the portal takes seconds) on a database of their own; tests that change state use their own
order ids and keys."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.portal.support import Suite, open_suite


@pytest.fixture(scope="module")
async def suite(module_db_url: str, redis_url: str) -> AsyncIterator[Suite]:
    async with open_suite(module_db_url, redis_url) as opened:
        yield opened
