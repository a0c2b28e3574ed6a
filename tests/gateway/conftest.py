"""The OpenAI-compatible gateway in front of the real pricing, ledger, metering and accounts
services (in process, free ports, one database), with the fake upstream model."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import openai
import pytest

from examples.gateway.server import GatewayConfig, RunningGateway, running
from services.accounts.server import AccountsConfig
from services.accounts.server import build_for as build_accounts
from tally.accounts.v1 import accounts_pb2 as apb
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

    def openai(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        # no retries: a test sees every refusal the gateway answers
        return openai.AsyncOpenAI(base_url=self.gateway.url, api_key=api_key or self.api_key,
                                  max_retries=0)

    async def posted(self, org: str = ORG) -> int:
        reply = await self.tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))
        return int(reply.balance.posted_micros)


@asynccontextmanager
async def stack_for(db_url: str, usage: str = "record") -> AsyncIterator[Stack]:
    suite = await start_suite(db_url)
    accounts = await start_server(await build_accounts(db_url, settings=AccountsConfig(
        regions=frozenset({"local"}))), port=0)
    config = dataclasses.replace(suite.config, accounts_port=accounts.port)
    tally = TallyClient({s: config.address_of(s) for s in
                         ("pricing", "ledger", "metering", "accounts")}, actor="service:test")
    try:
        await tally.accounts.CreateOrg(apb.CreateOrgRequest(
            org_id=ORG, name="Acme", region="local", seat_limit=3, owner_subject="owner@acme"))
        created = await tally.accounts.CreateApiKey(apb.CreateApiKeyRequest(
            request_id="key-1", org_id=ORG, role=apb.ROLE_DEVELOPER, name="app"))
        await suite.fund(ORG, 100)
        settings = GatewayConfig(port=0, upstream_port=0, usage=usage)
        async with running(config, settings) as gateway:
            yield Stack(suite, accounts, tally, gateway, created.secret, created.key.key_id)
    finally:
        await tally.close()
        await accounts.stop()
        await stop_suite(suite)


@pytest.fixture
async def stack(db_url: str) -> AsyncIterator[Stack]:
    async with stack_for(db_url) as running_stack:
        yield running_stack
