"""tally.accounts.v1.AccountsService: proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tally.accounts.v1 import accounts_pb2 as pb
from tally.accounts.v1 import accounts_pb2_grpc
from tally.kit.paging import next_offset_token
from tally.kit.protoconv import from_timestamp
from tally.kit.server import current_principal, until_shutdown

from . import audit, convert
from .domain import Accounts, CredentialHub, key_request, list_page, now_utc
from .store import AccountsPgStore, AuditPgStore

Context = grpc.aio.ServicerContext[Any, Any]


def _actor() -> str:
    principal = current_principal.get()
    return principal.identity if principal else "service:anonymous"


def _caller_roles(org_id: str) -> frozenset[str] | None:
    """The verified caller's roles in `org_id`; None in development mode (nothing verified)."""
    principal = current_principal.get()
    if principal is None or not principal.is_verified:
        return None
    return principal.roles_in(org_id)


class AccountsServicer(accounts_pb2_grpc.AccountsServiceServicer):
    """Translates AccountsService calls to the Accounts domain."""

    def __init__(self, accounts: Accounts, store: AccountsPgStore, hub: CredentialHub,
                 audit_store: AuditPgStore, *, watch_lifetime_s: float,
                 shutting_down: asyncio.Event | None = None) -> None:
        self.accounts = accounts
        self.audit = audit_store
        self.store = store
        self.hub = hub
        self.watch_lifetime_s = watch_lifetime_s
        self.shutting_down = shutting_down or asyncio.Event()

    async def CreateOrg(self, request: pb.CreateOrgRequest, context: Context
                        ) -> pb.CreateOrgResponse:
        """An org pinned to a region, with its first owner."""
        org, owner = await self.accounts.create_org(
            org_id=request.org_id, name=request.name, region=request.region,
            seat_limit=request.seat_limit, owner_subject=request.owner_subject)
        return pb.CreateOrgResponse(org=convert.org_to_proto(org),
                                    owner=convert.member_to_proto(owner))

    async def GetOrg(self, request: pb.GetOrgRequest, context: Context) -> pb.GetOrgResponse:
        """One org."""
        return pb.GetOrgResponse(org=convert.org_to_proto(
            await self.accounts.get_org(request.org_id)))

    async def SetSsoRequired(self, request: pb.SetSsoRequiredRequest, context: Context
                             ) -> pb.SetSsoRequiredResponse:
        """Requires (or not) single sign-on for the org's people."""
        org = await self.accounts.set_sso_required(org_id=request.org_id,
                                                   is_sso_required=request.is_sso_required)
        return pb.SetSsoRequiredResponse(org=convert.org_to_proto(org))

    async def CreateProject(self, request: pb.CreateProjectRequest, context: Context
                            ) -> pb.CreateProjectResponse:
        """A project of an org."""
        project = await self.accounts.create_project(
            org_id=request.org_id, project_id=request.project_id, name=request.name)
        return pb.CreateProjectResponse(project=convert.project_to_proto(project))

    async def ListProjects(self, request: pb.ListProjectsRequest, context: Context
                           ) -> pb.ListProjectsResponse:
        """An org's projects."""
        page = list_page(request.page_size, request.page_token)
        projects, total = await self.store.list_projects(request.org_id, page)
        return pb.ListProjectsResponse(
            projects=[convert.project_to_proto(p) for p in projects],
            next_page_token=next_offset_token(page, len(projects), total))

    async def CreateEnvironment(self, request: pb.CreateEnvironmentRequest, context: Context
                                ) -> pb.CreateEnvironmentResponse:
        """An environment of a project."""
        environment = await self.accounts.create_environment(
            org_id=request.org_id, project_id=request.project_id,
            environment_id=request.environment_id, name=request.name)
        return pb.CreateEnvironmentResponse(
            environment=convert.environment_to_proto(environment))

    async def ListEnvironments(self, request: pb.ListEnvironmentsRequest, context: Context
                               ) -> pb.ListEnvironmentsResponse:
        """A project's environments."""
        page = list_page(request.page_size, request.page_token)
        found, total = await self.store.list_environments(request.org_id, request.project_id,
                                                          page)
        return pb.ListEnvironmentsResponse(
            environments=[convert.environment_to_proto(e) for e in found],
            next_page_token=next_offset_token(page, len(found), total))

    async def InviteMember(self, request: pb.InviteMemberRequest, context: Context
                           ) -> pb.InviteMemberResponse:
        """Adds a member."""
        member = await self.accounts.invite_member(
            org_id=request.org_id, subject=request.subject, role=convert.role_in(request.role))
        return pb.InviteMemberResponse(member=convert.member_to_proto(member))

    async def ChangeMemberRole(self, request: pb.ChangeMemberRoleRequest, context: Context
                               ) -> pb.ChangeMemberRoleResponse:
        """Changes a member's role."""
        member = await self.accounts.change_member_role(
            org_id=request.org_id, subject=request.subject, role=convert.role_in(request.role))
        return pb.ChangeMemberRoleResponse(member=convert.member_to_proto(member))

    async def RemoveMember(self, request: pb.RemoveMemberRequest, context: Context
                           ) -> pb.RemoveMemberResponse:
        """Removes a member."""
        removed = await self.accounts.remove_member(org_id=request.org_id,
                                                    subject=request.subject)
        return pb.RemoveMemberResponse(removed=removed)

    async def ListMembers(self, request: pb.ListMembersRequest, context: Context
                          ) -> pb.ListMembersResponse:
        """An org's members."""
        page = list_page(request.page_size, request.page_token)
        members, total = await self.store.list_members(request.org_id, page)
        return pb.ListMembersResponse(
            members=[convert.member_to_proto(m) for m in members],
            next_page_token=next_offset_token(page, len(members), total))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context
                           ) -> pb.CreateApiKeyResponse:
        """A new key; its secret only in this answer."""
        issued = await self.accounts.create_key(key_request(
            request_id=request.request_id, org_id=request.org_id,
            project_id=request.project_id, environment_id=request.environment_id,
            role=convert.role_in(request.role), name=request.name,
            expires_at=from_timestamp(request, "expire_time"), created_by=_actor(),
            now=now_utc()), _caller_roles(request.org_id))
        return convert.issued_to_create(issued)

    async def RotateApiKey(self, request: pb.RotateApiKeyRequest, context: Context
                           ) -> pb.RotateApiKeyResponse:
        """A successor key; the old one works through the overlap."""
        issued = await self.accounts.rotate_key(
            request_id=request.request_id, org_id=request.org_id, key_id=request.key_id,
            overlap_seconds=request.overlap_seconds, created_by=_actor(),
            caller_roles=_caller_roles(request.org_id))
        return convert.issued_to_rotate(issued)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context
                           ) -> pb.RevokeApiKeyResponse:
        """Revokes a key."""
        key = await self.accounts.revoke_key(org_id=request.org_id, key_id=request.key_id,
                                             caller_roles=_caller_roles(request.org_id))
        return pb.RevokeApiKeyResponse(key=convert.key_to_proto(key))

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context
                          ) -> pb.ListApiKeysResponse:
        """An org's keys (never secrets)."""
        page = list_page(request.page_size, request.page_token)
        keys, total = await self.store.list_keys(request.org_id, page)
        return pb.ListApiKeysResponse(keys=[convert.key_to_proto(k) for k in keys],
                                      next_page_token=next_offset_token(page, len(keys), total))

    async def GetSeatUsage(self, request: pb.GetSeatUsageRequest, context: Context
                           ) -> pb.GetSeatUsageResponse:
        """Seats used against the limit."""
        usage = await self.store.seat_usage(request.org_id)
        return pb.GetSeatUsageResponse(org_id=usage.org_id, seat_limit=usage.seat_limit,
                                       paid_seats=usage.paid_seats,
                                       free_seats=usage.free_seats)

    async def GetSeatReport(self, request: pb.GetSeatReportRequest, context: Context
                            ) -> pb.GetSeatReportResponse:
        """Paid seats over a calendar month."""
        report = await self.accounts.seat_report(org_id=request.org_id, year=request.year,
                                                 month=request.month)
        return pb.GetSeatReportResponse(
            org_id=report.org_id, year=report.year, month=report.month,
            peak_paid_seats=report.peak_paid_seats, paid_seat_seconds=report.paid_seat_seconds,
            paid_seats_at_end=report.paid_seats_at_end)

    async def WatchCredentials(self, request: pb.WatchCredentialsRequest, context: Context
                               ) -> AsyncIterator[pb.WatchCredentialsResponse]:
        """A snapshot, then every change, until the lifetime cap or shutdown."""
        updates = self.hub.watch(request.known_revision, self.watch_lifetime_s)
        async for update in until_shutdown(updates, self.shutting_down):
            yield convert.update_to_proto(update)

    async def AppendAudit(self, request: pb.AppendAuditRequest, context: Context
                          ) -> pb.AppendAuditResponse:
        """Chains shipped records into their orgs' logs."""
        appended = await self.audit.append(audit.checked_batch(
            [convert.audit_in(r) for r in request.records]))
        await self.store.record_key_uses(convert.key_uses_in(request))
        return pb.AppendAuditResponse(appended=appended)

    async def VerifyAudit(self, request: pb.VerifyAuditRequest, context: Context
                          ) -> pb.VerifyAuditResponse:
        """Recomputes an org's chain."""
        start = await self.audit.checkpoint(request.org_id)
        entries = [e async for e in self.audit.chain_of(request.org_id)]
        return convert.verdict_to_proto(audit.verify(entries, start))

    async def ExportAudit(self, request: pb.ExportAuditRequest, context: Context
                          ) -> AsyncIterator[pb.ExportAuditResponse]:
        """CSV or JSON Lines, in chunks."""
        fmt = "csv" if request.format == pb.AUDIT_EXPORT_FORMAT_CSV else "jsonl"
        header = audit.export_header(fmt)
        if header:
            yield pb.ExportAuditResponse(chunk=header)
        async for page in self.audit.pages_between(
                request.org_id, from_timestamp(request, "start_time"),
                from_timestamp(request, "end_time"), audit.EXPORT_CHUNK_RECORDS):
            yield pb.ExportAuditResponse(chunk=audit.export_page(page, fmt))
