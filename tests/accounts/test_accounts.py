"""Orgs, projects, environments, members and seats through a real accounts server."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as pb
from tally.kit.errors import Reason, from_rpc_error

from .conftest import Stub, make_org


def reason_of(exc: grpc.aio.AioRpcError) -> Reason:
    error = from_rpc_error(exc)
    assert error is not None, exc
    return error.reason


async def test_an_org_is_created_once_in_its_region_with_its_owner(accounts: Stub) -> None:
    org = await make_org(accounts)
    assert (org.org_id, org.region, org.seat_limit) == ("acme", "eu-west", 3)
    again = await make_org(accounts)
    assert again.create_time == org.create_time
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await make_org(accounts, seat_limit=9)
    assert reason_of(failure.value) is Reason.IDEMPOTENCY_KEY_REUSED
    members = await accounts.ListMembers(pb.ListMembersRequest(org_id="acme"))
    assert [(m.subject, m.role) for m in members.members] == [
        ("owner@acme.test", pb.ROLE_OWNER)]


async def test_an_org_in_a_region_this_deployment_does_not_serve_is_refused_naming_region(
        accounts: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await make_org(accounts, region="ap-south")
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "region" in (failure.value.details() or "")


async def test_bad_org_input_names_every_field(accounts: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.CreateOrg(pb.CreateOrgRequest(org_id="Bad Id", name="", region="x",
                                                     seat_limit=0, owner_subject=""))
    error = from_rpc_error(failure.value)
    assert error is not None
    assert {v.field for v in error.violations} == {
        "org_id", "name", "region", "seat_limit", "owner_subject"}


async def test_projects_and_environments_belong_to_their_org(accounts: Stub) -> None:
    await make_org(accounts)
    await accounts.CreateProject(pb.CreateProjectRequest(org_id="acme", project_id="chat",
                                                         name="Chat"))
    await accounts.CreateEnvironment(pb.CreateEnvironmentRequest(
        org_id="acme", project_id="chat", environment_id="prod", name="Production"))
    envs = await accounts.ListEnvironments(pb.ListEnvironmentsRequest(org_id="acme",
                                                                      project_id="chat"))
    assert [e.environment_id for e in envs.environments] == ["prod"]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.CreateEnvironment(pb.CreateEnvironmentRequest(
            org_id="acme", project_id="nope", environment_id="prod", name="P"))
    assert reason_of(failure.value) is Reason.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.CreateProject(pb.CreateProjectRequest(org_id="ghost", project_id="p",
                                                             name="P"))
    assert reason_of(failure.value) is Reason.NOT_FOUND


async def test_paid_seats_are_refused_past_the_limit_and_viewers_are_free(accounts: Stub
                                                                          ) -> None:
    await make_org(accounts, seat_limit=2)  # the owner takes one
    await accounts.InviteMember(pb.InviteMemberRequest(org_id="acme", subject="dev@acme.test",
                                                       role=pb.ROLE_DEVELOPER))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.InviteMember(pb.InviteMemberRequest(
            org_id="acme", subject="admin@acme.test", role=pb.ROLE_ADMIN))
    assert failure.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(failure.value) is Reason.SEAT_LIMIT_REACHED
    assert "2 of 2 paid seats" in (failure.value.details() or "")
    for i in range(5):
        await accounts.InviteMember(pb.InviteMemberRequest(
            org_id="acme", subject=f"viewer{i}@acme.test", role=pb.ROLE_VIEWER))
    await accounts.InviteMember(pb.InviteMemberRequest(
        org_id="acme", subject="books@acme.test", role=pb.ROLE_BILLING))
    with pytest.raises(grpc.aio.AioRpcError) as failure:  # promotion takes a seat too
        await accounts.ChangeMemberRole(pb.ChangeMemberRoleRequest(
            org_id="acme", subject="viewer0@acme.test", role=pb.ROLE_DEVELOPER))
    assert reason_of(failure.value) is Reason.SEAT_LIMIT_REACHED
    await accounts.RemoveMember(pb.RemoveMemberRequest(org_id="acme",
                                                       subject="dev@acme.test"))
    await accounts.ChangeMemberRole(pb.ChangeMemberRoleRequest(
        org_id="acme", subject="viewer0@acme.test", role=pb.ROLE_DEVELOPER))
    usage = await accounts.GetSeatUsage(pb.GetSeatUsageRequest(org_id="acme"))
    assert (usage.seat_limit, usage.paid_seats, usage.free_seats) == (2, 2, 5)


async def test_twenty_concurrent_invitations_never_pass_the_seat_limit(accounts: Stub,
                                                                        db_url: str) -> None:
    await make_org(accounts, seat_limit=5)

    async def invite(i: int) -> bool:
        try:
            await accounts.InviteMember(pb.InviteMemberRequest(
                org_id="acme", subject=f"dev{i}@acme.test", role=pb.ROLE_DEVELOPER))
            return True
        except grpc.aio.AioRpcError as exc:
            assert reason_of(exc) is Reason.SEAT_LIMIT_REACHED
            return False

    results = await asyncio.gather(*(invite(i) for i in range(20)))
    assert sum(results) == 4
    conn = await asyncpg.connect(db_url)
    try:
        paid = await conn.fetchval("SELECT count(*) FROM accounts.members WHERE org_id = "
                                   "'acme' AND role IN ('owner', 'admin', 'developer')")
    finally:
        await conn.close()
    assert paid == 5


async def test_an_org_always_keeps_an_owner(accounts: Stub) -> None:
    await make_org(accounts)
    for call in (accounts.RemoveMember(pb.RemoveMemberRequest(
                     org_id="acme", subject="owner@acme.test")),
                 accounts.ChangeMemberRole(pb.ChangeMemberRoleRequest(
                     org_id="acme", subject="owner@acme.test", role=pb.ROLE_VIEWER))):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert reason_of(failure.value) is Reason.LAST_OWNER
    await accounts.InviteMember(pb.InviteMemberRequest(org_id="acme", subject="two@acme.test",
                                                       role=pb.ROLE_OWNER))
    removed = await accounts.RemoveMember(pb.RemoveMemberRequest(
        org_id="acme", subject="Owner@Acme.test"))
    assert removed.removed
