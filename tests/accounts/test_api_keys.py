"""API keys: shown once, stored as a digest, rotated with an overlap, revoked; the feed."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.accounts.domain import secret_digest
from tally.accounts.v1 import accounts_pb2 as pb
from tally.kit.errors import Reason

from .conftest import Stub, make_org
from .test_accounts import reason_of


async def with_env(stub: Stub) -> None:
    await make_org(stub)
    await stub.CreateProject(pb.CreateProjectRequest(org_id="acme", project_id="chat",
                                                     name="Chat"))
    await stub.CreateEnvironment(pb.CreateEnvironmentRequest(
        org_id="acme", project_id="chat", environment_id="prod", name="Production"))


async def create_key(stub: Stub, request_id: str = "k1", role: int = pb.ROLE_GATEWAY,
                     expire_time: Timestamp | None = None) -> pb.CreateApiKeyResponse:
    response: pb.CreateApiKeyResponse = await stub.CreateApiKey(pb.CreateApiKeyRequest(
        request_id=request_id, org_id="acme", project_id="chat", environment_id="prod",
        role=role, name="gateway", expire_time=expire_time))  # type: ignore[arg-type]
    return response


async def test_a_key_secret_is_shown_once_and_only_its_digest_is_stored(accounts: Stub,
                                                                        db_url: str) -> None:
    await with_env(accounts)
    created = await create_key(accounts)
    assert re.fullmatch(r"tly_prod_[A-Za-z0-9]{32}", created.secret)
    assert created.secret.startswith(created.key.prefix)
    assert created.key.role == pb.ROLE_GATEWAY
    replay = await create_key(accounts)
    assert replay.secret == "" and replay.key.key_id == created.key.key_id
    listed = await accounts.ListApiKeys(pb.ListApiKeysRequest(org_id="acme"))
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    conn = await asyncpg.connect(db_url)
    try:
        dump = await conn.fetchval("SELECT string_agg(t::text, '') FROM accounts.api_keys t")
    finally:
        await conn.close()
    assert created.secret not in dump
    assert secret_digest(created.secret) in dump


async def test_bad_key_requests_name_their_fields(accounts: Stub) -> None:
    await with_env(accounts)
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.CreateApiKey(pb.CreateApiKeyRequest(
            request_id="", org_id="acme", environment_id="prod", role=pb.ROLE_OWNER,
            name="", expire_time=past))
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = failure.value.details() or ""
    for name in ("request_id", "environment_id", "role", "name", "expire_time"):
        assert name in details
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.CreateApiKey(pb.CreateApiKeyRequest(
            request_id="x", org_id="acme", project_id="nope", role=pb.ROLE_VIEWER, name="n"))
    assert reason_of(failure.value) is Reason.NOT_FOUND


async def test_rotation_issues_a_successor_and_ends_the_old_key_after_the_overlap(
        accounts: Stub) -> None:
    await with_env(accounts)
    old = await create_key(accounts)
    rotated = await accounts.RotateApiKey(pb.RotateApiKeyRequest(
        request_id="r1", org_id="acme", key_id=old.key.key_id, overlap_seconds=3600))
    assert rotated.secret.startswith("tly_prod_") and rotated.secret != old.secret
    assert rotated.previous.replaced_by_key_id == rotated.key.key_id
    ends = rotated.previous.expire_time.ToDatetime(tzinfo=UTC)
    assert timedelta(minutes=59) < ends - datetime.now(UTC) <= timedelta(hours=1)
    assert (rotated.key.role, rotated.key.environment_id) == (pb.ROLE_GATEWAY, "prod")
    replay = await accounts.RotateApiKey(pb.RotateApiKeyRequest(
        request_id="r1", org_id="acme", key_id=old.key.key_id, overlap_seconds=3600))
    assert replay.secret == "" and replay.key.key_id == rotated.key.key_id
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.RotateApiKey(pb.RotateApiKeyRequest(
            request_id="r2", org_id="acme", key_id=old.key.key_id, overlap_seconds=60))
    assert reason_of(failure.value) is Reason.KEY_NOT_ACTIVE


async def test_the_credentials_feed_sends_a_snapshot_then_each_revocation(accounts: Stub
                                                                          ) -> None:
    await with_env(accounts)
    created = await create_key(accounts)
    stream = accounts.WatchCredentials(pb.WatchCredentialsRequest())
    snapshot = await stream.read()
    assert snapshot.is_snapshot
    assert [k.secret_sha256 for k in snapshot.keys] == [secret_digest(created.secret)]
    assert [m.member.subject for m in snapshot.members] == ["owner@acme.test"]
    await accounts.RevokeApiKey(pb.RevokeApiKeyRequest(org_id="acme",
                                                       key_id=created.key.key_id))
    update = await asyncio.wait_for(stream.read(), 5)
    assert not update.is_snapshot and update.revision > snapshot.revision
    assert [k.key.key_id for k in update.keys] == [created.key.key_id]
    assert update.keys[0].key.HasField("revoke_time")
    await accounts.RemoveMember(pb.RemoveMemberRequest(org_id="acme", subject="nobody@x.test"))
    await accounts.InviteMember(pb.InviteMemberRequest(org_id="acme", subject="v@acme.test",
                                                       role=pb.ROLE_VIEWER))
    update = await asyncio.wait_for(stream.read(), 5)
    assert [(m.member.subject, m.removed) for m in update.members] == [("v@acme.test", False)]
    stream.cancel()
