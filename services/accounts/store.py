"""AccountsStore on PostgreSQL (schema `accounts`), and the credentials change feed.

Every write that changes a credential (a key or a membership) takes one transaction-scoped
advisory lock before it draws its revision from `credential_changes`, so revisions commit in
order: a reader that has seen revision R never later finds a change numbered below R. Such
writes are rare (people invite, keys rotate), so serializing them costs nothing that matters,
and it keeps the feed a plain `revision > R` query. Each commit NOTIFYs `accounts_credentials`.

Seats are counted under the org row's lock (SELECT ... FOR UPDATE), so two invitations racing
for the last paid seat cannot both win.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

import asyncpg

from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.kit.paging import PageRequest

from .audit import GENESIS, AuditEntry, Checkpoint, archive_lines, archive_name, chain
from .domain import (
    PAID_ROLES,
    ApiKey,
    CredentialsUpdate,
    Environment,
    KeyRequest,
    Member,
    MemberChange,
    MemberEvent,
    Org,
    Project,
    Role,
    SeatUsage,
    seat_limit_reached,
)

log = get_logger("accounts.store")

CHANNEL: Final = "accounts_credentials"
_CREDENTIALS_LOCK_KEY: Final = 0x7A11_0A00
_KEY_COLUMNS: Final = ("key_id, org_id, project_id, environment_id, role, name, prefix, "
                       "secret_sha256, created_at, created_by, expires_at, revoked_at, "
                       "replaced_by, last_used_at")
_PAID: Final = [r.value for r in PAID_ROLES]
Conn: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]")


def _org(row: asyncpg.Record) -> Org:
    return Org(row["org_id"], row["name"], row["region"], row["seat_limit"], row["created_at"],
               row["sso_required"])


def _member(row: asyncpg.Record) -> Member:
    return Member(row["org_id"], row["subject"], Role(row["role"]), row["created_at"])


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(key_id=row["key_id"], org_id=row["org_id"], project_id=row["project_id"],
                  environment_id=row["environment_id"], role=Role(row["role"]),
                  name=row["name"], prefix=row["prefix"], secret_sha256=row["secret_sha256"],
                  created_at=row["created_at"], created_by=row["created_by"],
                  expires_at=row["expires_at"], revoked_at=row["revoked_at"],
                  replaced_by=row["replaced_by"], last_used_at=row["last_used_at"])


async def _changed(conn: Conn, kind: str, org_id: str, ref: str) -> None:
    """Records a credential change (the caller holds the credentials lock)."""
    await conn.execute("INSERT INTO accounts.credential_changes (kind, org_id, ref) "
                       "VALUES ($1, $2, $3)", kind, org_id, ref)
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


async def _member_event(conn: Conn, org_id: str, subject: str, role: str | None) -> None:
    """Records a membership change for the seat report (in the change's transaction; the
    database clock, so events order as they commit under the org's lock)."""
    await conn.execute("INSERT INTO accounts.member_events (org_id, subject, role, at) "
                       "VALUES ($1, $2, $3, clock_timestamp())", org_id, subject, role)


async def _lock_credentials(conn: Conn) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _CREDENTIALS_LOCK_KEY)


class AccountsPgStore:
    """The domain's AccountsStore over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self.pool = pool
        self.database_url = database_url

    # --- orgs, projects, environments -------------------------------------------------------

    async def create_org(self, org: Org, owner: Member) -> tuple[Org, Member, bool]:
        """Inserts the org and its owner, or returns the existing ones (and False)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            row = await conn.fetchrow(
                "INSERT INTO accounts.orgs (org_id, name, region, seat_limit, created_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (org_id) DO NOTHING RETURNING *",
                org.org_id, org.name, org.region, org.seat_limit, org.created_at)
            if row is None:
                existing = await conn.fetchrow(
                    "SELECT * FROM accounts.orgs WHERE org_id = $1", org.org_id)
                first_owner = await conn.fetchrow(
                    "SELECT * FROM accounts.members WHERE org_id = $1 AND role = 'owner' "
                    "ORDER BY created_at LIMIT 1", org.org_id)
                assert existing is not None
                return (_org(existing), _member(first_owner) if first_owner else owner, False)
            await conn.execute(
                "INSERT INTO accounts.members (org_id, subject, role, created_at) "
                "VALUES ($1, $2, $3, $4)", owner.org_id, owner.subject, owner.role.value,
                owner.created_at)
            await _member_event(conn, owner.org_id, owner.subject, owner.role.value)
            await _changed(conn, "member", owner.org_id, owner.subject)
            await _changed(conn, "org", org.org_id, org.org_id)
        return _org(row), owner, True

    async def get_org(self, org_id: str) -> Org | None:
        """The org, if it exists."""
        row = await self.pool.fetchrow("SELECT * FROM accounts.orgs WHERE org_id = $1", org_id)
        return _org(row) if row else None

    async def set_sso_required(self, org_id: str, is_sso_required: bool) -> Org:
        """Sets the flag; every guard learns it through the feed."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            row = await conn.fetchrow("UPDATE accounts.orgs SET sso_required = $2 "
                                      "WHERE org_id = $1 RETURNING *", org_id, is_sso_required)
            if row is None:
                raise TallyError(Reason.NOT_FOUND, f"org_id: no org {org_id!r}",
                                 field="org_id")
            await _changed(conn, "org", org_id, org_id)
        return _org(row)

    async def create_project(self, project: Project) -> tuple[Project, bool]:
        """Inserts, or returns the existing project (and False)."""
        row = await self.pool.fetchrow(
            "INSERT INTO accounts.projects (org_id, project_id, name, created_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING *",
            project.org_id, project.project_id, project.name, project.created_at)
        if row is not None:
            return project, True
        row = await self.pool.fetchrow(
            "SELECT * FROM accounts.projects WHERE org_id = $1 AND project_id = $2",
            project.org_id, project.project_id)
        assert row is not None
        return Project(row["org_id"], row["project_id"], row["name"], row["created_at"]), False

    async def list_projects(self, org_id: str, page: PageRequest) -> tuple[list[Project], int]:
        """One page of projects and the total."""
        rows = await self.pool.fetch(
            "SELECT *, count(*) OVER () AS total FROM accounts.projects WHERE org_id = $1 "
            "ORDER BY project_id OFFSET $2 LIMIT $3", org_id, page.offset, page.page_size)
        return ([Project(r["org_id"], r["project_id"], r["name"], r["created_at"])
                 for r in rows], rows[0]["total"] if rows else 0)

    async def create_environment(self, environment: Environment) -> tuple[Environment, bool]:
        """Inserts, or returns the existing environment (and False); NOT_FOUND without its
        project."""
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO accounts.environments (org_id, project_id, environment_id, name, "
                "created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING *",
                environment.org_id, environment.project_id, environment.environment_id,
                environment.name, environment.created_at)
        except asyncpg.ForeignKeyViolationError:
            raise TallyError(Reason.NOT_FOUND,
                             f"project_id: no project {environment.project_id!r} in org "
                             f"{environment.org_id!r}", field="project_id") from None
        if row is not None:
            return environment, True
        row = await self.pool.fetchrow(
            "SELECT * FROM accounts.environments WHERE org_id = $1 AND project_id = $2 "
            "AND environment_id = $3", environment.org_id, environment.project_id,
            environment.environment_id)
        assert row is not None
        return _environment(row), False

    async def list_environments(self, org_id: str, project_id: str, page: PageRequest
                                ) -> tuple[list[Environment], int]:
        """One page of environments and the total."""
        rows = await self.pool.fetch(
            "SELECT *, count(*) OVER () AS total FROM accounts.environments "
            "WHERE org_id = $1 AND project_id = $2 ORDER BY environment_id OFFSET $3 LIMIT $4",
            org_id, project_id, page.offset, page.page_size)
        return [_environment(r) for r in rows], rows[0]["total"] if rows else 0

    # --- members and seats ------------------------------------------------------------------

    async def _lock_org(self, conn: Conn, org_id: str) -> Org:
        row = await conn.fetchrow("SELECT * FROM accounts.orgs WHERE org_id = $1 FOR UPDATE",
                                  org_id)
        if row is None:
            raise TallyError(Reason.NOT_FOUND, f"org_id: no org {org_id!r}", field="org_id")
        return _org(row)

    async def put_member(self, org_id: str, subject: str, role: Role, *, must_exist: bool,
                         now: datetime) -> Member:
        """Adds or changes a membership under the org's lock (seat limit, last owner)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            org = await self._lock_org(conn, org_id)
            current = await conn.fetchrow(
                "SELECT * FROM accounts.members WHERE org_id = $1 AND subject = $2",
                org_id, subject)
            if current is None and must_exist:
                raise TallyError(Reason.NOT_FOUND, f"subject: {subject!r} is not a member of "
                                 f"{org_id!r}", field="subject")
            if current is not None and current["role"] == role.value:
                return _member(current)
            if current is not None and current["role"] == Role.OWNER.value:
                await self._keep_an_owner(conn, org_id)
            was_paid = current is not None and Role(current["role"]) in PAID_ROLES
            if role in PAID_ROLES and not was_paid:
                paid = await conn.fetchval(
                    "SELECT count(*) FROM accounts.members WHERE org_id = $1 "
                    "AND role = ANY($2::text[])", org_id, _PAID)
                if paid >= org.seat_limit:
                    raise seat_limit_reached(org, paid)
            row = await conn.fetchrow(
                "INSERT INTO accounts.members (org_id, subject, role, created_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (org_id, subject) "
                "DO UPDATE SET role = EXCLUDED.role RETURNING *",
                org_id, subject, role.value, now)
            await _member_event(conn, org_id, subject, role.value)
            await _changed(conn, "member", org_id, subject)
        assert row is not None
        return _member(row)

    async def _keep_an_owner(self, conn: Conn, org_id: str) -> None:
        owners = await conn.fetchval("SELECT count(*) FROM accounts.members WHERE org_id = $1 "
                                     "AND role = 'owner'", org_id)
        if owners <= 1:
            raise TallyError(Reason.LAST_OWNER, f"org {org_id!r} must keep at least one owner; "
                             "make another member owner first",
                             metadata={"org_id": org_id})

    async def remove_member(self, org_id: str, subject: str) -> bool:
        """Removes a membership (never the last owner)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            await self._lock_org(conn, org_id)
            role = await conn.fetchval("SELECT role FROM accounts.members WHERE org_id = $1 "
                                       "AND subject = $2", org_id, subject)
            if role is None:
                return False
            if role == Role.OWNER.value:
                await self._keep_an_owner(conn, org_id)
            await conn.execute("DELETE FROM accounts.members WHERE org_id = $1 "
                               "AND subject = $2", org_id, subject)
            await _member_event(conn, org_id, subject, None)
            await _changed(conn, "member", org_id, subject)
        return True

    async def member_history(self, org_id: str, before: datetime) -> list[MemberEvent]:
        """The org's membership events before `before`, in time order."""
        rows = await self.pool.fetch(
            "SELECT subject, role, at FROM accounts.member_events WHERE org_id = $1 "
            "AND at < $2 ORDER BY at, id", org_id, before)
        return [MemberEvent(r["subject"], Role(r["role"]) if r["role"] else None, r["at"])
                for r in rows]

    async def list_members(self, org_id: str, page: PageRequest) -> tuple[list[Member], int]:
        """One page of members and the total."""
        rows = await self.pool.fetch(
            "SELECT *, count(*) OVER () AS total FROM accounts.members WHERE org_id = $1 "
            "ORDER BY subject OFFSET $2 LIMIT $3", org_id, page.offset, page.page_size)
        return [_member(r) for r in rows], rows[0]["total"] if rows else 0

    async def seat_usage(self, org_id: str) -> SeatUsage:
        """Seats the org uses."""
        row = await self.pool.fetchrow(
            "SELECT o.seat_limit, "
            "count(m.subject) FILTER (WHERE m.role = ANY($2::text[])) AS paid, "
            "count(m.subject) FILTER (WHERE NOT m.role = ANY($2::text[])) AS free "
            "FROM accounts.orgs o LEFT JOIN accounts.members m USING (org_id) "
            "WHERE o.org_id = $1 GROUP BY o.seat_limit", org_id, _PAID)
        if row is None:
            raise TallyError(Reason.NOT_FOUND, f"org_id: no org {org_id!r}", field="org_id")
        return SeatUsage(org_id, row["seat_limit"], row["paid"], row["free"])

    # --- API keys ---------------------------------------------------------------------------

    async def create_key(self, request: KeyRequest, key: ApiKey) -> tuple[ApiKey, bool]:
        """Inserts `key` claiming request_id, or returns the key it created (and False)."""
        claim = f"create:{request.org_id}:{request.request_id}"
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            earlier = await conn.fetchrow(
                f"SELECT {_KEY_COLUMNS}, request_hash FROM accounts.api_keys "
                "WHERE request_key = $1", claim)
            if earlier is not None:
                if earlier["request_hash"] != request.fingerprint():
                    raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                                     f"request_id: {request.request_id!r} already created a "
                                     "different key", field="request_id")
                return _key(earlier), False
            await self._lock_org(conn, request.org_id)
            await self._check_scope(conn, request)
            await self._insert_key(conn, key, claim, request.fingerprint())
            await _changed(conn, "key", key.org_id, key.key_id)
        return key, True

    async def _check_scope(self, conn: Conn, request: KeyRequest) -> None:
        if request.project_id and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM accounts.projects WHERE org_id = $1 "
                "AND project_id = $2)", request.org_id, request.project_id):
            raise TallyError(Reason.NOT_FOUND, f"project_id: no project {request.project_id!r}"
                             f" in org {request.org_id!r}", field="project_id")
        if request.environment_id and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM accounts.environments WHERE org_id = $1 "
                "AND project_id = $2 AND environment_id = $3)", request.org_id,
                request.project_id, request.environment_id):
            raise TallyError(Reason.NOT_FOUND, f"environment_id: no environment "
                             f"{request.environment_id!r} in project {request.project_id!r}",
                             field="environment_id")

    async def _insert_key(self, conn: Conn, key: ApiKey, claim: str,
                          fingerprint: str) -> None:
        await conn.execute(
            "INSERT INTO accounts.api_keys (key_id, org_id, project_id, environment_id, role, "
            "name, prefix, secret_sha256, created_at, created_by, expires_at, request_key, "
            "request_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            key.key_id, key.org_id, key.project_id, key.environment_id, key.role.value,
            key.name, key.prefix, key.secret_sha256, key.created_at, key.created_by,
            key.expires_at, claim, fingerprint)

    async def rotate_key(self, request_id: str, org_id: str, key_id: str,
                         successor: Callable[[ApiKey], ApiKey], overlap: timedelta,
                         now: datetime) -> tuple[ApiKey, ApiKey, bool]:
        """Inserts `successor(old)` and ends the old key at now + overlap (or its own expiry,
        if sooner); a replay of request_id returns the first rotation."""
        claim = f"rotate:{org_id}:{request_id}"
        fingerprint = f"{key_id}|{overlap.total_seconds()}"
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            earlier = await conn.fetchrow(
                f"SELECT {_KEY_COLUMNS}, request_hash FROM accounts.api_keys "
                "WHERE request_key = $1", claim)
            if earlier is not None:
                if earlier["request_hash"] != fingerprint:
                    raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                                     f"request_id: {request_id!r} already rotated another key "
                                     "or with another overlap", field="request_id")
                old = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM accounts.api_keys "
                                          "WHERE key_id = $1", key_id)
                assert old is not None
                return _key(earlier), _key(old), False
            row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM accounts.api_keys "
                                      "WHERE key_id = $1 AND org_id = $2 FOR UPDATE",
                                      key_id, org_id)
            if row is None:
                raise _no_key(org_id, key_id)
            old_key = _key(row)
            if not old_key.is_active(now) or old_key.replaced_by:
                raise TallyError(Reason.KEY_NOT_ACTIVE, f"key_id: {key_id!r} is revoked, "
                                 "expired or already rotated", field="key_id")
            new_key = successor(old_key)
            await self._insert_key(conn, new_key, claim, fingerprint)
            ends = now + overlap
            if old_key.expires_at is not None:
                ends = min(ends, old_key.expires_at)
            updated = await conn.fetchrow(
                "UPDATE accounts.api_keys SET expires_at = $2, replaced_by = $3 "
                f"WHERE key_id = $1 RETURNING {_KEY_COLUMNS}", key_id, ends, new_key.key_id)
            await _changed(conn, "key", org_id, key_id)
            await _changed(conn, "key", org_id, new_key.key_id)
        assert updated is not None
        return new_key, _key(updated), True

    async def revoke_key(self, org_id: str, key_id: str, now: datetime) -> ApiKey:
        """Revokes (or returns the already revoked) key."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_credentials(conn)
            row = await conn.fetchrow(
                "UPDATE accounts.api_keys SET revoked_at = coalesce(revoked_at, $3) "
                f"WHERE key_id = $1 AND org_id = $2 RETURNING {_KEY_COLUMNS}",
                key_id, org_id, now)
            if row is None:
                raise _no_key(org_id, key_id)
            if row["revoked_at"] == now:
                await _changed(conn, "key", org_id, key_id)
        return _key(row)

    async def get_key(self, org_id: str, key_id: str) -> ApiKey:
        """One key of the org (NOT_FOUND if none)."""
        row = await self.pool.fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM accounts.api_keys WHERE key_id = $1 AND org_id = $2",
            key_id, org_id)
        if row is None:
            raise _no_key(org_id, key_id)
        return _key(row)

    async def list_keys(self, org_id: str, page: PageRequest) -> tuple[list[ApiKey], int]:
        """One page of keys and the total."""
        rows = await self.pool.fetch(
            f"SELECT {_KEY_COLUMNS}, count(*) OVER () AS total FROM accounts.api_keys "
            "WHERE org_id = $1 ORDER BY key_id OFFSET $2 LIMIT $3",
            org_id, page.offset, page.page_size)
        return [_key(r) for r in rows], rows[0]["total"] if rows else 0

    # --- the credentials feed ---------------------------------------------------------------

    async def credentials_snapshot(self) -> CredentialsUpdate:
        """Every key not revoked nor expired, every membership, at one revision."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            revision = await conn.fetchval(
                "SELECT coalesce(max(revision), 0) FROM accounts.credential_changes")
            keys = await conn.fetch(
                f"SELECT {_KEY_COLUMNS} FROM accounts.api_keys WHERE revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > now())")
            members = await conn.fetch("SELECT * FROM accounts.members")
            orgs = await conn.fetch("SELECT * FROM accounts.orgs")
        return CredentialsUpdate(revision, True, [_key(r) for r in keys],
                                 [MemberChange(_member(r)) for r in members],
                                 [_org(r) for r in orgs])

    async def credentials_after(self, revision: int) -> CredentialsUpdate:
        """Keys and memberships changed after `revision`, as they now stand."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            changes = await conn.fetch(
                "SELECT revision, kind, org_id, ref FROM accounts.credential_changes "
                "WHERE revision > $1 ORDER BY revision", revision)
            if not changes:
                return CredentialsUpdate(revision, False)
            key_ids = sorted({c["ref"] for c in changes if c["kind"] == "key"})
            member_refs = sorted({(c["org_id"], c["ref"]) for c in changes
                                  if c["kind"] == "member"})
            keys = await conn.fetch(f"SELECT {_KEY_COLUMNS} FROM accounts.api_keys "
                                    "WHERE key_id = ANY($1::text[])", key_ids)
            orgs = await conn.fetch(
                "SELECT * FROM accounts.orgs WHERE org_id = ANY($1::text[])",
                sorted({c["ref"] for c in changes if c["kind"] == "org"}))
            rows = await conn.fetch(
                "SELECT m.* FROM accounts.members m JOIN unnest($1::text[], $2::text[]) "
                "AS c(org_id, subject) USING (org_id, subject)",
                [o for o, _ in member_refs], [s for _, s in member_refs])
        present = {(r["org_id"], r["subject"]): _member(r) for r in rows}
        members = [MemberChange(present[ref]) if ref in present else
                   MemberChange(Member(ref[0], ref[1], Role.VIEWER, _EPOCH), is_removed=True)
                   for ref in member_refs]
        return CredentialsUpdate(changes[-1]["revision"], False, [_key(r) for r in keys],
                                 members, [_org(r) for r in orgs])

    async def record_key_uses(self, uses: Sequence[tuple[str, datetime]]) -> None:
        """Moves each key's last use forward (never back; not a credential change)."""
        if uses:
            await self.pool.execute(
                "UPDATE accounts.api_keys k SET last_used_at = greatest(k.last_used_at, u.at) "
                "FROM unnest($1::text[], $2::timestamptz[]) AS u(key_id, at) "
                "WHERE k.key_id = u.key_id", [k for k, _ in uses], [t for _, t in uses])



_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _environment(row: asyncpg.Record) -> Environment:
    return Environment(row["org_id"], row["project_id"], row["environment_id"], row["name"],
                       row["created_at"])


def _no_key(org_id: str, key_id: str) -> TallyError:
    return TallyError(Reason.NOT_FOUND, f"key_id: no key {key_id!r} in org {org_id!r}",
                      field="key_id")


# --- the audit log ------------------------------------------------------------------------

_AUDIT_COLUMNS: Final = ("record_id, org_id, at, principal, verified_by, service, rpc, "
                         "target_ids, request_sha256, peer, outcome, sequence, prev_hash, hash")


def _audit(row: asyncpg.Record) -> AuditEntry:
    return AuditEntry(row["record_id"], row["org_id"], row["at"], row["principal"],
                      row["verified_by"], row["service"], row["rpc"], tuple(row["target_ids"]),
                      row["request_sha256"], row["peer"], row["outcome"], row["sequence"],
                      row["prev_hash"], row["hash"])


class AuditPgStore:
    """accounts.audit_log: appends under each org's chain lock; reads in chain order."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def append(self, entries: Sequence[AuditEntry]) -> int:
        """Chains and inserts `entries` (records already present are skipped); one
        transaction, each org's chain locked (ordered by org, so two appends never deadlock)."""
        if not entries:
            return 0
        by_org: dict[str, list[AuditEntry]] = {}
        for entry in entries:
            by_org.setdefault(entry.org_id, []).append(entry)
        appended = 0
        async with self.pool.acquire() as conn, conn.transaction():
            present = {r["record_id"] for r in await conn.fetch(
                "SELECT record_id FROM accounts.audit_log WHERE record_id = ANY($1::text[])",
                [e.record_id for e in entries])}
            for org_id in sorted(by_org):
                fresh = [e for e in by_org[org_id] if e.record_id not in present]
                if not fresh:
                    continue
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                   _AUDIT_LOCK_SPACE, org_id)
                last = await conn.fetchrow(
                    "SELECT sequence, hash FROM accounts.audit_log WHERE org_id = $1 "
                    "ORDER BY sequence DESC LIMIT 1", org_id) or await conn.fetchrow(
                    "SELECT sequence, hash FROM accounts.audit_checkpoints "
                    "WHERE org_id = $1", org_id)  # every record so far expired
                sealed = chain(fresh, last["sequence"] if last else 0,
                               last["hash"] if last else GENESIS)
                await conn.copy_records_to_table(
                    "audit_log", schema_name="accounts",
                    columns=["record_id", "org_id", "at", "principal", "verified_by",
                             "service", "rpc", "target_ids", "request_sha256", "peer",
                             "outcome", "sequence", "prev_hash", "hash"],
                    records=[(e.record_id, e.org_id, e.at, e.principal, e.verified_by,
                              e.service, e.rpc, list(e.target_ids), e.request_sha256,
                              e.peer, e.outcome, e.sequence, e.prev_hash, e.hash)
                             for e in sealed])
                appended += len(sealed)
        return appended

    async def checkpoint(self, org_id: str) -> Checkpoint | None:
        """Where the org's chain resumes after its expired records (None: nothing expired)."""
        row = await self.pool.fetchrow("SELECT sequence, hash FROM accounts.audit_checkpoints "
                                       "WHERE org_id = $1", org_id)
        return Checkpoint(org_id, row["sequence"], row["hash"]) if row else None

    async def expire(self, before: datetime, archive: Callable[[str, bytes], None],
                     batch: int = 5000) -> int:
        """Removes the records older than `before` from the head of each org's chain (at most
        `batch` per org per call), each prefix handed to `archive` (name, JSON Lines) before
        its rows are deleted, and moves the org's checkpoint to the last removed. A crash
        between the archive and the commit leaves the records in place: the next run writes
        the same archive again. Returns how many records were removed."""
        orgs = [r["org_id"] for r in await self.pool.fetch(
            "SELECT DISTINCT org_id FROM accounts.audit_log WHERE at < $1", before)]
        removed = 0
        for org_id in sorted(orgs):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                   _AUDIT_LOCK_SPACE, org_id)
                rows = await conn.fetch(
                    f"SELECT {_AUDIT_COLUMNS} FROM accounts.audit_log WHERE org_id = $1 "
                    "ORDER BY sequence LIMIT $2", org_id, batch)
                # a prefix only: the chain left must start right after the checkpoint
                old = list(itertools.takewhile(lambda r: r["at"] < before, rows))
                if not old:
                    continue
                entries = [_audit(r) for r in old]
                first, last = entries[0], entries[-1]
                await asyncio.to_thread(archive, archive_name(org_id, first.sequence,
                                                              last.sequence),
                                        archive_lines(entries))
                await conn.execute("DELETE FROM accounts.audit_log WHERE org_id = $1 "
                                   "AND sequence <= $2", org_id, last.sequence)
                await conn.execute(
                    "INSERT INTO accounts.audit_checkpoints (org_id, sequence, hash, archive) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (org_id) DO UPDATE SET "
                    "sequence = excluded.sequence, hash = excluded.hash, "
                    "archive = excluded.archive, expired_at = now()",
                    org_id, last.sequence, last.hash,
                    archive_name(org_id, first.sequence, last.sequence))
                removed += len(entries)
        return removed

    async def chain_of(self, org_id: str, batch: int = 2000) -> AsyncIterator[AuditEntry]:
        """An org's records in sequence order, read in batches."""
        after = 0
        while True:
            rows = await self.pool.fetch(
                f"SELECT {_AUDIT_COLUMNS} FROM accounts.audit_log WHERE org_id = $1 "
                "AND sequence > $2 ORDER BY sequence LIMIT $3", org_id, after, batch)
            for row in rows:
                yield _audit(row)
            if len(rows) < batch:
                return
            after = rows[-1]["sequence"]

    async def pages_between(self, org_id: str, start: datetime | None, end: datetime | None,
                            page_size: int) -> AsyncIterator[list[AuditEntry]]:
        """An org's records with start <= at < end, in sequence order, page by page."""
        after = 0
        while True:
            rows = await self.pool.fetch(
                f"SELECT {_AUDIT_COLUMNS} FROM accounts.audit_log WHERE org_id = $1 "
                "AND sequence > $2 AND ($3::timestamptz IS NULL OR at >= $3) "
                "AND ($4::timestamptz IS NULL OR at < $4) ORDER BY sequence LIMIT $5",
                org_id, after, start, end, page_size)
            if rows:
                yield [_audit(r) for r in rows]
            if len(rows) < page_size:
                return
            after = rows[-1]["sequence"]


_AUDIT_LOCK_SPACE: Final = 0x7A11_0A01
