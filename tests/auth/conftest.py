"""Real credentials for the identity tests: an accounts server (the source of keys and
memberships), a local OIDC provider, and guards whose caches follow accounts' feed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as pb
from tally.kit.auth import CredentialCache, Guard, OidcVerifier
from tally.kit.policy import FINANCE, INTERNAL, OPERATOR
from tally.kit.server import TrustInternalCallers
from tests.accounts.conftest import Stub, accounts_server
from tests.support.oidc_provider import AUDIENCE, OidcProvider

ORGS = ("acme", "beta")
PERSON_ROLES = {"owner": pb.ROLE_OWNER, "admin": pb.ROLE_ADMIN, "billing": pb.ROLE_BILLING,
                "developer": pb.ROLE_DEVELOPER, "viewer": pb.ROLE_VIEWER}
SERVICES: dict[str, tuple[frozenset[str], frozenset[str] | None]] = {
    "metering": (frozenset({INTERNAL}), None),
    "ops": (frozenset({OPERATOR}), None),
    "finance-a": (frozenset({FINANCE}), None),
    "finance-b": (frozenset({FINANCE}), None),
}
"""Service identities the guards know (presented through the mesh header in these tests)."""
SERVICE_OF_ROLE = {INTERNAL: "metering", OPERATOR: "ops", FINANCE: "finance-a"}


def mesh(service: str) -> dict[str, str]:
    """Metadata of a call from `service` as Linkerd's proxy presents it."""
    return {"l5d-client-id": f"{service}.tally.serviceaccount.identity.linkerd.cluster.local"}


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


@dataclass
class Identities:
    """Makes real credentials and guards that verify them."""

    accounts: Stub
    address: str
    provider: OidcProvider
    guards: list[Guard] = field(default_factory=list)
    _keys: int = 0

    def guard(self, *, min_refresh_s: float = 30.0) -> Guard:
        """A guard following accounts' feed (started by `started`)."""
        cache = CredentialCache()
        channel = grpc.aio.insecure_channel(self.address)

        async def follow(stop: asyncio.Event) -> None:
            try:
                await cache.follow(channel, stop, 0.1)
            finally:
                await channel.close()

        guard = Guard(cache, OidcVerifier(self.provider.issuer, AUDIENCE,
                                          min_refresh_s=min_refresh_s),
                      SERVICES, mesh_identity=True, follow=follow)
        self.guards.append(guard)
        return guard

    async def started(self, guard: Guard) -> Guard:
        await guard.start()
        await asyncio.wait_for(guard.cache.ready.wait(), 10)
        return guard

    async def key(self, org: str, role: int, **fields: Any) -> pb.CreateApiKeyResponse:
        """A new API key."""
        self._keys += 1
        response: pb.CreateApiKeyResponse = await self.accounts.CreateApiKey(
            pb.CreateApiKeyRequest(request_id=f"key-{self._keys}", org_id=org, role=role,
                                   name=f"test key {self._keys}", **fields))
        return response

    async def person(self, org: str, role: str) -> str:
        """A member of `org` with `role` (its OIDC subject)."""
        subject = f"{role}@{org}.test"
        if role != "owner":
            await self.accounts.InviteMember(pb.InviteMemberRequest(
                org_id=org, subject=subject, role=PERSON_ROLES[role]))
        return subject

    async def synced(self, *guards: Guard) -> None:
        """Waits until every guard's cache holds every change made so far."""
        stream = self.accounts.WatchCredentials(pb.WatchCredentialsRequest())
        revision = (await stream.read()).revision
        stream.cancel()
        deadline = time.monotonic() + 10
        for guard in guards or self.guards:
            while True:
                if guard.cache.revision >= revision:
                    break
                assert time.monotonic() < deadline, "a guard's cache did not catch up"
                await asyncio.sleep(0.01)


@asynccontextmanager
async def identities(db_url: str) -> AsyncIterator[Identities]:
    """Accounts (its own callers trusted: it is the source of credentials here) with two orgs,
    a project and an environment in each, and a local OIDC provider."""
    provider = await OidcProvider().start()
    async with accounts_server(db_url, authenticator=TrustInternalCallers()) as (running, stub):
        for org in ORGS:
            await stub.CreateOrg(pb.CreateOrgRequest(org_id=org, name=org, region="eu-west",
                                                     seat_limit=20,
                                                     owner_subject=f"owner@{org}.test"))
            await stub.CreateProject(pb.CreateProjectRequest(org_id=org, project_id="chat",
                                                             name="Chat"))
            await stub.CreateEnvironment(pb.CreateEnvironmentRequest(
                org_id=org, project_id="chat", environment_id="prod", name="Production"))
        ids = Identities(stub, f"127.0.0.1:{running.port}", provider)
        try:
            yield ids
        finally:
            for guard in ids.guards:
                await guard.stop()
            await provider.stop()


@pytest.fixture
async def ids(db_url: str) -> AsyncIterator[Identities]:
    async with identities(db_url) as made:
        yield made
