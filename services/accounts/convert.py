"""tally.accounts.v1 messages <-> accounts domain objects."""

from __future__ import annotations

from datetime import UTC, datetime

from tally.accounts.v1 import accounts_pb2 as pb
from tally.kit.errors import invalid
from tally.kit.protoconv import enum_or_none, enum_out, from_timestamp, to_timestamp

from .audit import MAX_APPEND, AuditEntry, Verdict
from .domain import (
    ApiKey,
    CredentialsUpdate,
    Environment,
    IssuedKey,
    Member,
    Org,
    Project,
    Role,
)


def role_in(number: int) -> Role | None:
    """The domain role of a wire role; None for UNSPECIFIED or unknown (validation names it)."""
    return enum_or_none(pb.Role, "ROLE_", number, Role)


def role_out(role: Role) -> pb.Role.ValueType:
    """The wire role."""
    number: pb.Role.ValueType = enum_out(pb.Role, "ROLE_", role)
    return number


def org_to_proto(org: Org) -> pb.Org:
    """An org as the wire message."""
    return pb.Org(org_id=org.org_id, name=org.name, region=org.region,
                  seat_limit=org.seat_limit, create_time=to_timestamp(org.created_at),
                  is_sso_required=org.is_sso_required)


def project_to_proto(project: Project) -> pb.Project:
    """A project as the wire message."""
    return pb.Project(org_id=project.org_id, project_id=project.project_id, name=project.name,
                      create_time=to_timestamp(project.created_at))


def environment_to_proto(environment: Environment) -> pb.Environment:
    """An environment as the wire message."""
    return pb.Environment(org_id=environment.org_id, project_id=environment.project_id,
                          environment_id=environment.environment_id, name=environment.name,
                          create_time=to_timestamp(environment.created_at))


def member_to_proto(member: Member) -> pb.Member:
    """A membership as the wire message."""
    return pb.Member(org_id=member.org_id, subject=member.subject, role=role_out(member.role),
                     is_paid_seat=member.is_paid_seat,
                     create_time=to_timestamp(member.created_at))


def key_to_proto(key: ApiKey) -> pb.ApiKey:
    """A key's metadata as the wire message (never its digest)."""
    return pb.ApiKey(key_id=key.key_id, org_id=key.org_id, project_id=key.project_id,
                     environment_id=key.environment_id, role=role_out(key.role), name=key.name,
                     prefix=key.prefix, create_time=to_timestamp(key.created_at),
                     expire_time=to_timestamp(key.expires_at),
                     revoke_time=to_timestamp(key.revoked_at),
                     replaced_by_key_id=key.replaced_by, created_by=key.created_by,
                     last_use_time=to_timestamp(key.last_used_at))


def issued_to_create(issued: IssuedKey) -> pb.CreateApiKeyResponse:
    """CreateApiKey's answer."""
    return pb.CreateApiKeyResponse(key=key_to_proto(issued.key), secret=issued.secret)


def issued_to_rotate(issued: IssuedKey) -> pb.RotateApiKeyResponse:
    """RotateApiKey's answer."""
    assert issued.previous is not None
    return pb.RotateApiKeyResponse(key=key_to_proto(issued.key), secret=issued.secret,
                                   previous=key_to_proto(issued.previous))


def update_to_proto(update: CredentialsUpdate) -> pb.WatchCredentialsResponse:
    """One step of the credentials feed."""
    return pb.WatchCredentialsResponse(
        revision=update.revision, is_snapshot=update.is_snapshot,
        keys=[pb.KeyCredential(key=key_to_proto(k), secret_sha256=k.secret_sha256)
              for k in update.keys],
        members=[pb.MemberCredential(member=member_to_proto(m.member), removed=m.is_removed)
                 for m in update.members],
        orgs=[org_to_proto(o) for o in update.orgs])


def audit_in(record: pb.AuditRecord, service_default: str = "") -> AuditEntry:
    """A shipped audit record (chain fields are ignored: accounts sets them)."""
    return AuditEntry(record_id=record.record_id, org_id=record.org_id,
                      at=from_timestamp(record, "time") or datetime.now(UTC),
                      principal=record.principal, verified_by=record.verified_by,
                      service=record.service or service_default, rpc=record.rpc,
                      target_ids=tuple(record.target_ids),
                      request_sha256=record.request_sha256, peer=record.peer,
                      outcome=record.outcome)


def verdict_to_proto(verdict: Verdict) -> pb.VerifyAuditResponse:
    """VerifyAudit's answer."""
    return pb.VerifyAuditResponse(is_intact=verdict.is_intact,
                                  records_checked=verdict.records_checked,
                                  first_altered_sequence=verdict.first_altered_sequence,
                                  first_altered_record_id=verdict.first_altered_record_id,
                                  problem=verdict.problem)


def key_uses_in(request: pb.AppendAuditRequest) -> list[tuple[str, datetime]]:
    """Reported key uses, bounded."""
    if len(request.key_uses) > MAX_APPEND:
        raise invalid("key_uses", f"at most {MAX_APPEND} per call")
    uses = []
    for use in request.key_uses:
        at = from_timestamp(use, "last_use_time")
        if use.key_id and at is not None:
            uses.append((use.key_id, at))
    return uses
