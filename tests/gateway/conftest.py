"""The OpenAI-compatible gateway in front of the real pricing, ledger, metering and accounts
services (in process, free ports, one database), with the fake upstream model.

Starting all of it takes seconds, so the tests of a module share one stack (and its own
database); each test gets a fresh org with its own API key and credit, so no test sees
another's budgets, quotas, policies, usage or balance."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import openai
import pytest

from examples.gateway.server import GatewayConfig, RunningGateway, running
from services.accounts.server import AccountsConfig
from services.accounts.server import build_for as build_accounts
from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit.errors import TallyError
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.sdk.client import TallyClient
from tests.metering.conftest import Suite, start_suite, stop_suite

ORG = "acme"


@dataclass
class Stack:
    """Tally, the gateway, and an openai client holding an API key of ORG."""

    suite: Suite
    accounts: RunningServer
    tally: TallyClient
    gateway: RunningGateway
    api_key: str
    key_id: str
    org: str = ORG

    def openai(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        # no retries: a test sees every refusal the gateway answers
        return openai.AsyncOpenAI(base_url=self.gateway.url, api_key=api_key or self.api_key,
                                  max_retries=0)

    async def posted(self) -> int:
        reply = await self.tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=self.org))
        return int(reply.balance.posted_micros)

    async def with_new_org(self) -> Stack:
        """This stack acting for a new org: its own API key (known to the gateway when this
        returns) and 100 credits."""
        org = f"org-{uuid.uuid4().hex[:10]}"
        key = await provision(self.tally, self.suite, org)
        credentials = self.gateway.gateway.credentials
        for _ in range(500):  # accounts' credentials feed brings the key to the gateway
            try:
                credentials.key(key.secret)
                break
            except TallyError:
                await asyncio.sleep(0.01)
        return dataclasses.replace(self, org=org, api_key=key.secret, key_id=key.key.key_id)


async def provision(tally: TallyClient, suite: Suite, org: str) -> apb.CreateApiKeyResponse:
    await tally.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id=org, name=org, region="local", seat_limit=3, owner_subject=f"owner@{org}"))
    created: apb.CreateApiKeyResponse = await tally.accounts.CreateApiKey(
        apb.CreateApiKeyRequest(request_id=f"key-{org}", org_id=org, role=apb.ROLE_DEVELOPER,
                                name="app"))
    await suite.fund(org, 100)
    return created


@asynccontextmanager
async def stack_for(db_url: str, usage: str = "record") -> AsyncIterator[Stack]:
    suite = await start_suite(db_url)
    accounts = await start_server(await build_accounts(db_url, settings=AccountsConfig(
        regions=frozenset({"local"}))), port=0)
    config = dataclasses.replace(suite.config, accounts_port=accounts.port)
    tally = TallyClient({s: config.address_of(s) for s in
                         ("pricing", "ledger", "metering", "accounts")}, actor="service:test")
    try:
        created = await provision(tally, suite, ORG)
        settings = GatewayConfig(port=0, upstream_port=0, usage=usage)
        async with running(config, settings) as gateway:
            yield Stack(suite, accounts, tally, gateway, created.secret, created.key.key_id)
    finally:
        await tally.close()
        await accounts.stop()
        await stop_suite(suite)


@pytest.fixture(scope="module")
async def shared_stack(module_db_url: str) -> AsyncIterator[Stack]:
    async with stack_for(module_db_url) as running_stack:
        yield running_stack


@pytest.fixture
async def stack(shared_stack: Stack) -> Stack:
    """The module's stack acting for a new org of this test."""
    return await shared_stack.with_new_org()
