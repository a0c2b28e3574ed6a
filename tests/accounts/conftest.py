"""A real accounts server (in process, port 0, real PostgreSQL) and helpers to talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

import grpc
import pytest

from services.accounts.server import AccountsConfig, build_for
from tally.accounts.v1 import accounts_pb2 as pb
from tally.accounts.v1 import accounts_pb2_grpc
from tally.kit.server import Authenticator, RunningServer, start_server

Stub: TypeAlias = "accounts_pb2_grpc.AccountsServiceAsyncStub"

SETTINGS = AccountsConfig(regions=frozenset({"eu-west", "us-east"}), watch_lifetime_s=30)


@asynccontextmanager
async def accounts_server(db_url: str, settings: AccountsConfig = SETTINGS,
                          authenticator: Authenticator | None = None
                          ) -> AsyncIterator[tuple[RunningServer, Stub]]:
    """An accounts server on `db_url` and a stub to it."""
    running = await start_server(await build_for(db_url, settings=settings), port=0,
                                 authenticator=authenticator)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, accounts_pb2_grpc.AccountsServiceStub(channel)
    finally:
        await running.stop()


@pytest.fixture
async def accounts(db_url: str) -> AsyncIterator[Stub]:
    async with accounts_server(db_url) as (_, stub):
        yield stub


async def make_org(stub: Stub, org_id: str = "acme", seat_limit: int = 3,
                   owner: str = "owner@acme.test", region: str = "eu-west") -> pb.Org:
    """An org with one owner."""
    response: pb.CreateOrgResponse = await stub.CreateOrg(pb.CreateOrgRequest(
        org_id=org_id, name=org_id.title(), region=region, seat_limit=seat_limit,
        owner_subject=owner))
    return response.org
