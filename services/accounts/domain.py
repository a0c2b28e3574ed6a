"""Accounts' rules in plain Python: orgs, projects, environments, members, seats, API keys.

What makes an id, a role or a key request valid (every bad field named by its proto path),
which roles take a paid seat, what an API key's secret looks like and how it is stored (only a
SHA-256 digest and a visible prefix: the secret carries ~190 random bits, so a fast hash is
as safe as a slow one and verification stays a dictionary lookup), and the credentials feed
(`CredentialHub`) that every service's cache follows. No grpc, no SQL: the store is anything
with the `AccountsStore` shape.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import re
import secrets
import string
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from tally.kit import policy
from tally.kit.errors import FieldViolation, Reason, TallyError, check_id, invalid, raise_if
from tally.kit.paging import PageRequest, page_request

MAX_NAME_LENGTH: Final = 200
MAX_SUBJECT_LENGTH: Final = 254
MAX_REQUEST_ID_LENGTH: Final = 128
MAX_OVERLAP_SECONDS: Final = 30 * 24 * 3600
KEY_PREFIX: Final = "tly_"
SECRET_RANDOM_CHARS: Final = 32
"""Base62 characters of randomness in a secret: 32 * log2(62) ~ 190 bits."""
VISIBLE_RANDOM_CHARS: Final = 6
"""Random characters kept in the visible prefix, enough to tell keys apart in a list."""
ORG_WIDE_KEY_LABEL: Final = "org"
"""The <environment> part of a key not limited to one environment."""

_SLUG: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_ALPHABET: Final = string.ascii_letters + string.digits


class Role(enum.StrEnum):
    """Roles of people and keys (proto Role, lower-cased)."""

    OWNER = "owner"
    ADMIN = "admin"
    BILLING = "billing"
    DEVELOPER = "developer"
    VIEWER = "viewer"
    GATEWAY = "gateway"


PAID_ROLES: Final = frozenset({Role.OWNER, Role.ADMIN, Role.DEVELOPER})
"""Roles that take a paid seat. Owner counts too: otherwise every seat could be an owner."""
MEMBER_ROLES: Final = frozenset({Role.OWNER, Role.ADMIN, Role.BILLING, Role.DEVELOPER,
                                 Role.VIEWER})
KEY_ROLES: Final = frozenset({Role.ADMIN, Role.BILLING, Role.DEVELOPER, Role.VIEWER,
                              Role.GATEWAY})
"""A key never owns an org: ownership (members, seats) stays with people."""


@dataclass(frozen=True, slots=True)
class Org:
    """A tenant, pinned to a region."""

    org_id: str
    name: str
    region: str
    seat_limit: int
    created_at: datetime
    is_sso_required: bool = False


@dataclass(frozen=True, slots=True)
class Project:
    """A project of an org."""

    org_id: str
    project_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Environment:
    """An environment of a project."""

    org_id: str
    project_id: str
    environment_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    """A person's role in an org."""

    org_id: str
    subject: str
    role: Role
    created_at: datetime

    @property
    def is_paid_seat(self) -> bool:
        """Whether the role takes one of the org's paid seats."""
        return self.role in PAID_ROLES


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key's metadata; the secret itself is never kept."""

    key_id: str
    org_id: str
    project_id: str
    environment_id: str
    role: Role
    name: str
    prefix: str
    secret_sha256: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    replaced_by: str = ""
    last_used_at: datetime | None = None

    def is_active(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created: its metadata and, this once, its secret ('' on a replay)."""

    key: ApiKey
    secret: str
    previous: ApiKey | None = None


@dataclass(frozen=True, slots=True)
class SeatUsage:
    """Seats an org uses."""

    org_id: str
    seat_limit: int
    paid_seats: int
    free_seats: int


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A membership began, changed role, or ended (role None) at an instant."""

    subject: str
    role: Role | None
    at: datetime


@dataclass(frozen=True, slots=True)
class SeatReport:
    """An org's paid seats over one calendar month."""

    org_id: str
    year: int
    month: int
    peak_paid_seats: int
    paid_seat_seconds: int
    paid_seats_at_end: int


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    """[start, end) of a calendar month in UTC; INVALID_ARGUMENT naming the bad field."""
    problems: list[FieldViolation | None] = []
    if not 1 <= month <= 12:
        problems.append(FieldViolation("month", "must be 1..12"))
    if not 2000 <= year <= 9998:
        problems.append(FieldViolation("year", "must be 2000..9998"))
    raise_if(problems)
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def seat_report(org_id: str, year: int, month: int, events: Sequence[MemberEvent],
                now: datetime) -> SeatReport:
    """Replays the membership history (in time order, from the beginning) over the month:
    the peak of paid seats held at once, and the paid seat-time."""
    start, end = month_bounds(year, month)
    end = min(end, max(now, start))
    paid: set[str] = set()
    peak = seconds = 0
    cursor = start
    in_month = False
    for event in events:
        if event.at >= end:
            break
        if event.at >= start and not in_month:
            in_month, peak = True, len(paid)  # the seats held as the month began
        if event.at > cursor:
            seconds += len(paid) * int((event.at - cursor).total_seconds())
            cursor = event.at
        (paid.add if event.role in PAID_ROLES else paid.discard)(event.subject)
        if in_month:
            peak = max(peak, len(paid))
    if not in_month:
        peak = len(paid)
    seconds += len(paid) * int((end - cursor).total_seconds())
    return SeatReport(org_id, year, month, peak, seconds, len(paid))


@dataclass(frozen=True, slots=True)
class MemberChange:
    """A membership as it now stands, or its removal."""

    member: Member
    is_removed: bool = False


@dataclass(frozen=True, slots=True)
class CredentialsUpdate:
    """One step of the credentials feed: a snapshot, or the changes up to `revision`."""

    revision: int
    is_snapshot: bool
    keys: Sequence[ApiKey] = ()
    members: Sequence[MemberChange] = ()
    orgs: Sequence[Org] = ()


# --- validation ---------------------------------------------------------------------------


def check_slug(field_name: str, value: str, max_length: int) -> FieldViolation | None:
    """An id of lower-case letters, digits and inner dashes."""
    if not value:
        return FieldViolation(field_name, "is required")
    if len(value) > max_length:
        return FieldViolation(field_name, f"is longer than {max_length} characters")
    if not _SLUG.fullmatch(value):
        return FieldViolation(field_name, "must be lower-case letters, digits and inner dashes")
    return None


def check_name(field_name: str, value: str) -> FieldViolation | None:
    """A display name: 1..200 printable characters."""
    if not value.strip():
        return FieldViolation(field_name, "is required")
    if len(value) > MAX_NAME_LENGTH or not value.isprintable():
        return FieldViolation(field_name,
                              f"must be 1..{MAX_NAME_LENGTH} printable characters")
    return None


def check_subject(field_name: str, value: str) -> FieldViolation | None:
    """An OIDC subject or e-mail address."""
    if not value.strip():
        return FieldViolation(field_name, "is required")
    if len(value) > MAX_SUBJECT_LENGTH or not value.isprintable() or value != value.strip():
        return FieldViolation(field_name, f"must be 1..{MAX_SUBJECT_LENGTH} printable "
                                          "characters without surrounding spaces")
    return None


def member_role(role: Role | None, field_name: str = "role") -> Role:
    """A role a person may hold."""
    if role is None or role not in MEMBER_ROLES:
        raise invalid(field_name, "must be owner, admin, billing, developer or viewer")
    return role


def key_role(role: Role | None, field_name: str = "role") -> Role:
    """A role a key may hold."""
    if role is None or role not in KEY_ROLES:
        raise invalid(field_name, "must be admin, billing, developer, viewer or gateway")
    return role


def normalize_subject(subject: str) -> str:
    """E-mail addresses match case-insensitively; opaque subjects are kept as they are."""
    return subject.lower() if "@" in subject else subject


def list_page(page_size: int, page_token: str) -> PageRequest:
    """A validated offset page of a listing."""
    return page_request(page_size, page_token)


# --- API key secrets ----------------------------------------------------------------------


def secret_digest(secret: str) -> str:
    """Hex SHA-256 of a secret: what is stored and what every service looks keys up by."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(environment_id: str) -> str:
    """`tly_<environment>_<random>` (`tly_org_...` for a key not limited to an environment)."""
    label = environment_id or ORG_WIDE_KEY_LABEL
    random_part = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_RANDOM_CHARS))
    return f"{KEY_PREFIX}{label}_{random_part}"


def visible_prefix(secret: str) -> str:
    """The part of a secret shown in listings: `tly_<environment>_` and a few characters."""
    head, _, random_part = secret.rpartition("_")
    return f"{head}_{random_part[:VISIBLE_RANDOM_CHARS]}"


def new_key_id() -> str:
    """A stable, non-secret key id."""
    return f"key_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A validated CreateApiKey."""

    request_id: str
    org_id: str
    project_id: str
    environment_id: str
    role: Role
    name: str
    expires_at: datetime | None
    created_by: str

    def fingerprint(self) -> str:
        """What the request means, for the idempotency check of a replay."""
        return "|".join((self.org_id, self.project_id, self.environment_id, self.role,
                         self.name, self.expires_at.isoformat() if self.expires_at else ""))


def key_request(*, request_id: str, org_id: str, project_id: str, environment_id: str,
                role: Role | None, name: str, expires_at: datetime | None, created_by: str,
                now: datetime) -> KeyRequest:
    """Validates a CreateApiKey, naming every bad field."""
    problems: list[FieldViolation | None] = [
        check_id("request_id", request_id, MAX_REQUEST_ID_LENGTH),
        check_slug("org_id", org_id, 64),
        check_name("name", name),
    ]
    if project_id:
        problems.append(check_slug("project_id", project_id, 64))
    if environment_id:
        problems.append(check_slug("environment_id", environment_id, 32))
        if not project_id:
            problems.append(FieldViolation("environment_id", "needs project_id"))
    if role is None or role not in KEY_ROLES:
        problems.append(FieldViolation(
            "role", "must be admin, billing, developer, viewer or gateway"))
    if expires_at is not None and expires_at <= now:
        problems.append(FieldViolation("expire_time", "must be in the future"))
    raise_if(problems)
    assert role is not None
    return KeyRequest(request_id, org_id, project_id, environment_id, role, name, expires_at,
                      created_by)


def check_key_role(caller_roles: frozenset[str] | None, key_role: Role) -> None:
    """PERMISSION_DENIED unless the caller may manage keys of `key_role` (no escalation: a
    developer never creates, rotates or revokes a key stronger than themselves)."""
    if caller_roles is None or policy.may_manage_key_role(caller_roles, key_role.value):
        return
    allowed = sorted(r.value for r in KEY_ROLES
                     if policy.may_manage_key_role(caller_roles, r.value))
    raise TallyError(Reason.PERMISSION_DENIED,
                     f"role: a key of role {key_role.value!r} is stronger than your role "
                     f"({', '.join(sorted(caller_roles))}); you may manage "
                     f"{', '.join(allowed) or 'no'} keys", field="role",
                     metadata={"permission": "accounts.ApiKeyRole"})


def overlap(seconds: int) -> timedelta:
    """A rotation's overlap window, checked."""
    if not 0 <= seconds <= MAX_OVERLAP_SECONDS:
        raise invalid("overlap_seconds", f"must be 0..{MAX_OVERLAP_SECONDS}")
    return timedelta(seconds=seconds)


def seat_limit_reached(org: Org, paid_seats: int) -> TallyError:
    """The refusal of one more paid seat."""
    return TallyError(
        Reason.SEAT_LIMIT_REACHED,
        f"org {org.org_id!r} uses {paid_seats} of {org.seat_limit} paid seats (owner, admin "
        "and developer members); raise the plan's seat limit, free a seat, or invite as "
        "viewer or billing (free seats)",
        metadata={"org_id": org.org_id, "seat_limit": str(org.seat_limit),
                  "paid_seats": str(paid_seats)})


def now_utc() -> datetime:
    """The current instant (UTC)."""
    return datetime.now(UTC)


# --- the credentials feed -----------------------------------------------------------------


class CredentialSource(Protocol):
    """What the hub reads: a snapshot, and the changes after a revision."""

    async def credentials_snapshot(self) -> CredentialsUpdate:
        """Every active key and every membership, at the current revision."""
        ...

    async def credentials_after(self, revision: int) -> CredentialsUpdate:
        """The keys and memberships changed after `revision`, as they now stand."""
        ...


@dataclass
class CredentialHub:
    """Fans the credentials feed out to every WatchCredentials stream of this replica.

    One reader (`refresh`, woken by the store's NOTIFY) turns new changes into one update that
    every subscriber's queue receives, so a thousand watchers cost one query per change, not a
    thousand. A subscriber whose queue is full (a stuck client) is dropped; it reconnects and
    gets a fresh snapshot.
    """

    source: CredentialSource
    max_watchers: int = 1000
    queue_size: int = 256
    revision: int = 0
    _subscribers: set[asyncio.Queue[CredentialsUpdate | None]] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self) -> None:
        """Reads what changed since the last refresh and hands it to every subscriber."""
        async with self._lock:
            update = await self.source.credentials_after(self.revision)
            if update.revision <= self.revision:
                return
            self.revision = update.revision
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(update)
                except asyncio.QueueFull:
                    self._subscribers.discard(queue)
                    while not queue.empty():
                        queue.get_nowait()
                    queue.put_nowait(None)

    async def watch(self, known_revision: int, lifetime_s: float
                    ) -> AsyncIterator[CredentialsUpdate]:
        """A snapshot (or nothing, when the caller is current), then every change, until
        `lifetime_s` passes."""
        if len(self._subscribers) >= self.max_watchers:
            raise TallyError(Reason.UNAVAILABLE, "too many credential watchers on this "
                             "replica; retry another", retry_after=timedelta(seconds=1))
        queue: asyncio.Queue[CredentialsUpdate | None] = asyncio.Queue(self.queue_size)
        self._subscribers.add(queue)  # before the snapshot: nothing committed after it is lost
        try:
            snapshot = await self.source.credentials_snapshot()
            revision = snapshot.revision
            if known_revision == 0 or known_revision != revision:
                yield snapshot
            loop = asyncio.get_running_loop()
            deadline = loop.time() + lifetime_s
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                try:
                    update = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if update is None:
                    return  # dropped as too slow: reconnect for a fresh snapshot
                if update.revision <= revision:
                    continue
                revision = update.revision
                yield update
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """Ends every watch stream (shutdown)."""
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
        self._subscribers.clear()


class AccountsStore(CredentialSource, Protocol):
    """What the Accounts domain needs from storage; every write is one transaction."""

    async def create_org(self, org: Org, owner: Member) -> tuple[Org, Member, bool]:
        """Inserts the org and its owner, or returns the existing ones (and False)."""
        ...

    async def get_org(self, org_id: str) -> Org | None:
        """The org, if it exists."""
        ...

    async def set_sso_required(self, org_id: str, is_sso_required: bool) -> Org:
        """Sets the flag (a credential change: every guard learns it)."""
        ...

    async def create_project(self, project: Project) -> tuple[Project, bool]:
        """Inserts, or returns the existing project (and False)."""
        ...

    async def list_projects(self, org_id: str, page: PageRequest) -> tuple[list[Project], int]:
        """One page of projects and the total."""
        ...

    async def create_environment(self, environment: Environment) -> tuple[Environment, bool]:
        """Inserts, or returns the existing environment (and False)."""
        ...

    async def list_environments(self, org_id: str, project_id: str, page: PageRequest
                                ) -> tuple[list[Environment], int]:
        """One page of environments and the total."""
        ...

    async def put_member(self, org_id: str, subject: str, role: Role, *, must_exist: bool,
                         now: datetime) -> Member:
        """Adds or changes a membership, holding the org's seat count in the transaction."""
        ...

    async def remove_member(self, org_id: str, subject: str) -> bool:
        """Removes a membership (never the last owner)."""
        ...

    async def list_members(self, org_id: str, page: PageRequest) -> tuple[list[Member], int]:
        """One page of members and the total."""
        ...

    async def seat_usage(self, org_id: str) -> SeatUsage:
        """Seats the org uses."""
        ...

    async def member_history(self, org_id: str, before: datetime) -> list[MemberEvent]:
        """The org's membership events before `before`, in time order."""
        ...

    async def create_key(self, request: KeyRequest, key: ApiKey) -> tuple[ApiKey, bool]:
        """Inserts `key` claiming request_id, or returns the key it created (and False)."""
        ...

    async def rotate_key(self, request_id: str, org_id: str, key_id: str,
                         successor: Callable[[ApiKey], ApiKey], overlap: timedelta,
                         now: datetime) -> tuple[ApiKey, ApiKey, bool]:
        """Inserts `successor(old key)` and shortens the old key's life to the overlap;
        (new, old, is_new). A replay of request_id returns the first rotation."""
        ...

    async def revoke_key(self, org_id: str, key_id: str, now: datetime) -> ApiKey:
        """Revokes (or returns the already revoked) key."""
        ...

    async def get_key(self, org_id: str, key_id: str) -> ApiKey:
        """One key of the org (NOT_FOUND if none)."""
        ...

    async def list_keys(self, org_id: str, page: PageRequest) -> tuple[list[ApiKey], int]:
        """One page of keys and the total."""
        ...


# --- the service --------------------------------------------------------------------------


@dataclass
class Accounts:
    """Orgs, projects, environments, members and keys: validation, then one store write."""

    store: AccountsStore
    regions: frozenset[str]
    """Regions this deployment serves; an org is created only in one of them."""

    async def create_org(self, *, org_id: str, name: str, region: str, seat_limit: int,
                         owner_subject: str) -> tuple[Org, Member]:
        """Creates an org and its first owner; a replay returns them, a different payload
        under the same org_id is IDEMPOTENCY_KEY_REUSED."""
        problems = [check_slug("org_id", org_id, 64), check_name("name", name),
                    check_subject("owner_subject", owner_subject)]
        if region not in self.regions:
            served = ", ".join(sorted(self.regions))
            problems.append(FieldViolation("region", f"must be a region this deployment "
                                                     f"serves ({served})"))
        if seat_limit < 1:
            problems.append(FieldViolation("seat_limit", "must be >= 1"))
        raise_if(problems)
        now = now_utc()
        org = Org(org_id, name, region, seat_limit, now)
        owner = Member(org_id, normalize_subject(owner_subject), Role.OWNER, now)
        stored, stored_owner, _ = await self.store.create_org(org, owner)
        if (stored.name, stored.region, stored.seat_limit) != (name, region, seat_limit):
            raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                             f"org_id: {org_id!r} already exists with other settings",
                             field="org_id")
        return stored, stored_owner

    async def get_org(self, org_id: str) -> Org:
        """The org, or NOT_FOUND."""
        raise_if([check_slug("org_id", org_id, 64)])
        org = await self.store.get_org(org_id)
        if org is None:
            raise TallyError(Reason.NOT_FOUND, f"org_id: no org {org_id!r}", field="org_id")
        return org

    async def create_project(self, *, org_id: str, project_id: str, name: str) -> Project:
        """Creates a project; a replay returns it."""
        raise_if([check_slug("org_id", org_id, 64), check_slug("project_id", project_id, 64),
                  check_name("name", name)])
        await self.get_org(org_id)
        stored, _ = await self.store.create_project(Project(org_id, project_id, name,
                                                            now_utc()))
        if stored.name != name:
            raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                             f"project_id: {project_id!r} already exists with another name",
                             field="project_id")
        return stored

    async def create_environment(self, *, org_id: str, project_id: str, environment_id: str,
                                 name: str) -> Environment:
        """Creates an environment of an existing project; a replay returns it."""
        raise_if([check_slug("org_id", org_id, 64), check_slug("project_id", project_id, 64),
                  check_slug("environment_id", environment_id, 32), check_name("name", name)])
        stored, _ = await self.store.create_environment(
            Environment(org_id, project_id, environment_id, name, now_utc()))
        if stored.name != name:
            raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                             f"environment_id: {environment_id!r} already exists with another "
                             "name", field="environment_id")
        return stored

    async def set_sso_required(self, *, org_id: str, is_sso_required: bool) -> Org:
        """Requires (or not) single sign-on for the org's people."""
        raise_if([check_slug("org_id", org_id, 64)])
        return await self.store.set_sso_required(org_id, is_sso_required)

    async def invite_member(self, *, org_id: str, subject: str, role: Role | None) -> Member:
        """Adds a member (a paid role needs a free paid seat)."""
        raise_if([check_slug("org_id", org_id, 64), check_subject("subject", subject)])
        return await self.store.put_member(org_id, normalize_subject(subject),
                                           member_role(role), must_exist=False, now=now_utc())

    async def change_member_role(self, *, org_id: str, subject: str, role: Role | None
                                 ) -> Member:
        """Changes a member's role (a move to a paid role needs a free paid seat)."""
        raise_if([check_slug("org_id", org_id, 64), check_subject("subject", subject)])
        return await self.store.put_member(org_id, normalize_subject(subject),
                                           member_role(role), must_exist=True, now=now_utc())

    async def remove_member(self, *, org_id: str, subject: str) -> bool:
        """Removes a member; False if there was none."""
        raise_if([check_slug("org_id", org_id, 64), check_subject("subject", subject)])
        return await self.store.remove_member(org_id, normalize_subject(subject))

    async def create_key(self, request: KeyRequest,
                         caller_roles: frozenset[str] | None = None) -> IssuedKey:
        """Issues a key; the secret is in the result only the first time. `caller_roles`: the
        verified caller's roles in the org (None: not verified, development mode)."""
        check_key_role(caller_roles, request.role)
        secret = new_secret(request.environment_id)
        key = ApiKey(key_id=new_key_id(), org_id=request.org_id,
                     project_id=request.project_id, environment_id=request.environment_id,
                     role=request.role, name=request.name, prefix=visible_prefix(secret),
                     secret_sha256=secret_digest(secret), created_at=now_utc(),
                     created_by=request.created_by, expires_at=request.expires_at)
        stored, is_new = await self.store.create_key(request, key)
        return IssuedKey(stored, secret if is_new else "")

    async def rotate_key(self, *, request_id: str, org_id: str, key_id: str,
                         overlap_seconds: int, created_by: str,
                         caller_roles: frozenset[str] | None = None) -> IssuedKey:
        """A successor with the same scope and role; the old key expires after the overlap."""
        raise_if([check_id("request_id", request_id, MAX_REQUEST_ID_LENGTH),
                  check_slug("org_id", org_id, 64),
                  check_id("key_id", key_id, MAX_REQUEST_ID_LENGTH)])
        if caller_roles is not None:  # a key's role never changes: reading it first is safe
            check_key_role(caller_roles, (await self.store.get_key(org_id, key_id)).role)
        window = overlap(overlap_seconds)
        now = now_utc()
        secrets_issued: list[str] = []

        def successor(old: ApiKey) -> ApiKey:
            # Same scope, role and name as the key it replaces; a key that had a lifetime
            # gets the same lifetime again from now.
            secret = new_secret(old.environment_id)
            secrets_issued.append(secret)
            lifetime = old.expires_at - old.created_at if old.expires_at else None
            return ApiKey(key_id=new_key_id(), org_id=old.org_id, project_id=old.project_id,
                          environment_id=old.environment_id, role=old.role, name=old.name,
                          prefix=visible_prefix(secret), secret_sha256=secret_digest(secret),
                          created_at=now, created_by=created_by,
                          expires_at=now + lifetime if lifetime else None)

        new, old, is_new = await self.store.rotate_key(request_id, org_id, key_id, successor,
                                                       window, now)
        secret = secrets_issued[-1] if is_new and secrets_issued else ""
        return IssuedKey(new, secret, old)

    async def seat_report(self, *, org_id: str, year: int, month: int) -> SeatReport:
        """Paid seats over a calendar month."""
        _, end = month_bounds(year, month)
        await self.get_org(org_id)
        history = await self.store.member_history(org_id, end)
        return seat_report(org_id, year, month, history, now_utc())

    async def revoke_key(self, *, org_id: str, key_id: str,
                         caller_roles: frozenset[str] | None = None) -> ApiKey:
        """Revokes a key (idempotent)."""
        raise_if([check_slug("org_id", org_id, 64),
                  check_id("key_id", key_id, MAX_REQUEST_ID_LENGTH)])
        if caller_roles is not None:
            check_key_role(caller_roles, (await self.store.get_key(org_id, key_id)).role)
        return await self.store.revoke_key(org_id, key_id, now_utc())
