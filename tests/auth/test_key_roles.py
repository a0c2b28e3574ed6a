"""Who may manage which API keys, decided by accounts itself on the verified caller (not only
by the portal): developers manage developer, viewer and gateway keys and never mint, rotate or
revoke a stronger one; viewers manage none; owners and admins any key role."""

from __future__ import annotations

import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as pb
from tally.kit import policy
from tests.accounts.conftest import accounts_server

from .conftest import Identities, bearer

STRONGER_THAN_DEVELOPER = (pb.ROLE_ADMIN, pb.ROLE_BILLING)
NO_STRONGER_THAN_DEVELOPER = (pb.ROLE_DEVELOPER, pb.ROLE_VIEWER, pb.ROLE_GATEWAY)


def test_the_table_lets_a_developer_manage_exactly_the_roles_weaker_than_their_own() -> None:
    developer = frozenset({policy.DEVELOPER})
    assert {r for r in ("admin", "billing", "developer", "viewer", "gateway")
            if policy.may_manage_key_role(developer, r)} == {"developer", "viewer", "gateway"}
    assert not any(policy.may_manage_key_role(frozenset({policy.VIEWER}), r)
                   for r in ("developer", "viewer", "gateway"))
    assert all(policy.may_manage_key_role(frozenset({policy.ADMIN}), r)
               for r in ("admin", "billing", "developer", "viewer", "gateway"))


async def test_a_developer_manages_weaker_keys_and_accounts_refuses_every_escalation(
        ids: Identities, db_url: str) -> None:
    developer = await ids.person("acme", "developer")
    viewer = await ids.person("acme", "viewer")
    strong = await ids.key("acme", pb.ROLE_ADMIN)
    guard = ids.guard()
    async with accounts_server(db_url, authenticator=guard) as (_, stub):
        await ids.started(guard)
        await ids.synced(guard)
        as_dev = tuple(bearer(ids.provider.token(developer)).items())
        as_viewer = tuple(bearer(ids.provider.token(viewer)).items())
        for n, role in enumerate(STRONGER_THAN_DEVELOPER):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateApiKey(pb.CreateApiKeyRequest(
                    request_id=f"escalate-{n}", org_id="acme", role=role, name="mine"),
                    metadata=as_dev)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "stronger than your role" in (refused.value.details() or "")
        for name, call in (("rotate", stub.RotateApiKey(pb.RotateApiKeyRequest(
                request_id="rotate-admin", org_id="acme", key_id=strong.key.key_id),
                metadata=as_dev)), ("revoke", stub.RevokeApiKey(pb.RevokeApiKeyRequest(
                    org_id="acme", key_id=strong.key.key_id), metadata=as_dev))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
        made = []
        for n, role in enumerate(NO_STRONGER_THAN_DEVELOPER):
            made.append(await stub.CreateApiKey(pb.CreateApiKeyRequest(
                request_id=f"dev-key-{n}", org_id="acme", role=role, name=f"dev {n}"),
                metadata=as_dev))
        assert all(m.secret for m in made)
        rotated = await stub.RotateApiKey(pb.RotateApiKeyRequest(
            request_id="dev-rotate", org_id="acme", key_id=made[0].key.key_id),
            metadata=as_dev)
        assert rotated.key.role == pb.ROLE_DEVELOPER and rotated.secret
        await stub.RevokeApiKey(pb.RevokeApiKeyRequest(org_id="acme",
                                                       key_id=made[1].key.key_id),
                                metadata=as_dev)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateApiKey(pb.CreateApiKeyRequest(
                request_id="viewer-key", org_id="acme", role=pb.ROLE_VIEWER, name="v"),
                metadata=as_viewer)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        keys = {k.key_id: k for k in (await ids.accounts.ListApiKeys(
            pb.ListApiKeysRequest(org_id="acme", page_size=100))).keys}
        assert not keys[strong.key.key_id].HasField("revoke_time")
        assert keys[made[1].key.key_id].HasField("revoke_time")
        assert {k.role for k in keys.values()} <= {pb.ROLE_ADMIN, *NO_STRONGER_THAN_DEVELOPER}
        assert sum(k.role == pb.ROLE_ADMIN for k in keys.values()) == 1
