"""Identity commands of the `tally` CLI: `tally orgs`, `tally projects`, `tally members`,
`tally keys`, `tally seats` and `tally audit`.

A new API key's secret is printed once, on its own line, and never again (accounts keeps only
its digest). The credential the CLI itself calls with is TALLY_API_KEY.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer

from tally.accounts.v1 import accounts_pb2 as pb
from tally.cli import calls
from tally.kit.config import KitConfig

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from tally.accounts.v1.accounts_pb2_grpc import AccountsServiceAsyncStub as Accounts

T = TypeVar("T")

ROLES: Final = {"owner": pb.ROLE_OWNER, "admin": pb.ROLE_ADMIN, "billing": pb.ROLE_BILLING,
                "developer": pb.ROLE_DEVELOPER, "viewer": pb.ROLE_VIEWER,
                "gateway": pb.ROLE_GATEWAY}
PAGE: Final = 1000

Org = Annotated[str, typer.Option(help="The org id.")]
RoleOption = Annotated[str, typer.Option(help=", ".join(ROLES))]


def _role(text: str) -> pb.Role.ValueType:
    try:
        return ROLES[text.lower()]
    except KeyError:
        raise typer.BadParameter(f"must be one of {', '.join(ROLES)}",
                                 param_hint="--role") from None


def _role_name(number: int) -> str:
    return pb.Role.Name(number).removeprefix("ROLE_").lower()  # type: ignore[arg-type]


async def _call(config: KitConfig, rpc: Callable[[Accounts], Awaitable[T]]) -> T:
    return await calls.call(config, "accounts", rpc)


def key_line(key: pb.ApiKey) -> str:
    """One key, as `tally keys list` prints it."""
    state = ("revoked" if key.HasField("revoke_time") else
             f"expires {key.expire_time.ToDatetime().isoformat()}Z"
             if key.HasField("expire_time") else "active")
    scope = "/".join(p for p in (key.org_id, key.project_id, key.environment_id) if p)
    return f"{key.key_id}  {key.prefix}…  {_role_name(key.role):<9} {scope:<24} {state}  " \
           f"{key.name}"


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds the identity commands to the CLI (config is read lazily)."""
    orgs = typer.Typer(help="Organizations.", no_args_is_help=True)
    projects = typer.Typer(help="Projects and their environments.", no_args_is_help=True)
    members = typer.Typer(help="Members, their roles and seats.", no_args_is_help=True)
    keys = typer.Typer(help="API keys.", no_args_is_help=True)
    audit = typer.Typer(help="The audit log.", no_args_is_help=True)

    def run(rpc: Callable[[Accounts], Awaitable[Any]]) -> Any:
        return asyncio.run(_call(get_config(), rpc))

    @orgs.command("create")
    def orgs_create(org_id: Annotated[str, typer.Argument(help="The new org's id.")],
                    name: Annotated[str, typer.Option(help="Display name.")],
                    region: Annotated[str, typer.Option(help="Data-residency region.")],
                    owner: Annotated[str, typer.Option(help="First owner's subject/e-mail.")],
                    seats: Annotated[int, typer.Option(help="Paid seats.")] = 5) -> None:
        """Create an org pinned to a region, with its first owner."""
        reply = run(lambda a: a.CreateOrg(pb.CreateOrgRequest(
            org_id=org_id, name=name, region=region, seat_limit=seats, owner_subject=owner)))
        typer.echo(f"{reply.org.org_id}  region {reply.org.region}  seats "
                   f"{reply.org.seat_limit}  owner {reply.owner.subject}")

    @orgs.command("get")
    def orgs_get(org_id: str) -> None:
        """Print an org."""
        org = run(lambda a: a.GetOrg(pb.GetOrgRequest(org_id=org_id))).org
        typer.echo(f"{org.org_id}  {org.name}  region {org.region}  seats {org.seat_limit}")

    @projects.command("create")
    def projects_create(project_id: str, org: Org,
                        name: Annotated[str, typer.Option(help="Display name.")]) -> None:
        """Create a project."""
        run(lambda a: a.CreateProject(pb.CreateProjectRequest(
            org_id=org, project_id=project_id, name=name)))
        typer.echo(f"{org}/{project_id}")

    @projects.command("add-env")
    def projects_add_env(environment_id: str, org: Org,
                         project: Annotated[str, typer.Option(help="The project id.")],
                         name: Annotated[str, typer.Option(help="Display name.")] = "") -> None:
        """Create an environment of a project."""
        run(lambda a: a.CreateEnvironment(pb.CreateEnvironmentRequest(
            org_id=org, project_id=project, environment_id=environment_id,
            name=name or environment_id)))
        typer.echo(f"{org}/{project}/{environment_id}")

    @projects.command("list")
    def projects_list(org: Org) -> None:
        """Print an org's projects."""
        reply = run(lambda a: a.ListProjects(pb.ListProjectsRequest(org_id=org,
                                                                    page_size=PAGE)))
        for project in reply.projects:
            typer.echo(f"{project.project_id}  {project.name}")

    @members.command("invite")
    def members_invite(subject: str, org: Org, role: RoleOption) -> None:
        """Add a member (paid roles need a free seat)."""
        member = run(lambda a: a.InviteMember(pb.InviteMemberRequest(
            org_id=org, subject=subject, role=_role(role)))).member
        typer.echo(f"{member.subject}  {_role_name(member.role)}  "
                   f"{'paid' if member.is_paid_seat else 'free'} seat")

    @members.command("set-role")
    def members_set_role(subject: str, org: Org, role: RoleOption) -> None:
        """Change a member's role."""
        member = run(lambda a: a.ChangeMemberRole(pb.ChangeMemberRoleRequest(
            org_id=org, subject=subject, role=_role(role)))).member
        typer.echo(f"{member.subject}  {_role_name(member.role)}")

    @members.command("remove")
    def members_remove(subject: str, org: Org) -> None:
        """Remove a member."""
        removed = run(lambda a: a.RemoveMember(pb.RemoveMemberRequest(
            org_id=org, subject=subject))).removed
        typer.echo("removed" if removed else "not a member")

    @members.command("list")
    def members_list(org: Org) -> None:
        """Print an org's members."""
        reply = run(lambda a: a.ListMembers(pb.ListMembersRequest(org_id=org, page_size=PAGE)))
        for member in reply.members:
            typer.echo(f"{member.subject:<32} {_role_name(member.role):<9} "
                       f"{'paid' if member.is_paid_seat else 'free'}")

    @keys.command("create")
    def keys_create(org: Org, role: RoleOption,
                    name: Annotated[str, typer.Option(help="What the key is for.")],
                    project: Annotated[str, typer.Option(help="Limit to a project.")] = "",
                    env: Annotated[str, typer.Option(help="Limit to an environment.")] = "",
                    request_id: Annotated[str, typer.Option(help="Idempotency id.")] = ""
                    ) -> None:
        """Create an API key; its secret is printed this once."""
        reply = run(lambda a: a.CreateApiKey(pb.CreateApiKeyRequest(
            request_id=calls.request_id(request_id), org_id=org, project_id=project,
            environment_id=env, role=_role(role), name=name)))
        typer.echo(key_line(reply.key))
        typer.echo(reply.secret)
        typer.echo("store the secret now: it is not shown again", err=True)

    @keys.command("rotate")
    def keys_rotate(key_id: str, org: Org,
                    overlap: Annotated[int, typer.Option(
                        help="Seconds the old key keeps working.")] = 86400,
                    request_id: Annotated[str, typer.Option(help="Idempotency id.")] = ""
                    ) -> None:
        """Issue a successor key; the old one works for the overlap."""
        reply = run(lambda a: a.RotateApiKey(pb.RotateApiKeyRequest(
            request_id=calls.request_id(request_id), org_id=org, key_id=key_id,
            overlap_seconds=overlap)))
        typer.echo(key_line(reply.key))
        typer.echo(reply.secret)
        typer.echo(f"old key {key_id} {key_line(reply.previous).split('  ')[-2]}", err=True)

    @keys.command("revoke")
    def keys_revoke(key_id: str, org: Org) -> None:
        """Revoke a key everywhere within a second."""
        typer.echo(key_line(run(lambda a: a.RevokeApiKey(pb.RevokeApiKeyRequest(
            org_id=org, key_id=key_id))).key))

    @keys.command("list")
    def keys_list(org: Org) -> None:
        """Print an org's keys (never secrets)."""
        reply = run(lambda a: a.ListApiKeys(pb.ListApiKeysRequest(org_id=org, page_size=PAGE)))
        for key in reply.keys:
            typer.echo(key_line(key))

    @keys.command("rotate-kek")
    def keys_rotate_kek() -> None:
        """Re-wrap every stored secret's data key under the current KEK (the first in
        TALLY_KEK / TALLY_KEK_FILE; keep the old one after it until this has run), sealing
        any secret still stored unencrypted. Safe beside running services."""
        import asyncpg

        from tally.cli import suite
        from tally.kit import db, secrets

        sealer = secrets.sealer_from_env()
        if sealer is None:
            typer.echo("set TALLY_KEK or TALLY_KEK_FILE (new key first, old after it)",
                       err=True)
            raise typer.Exit(2)
        url = suite.database_url_for_suite(get_config())

        async def rotate() -> int:
            conn = await asyncpg.connect(db.asyncpg_url(url))
            try:
                return await secrets.rewrap_all(conn, sealer)
            finally:
                await conn.close()

        changed = asyncio.run(rotate())
        typer.echo(f"re-wrapped {changed} secrets under KEK {sealer.current!r}")

    @parent.command("seats")
    def seats(org: Org) -> None:
        """Print the paid and free seats an org uses."""
        usage = run(lambda a: a.GetSeatUsage(pb.GetSeatUsageRequest(org_id=org)))
        typer.echo(f"{usage.org_id}: {usage.paid_seats} of {usage.seat_limit} paid seats, "
                   f"{usage.free_seats} free")

    @audit.command("verify")
    def audit_verify(org: Org) -> None:
        """Recompute an org's audit chain; exit 1 naming the first altered record."""
        verdict = run(lambda a: a.VerifyAudit(pb.VerifyAuditRequest(org_id=org)))
        if verdict.is_intact:
            typer.echo(f"intact: {verdict.records_checked} records")
            return
        typer.echo(f"ALTERED at sequence {verdict.first_altered_sequence} "
                   f"({verdict.first_altered_record_id}): {verdict.problem}", err=True)
        raise typer.Exit(1)

    @audit.command("export")
    def audit_export(org: Org, csv: Annotated[bool, typer.Option(
            "--csv/--jsonl", help="CSV instead of JSON Lines.")] = False) -> None:
        """Write an org's audit records to stdout."""
        fmt = pb.AUDIT_EXPORT_FORMAT_CSV if csv else pb.AUDIT_EXPORT_FORMAT_JSON_LINES

        async def export(a: Accounts) -> None:
            async for chunk in a.ExportAudit(pb.ExportAuditRequest(org_id=org, format=fmt)):
                sys.stdout.buffer.write(chunk.chunk)

        run(export)

    parent.add_typer(orgs, name="orgs")
    parent.add_typer(projects, name="projects")
    parent.add_typer(members, name="members")
    parent.add_typer(keys, name="keys")
    parent.add_typer(audit, name="audit")
