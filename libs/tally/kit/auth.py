"""Who is calling, verified once, in the kit, for every service (DESIGN §8).

`Guard` is the authenticator every server runs unless development mode is asked for. Before a
handler runs it builds a `Principal` from the call's credentials and checks it against the
policy table (tally.kit.policy):

- an API key (`authorization: Bearer tly_...`): its SHA-256 looked up in a `CredentialCache`
  that follows accounts' WatchCredentials stream, so verification is a dictionary lookup and a
  revocation reaches every replica as fast as the stream delivers it (no database read, no hop
  per call);
- an OIDC token (`authorization: Bearer <JWT>`): signature by a key from the provider's JWKS
  (discovery document, cached, refreshed at most once per `min_refresh_s` on an unknown kid),
  a fixed algorithm allow-list (never `none`, never HMAC), issuer, audience, expiry and
  not-before with a bounded clock skew; the person's roles come from their memberships in the
  same cache;
- a service: the mTLS peer certificate's identity (the server verifies client certificates
  against TALLY_TLS_CLIENT_CA), or, behind Linkerd when TALLY_AUTH_MESH_IDENTITY=true, the
  meshed peer identity the proxy puts in `l5d-client-id`; its roles come from
  TALLY_AUTH_SERVICES.

No credentials, or bad ones: UNAUTHENTICATED with the reason. Verified but not allowed:
PERMISSION_DENIED naming the missing permission. A principal of one org never acts on
another's data: every org a request names (by the table's paths) must be one the principal
holds an allowed role in; streams are checked at open and, for client streams, per message.

`TrustCallers` (TALLY_AUTH_MODE=trust) is development mode: every caller is trusted as the
actor it names. It must be asked for, and says so loudly in the log at start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import grpc

from tally.kit import policy
from tally.kit.audit import (
    DENIED,
    SUMMARIZED,
    Auditor,
    AuditOutbox,
    PendingRecord,
    grpc_sink,
    is_audited,
)
from tally.kit.audit import current as current_record
from tally.kit.config import (
    load,
    parse_bool,
    parse_choice,
    parse_non_negative_int,
    parse_positive_int,
    setting,
)
from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.kit.server import Principal, TrustInternalCallers

log = get_logger("tally.kit.auth")

API_KEY_PREFIX: Final = "tly_"
MAX_API_KEY_LENGTH: Final = 128
MAX_TOKEN_BYTES: Final = 8192
"""Longest bearer token read: larger is refused before any parsing (a JWT with a handful of
claims is well under 2 KiB)."""
MESH_IDENTITY_HEADER: Final = "l5d-client-id"
_PERSON_ROLES: Final = frozenset({policy.OWNER, policy.ADMIN, policy.BILLING, policy.DEVELOPER,
                                  policy.VIEWER})
"""Interactive roles: refused on API keys of an org that requires single sign-on."""


def unauthenticated(why: str) -> TallyError:
    """A refusal for missing or bad credentials."""
    return TallyError(Reason.UNAUTHENTICATED, f"unauthenticated: {why}")


# --- configuration ------------------------------------------------------------------------


def parse_service_roles(raw: str) -> Mapping[str, tuple[frozenset[str], frozenset[str] | None]]:
    """`name=role[+role][@org|org];...`: each service identity's roles, and the orgs it is
    bound to (none listed = every org)."""
    found: dict[str, tuple[frozenset[str], frozenset[str] | None]] = {}
    for entry in filter(None, (part.strip() for part in raw.split(";"))):
        name, sep, rest = entry.partition("=")
        roles_part, _, orgs_part = rest.partition("@")
        roles = frozenset(r.strip() for r in roles_part.split("+") if r.strip())
        if not sep or not name.strip() or not roles or not roles <= policy.SERVICE_ROLES:
            raise ValueError(f"bad entry {entry!r}")
        orgs = frozenset(o.strip() for o in orgs_part.split("|") if o.strip()) or None
        found[name.strip()] = (roles, orgs)
    return MappingProxyType(found)


def _parse_algorithms(raw: str) -> tuple[str, ...]:
    allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
               "ES512", "EdDSA"}
    algorithms = tuple(a.strip() for a in raw.split(",") if a.strip())
    if not algorithms or not set(algorithms) <= allowed:
        raise ValueError("asymmetric algorithms only")
    return algorithms


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How servers verify callers (TALLY_AUTH_*, TALLY_OIDC_*)."""

    mode: str = setting("TALLY_AUTH_MODE", parse_choice("enforce", "trust"),
                        "enforce, or trust (development only)", default="enforce")
    services: Mapping[str, tuple[frozenset[str], frozenset[str] | None]] | None = setting(
        "TALLY_AUTH_SERVICES", parse_service_roles,
        "name=role[+role][@org|org];... with roles internal, operator, finance, gateway",
        default=None)
    mesh_identity: bool = setting("TALLY_AUTH_MESH_IDENTITY", parse_bool,
                                  "true only behind a mesh that sets l5d-client-id",
                                  default=False)
    oidc_issuer: str = setting("TALLY_OIDC_ISSUER", str, "the provider's issuer URL",
                               default="")
    oidc_audience: str = setting("TALLY_OIDC_AUDIENCE", str, "this deployment's client id",
                                 default="")
    oidc_algorithms: tuple[str, ...] = setting(
        "TALLY_OIDC_ALGORITHMS", _parse_algorithms, "comma-separated asymmetric JWS algorithms",
        default=("RS256", "ES256"))
    oidc_leeway_s: int = setting("TALLY_OIDC_LEEWAY_S", parse_non_negative_int,
                                 "seconds of clock skew allowed", default=60)
    oidc_min_refresh_s: int = setting("TALLY_OIDC_MIN_REFRESH_S", parse_non_negative_int,
                                      "seconds between JWKS refreshes on an unknown kid",
                                      default=30)
    regions: frozenset[str] | None = setting(
        "TALLY_REGIONS", lambda raw: frozenset(r.strip() for r in raw.split(",") if r.strip()),
        "comma-separated regions this deployment serves", default=None)
    audit: bool = setting("TALLY_AUDIT", parse_bool, "true or false", default=True)
    audit_durable: bool = setting(
        "TALLY_AUDIT_DURABLE", parse_bool,
        "true (each record in the service's database before its call answers) or false "
        "(queued in memory: lost if the process dies)", default=True)
    audit_flush_ms: int = setting("TALLY_AUDIT_FLUSH_MS", parse_positive_int,
                                  "milliseconds between shipments to accounts", default=50)
    audit_max_queue: int = setting("TALLY_AUDIT_MAX_QUEUE", parse_positive_int,
                                   "records held while accounts is unreachable",
                                   default=100_000)
    credentials_retry_ms: int = setting("TALLY_AUTH_CREDENTIALS_RETRY_MS", parse_positive_int,
                                        "milliseconds between reconnects to accounts",
                                        default=500)


def load_auth_config(environ: Mapping[str, str] | None = None) -> AuthConfig:
    """Reads AuthConfig from the environment (raises ConfigError)."""
    return load(AuthConfig, environ)


# --- the credentials cache ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What verifying one API key needs."""

    key_id: str
    org_id: str
    project_id: str
    environment_id: str
    role: str
    expires_at: float | None
    is_revoked: bool


def _role_name(number: int) -> str:
    from tally.accounts.v1 import accounts_pb2

    return accounts_pb2.Role.Name(number).removeprefix("ROLE_").lower()  # type: ignore[arg-type]


@dataclass
class CredentialCache:
    """API keys by digest and memberships by subject, kept current from accounts' feed."""

    keys: dict[str, KeyEntry] = field(default_factory=dict)
    members: dict[str, dict[str, str]] = field(default_factory=dict)
    """subject -> {org_id: role}"""
    revision: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: dict[str, float] = field(default_factory=dict)
    """key_id -> when this replica last accepted it (since the last report to accounts)."""
    regions: dict[str, str] = field(default_factory=dict)
    """org_id -> the region its data lives in."""
    sso_required: frozenset[str] = frozenset()
    """Orgs whose people must sign in with OIDC (their keys with a person's role refused)."""

    def take_key_uses(self) -> dict[str, float]:
        """The key uses since the last call (handed to accounts by the auditor)."""
        uses, self.last_used = self.last_used, {}
        return uses

    def apply(self, update: Any) -> None:
        """Merges (or, for a snapshot, replaces with) one WatchCredentialsResponse."""
        keys = {} if update.is_snapshot else dict(self.keys)
        members = ({} if update.is_snapshot
                   else {s: dict(orgs) for s, orgs in self.members.items()})
        for credential in update.keys:
            key = credential.key
            keys[credential.secret_sha256] = KeyEntry(
                key.key_id, key.org_id, key.project_id, key.environment_id,
                _role_name(key.role),
                key.expire_time.ToNanoseconds() / 1e9 if key.HasField("expire_time") else None,
                key.HasField("revoke_time"))
        for change in update.members:
            member = change.member
            orgs = members.setdefault(member.subject, {})
            if change.removed:
                orgs.pop(member.org_id, None)
            else:
                orgs[member.org_id] = _role_name(member.role)
        regions = {} if update.is_snapshot else dict(self.regions)
        sso = set() if update.is_snapshot else set(self.sso_required)
        for org in update.orgs:
            regions[org.org_id] = org.region
            (sso.add if org.is_sso_required else sso.discard)(org.org_id)
        # Swapped whole: a call verifying meanwhile sees the old state or the new, never half.
        self.keys, self.members, self.revision = keys, members, update.revision
        self.regions, self.sso_required = regions, frozenset(sso)
        self.ready.set()

    def key(self, secret: str) -> KeyEntry:
        """The live key with this secret, or UNAUTHENTICATED saying why not."""
        entry = self.keys.get(hashlib.sha256(secret.encode()).hexdigest())
        if entry is None:
            raise unauthenticated("unknown API key")
        if entry.is_revoked:
            raise unauthenticated(f"API key {entry.key_id} is revoked")
        now = time.time()
        if entry.expires_at is not None and now >= entry.expires_at:
            raise unauthenticated(f"API key {entry.key_id} expired")
        self.last_used[entry.key_id] = now
        return entry

    def roles_of(self, *subjects: str) -> dict[str, frozenset[str]]:
        """The org roles of a person known by any of `subjects`."""
        found: dict[str, set[str]] = {}
        for subject in subjects:
            for org, role in self.members.get(subject, {}).items():
                found.setdefault(org, set()).add(role)
        return {org: frozenset(roles) for org, roles in found.items()}

    async def follow(self, channel: grpc.aio.Channel, stop: asyncio.Event,
                     retry_s: float = 0.5) -> None:
        """Follows accounts' WatchCredentials until `stop`, reconnecting after a loss."""
        from tally.accounts.v1 import accounts_pb2, accounts_pb2_grpc

        stub = accounts_pb2_grpc.AccountsServiceStub(channel)
        while not stop.is_set():
            call = stub.WatchCredentials(accounts_pb2.WatchCredentialsRequest(
                known_revision=self.revision))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    reading = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({reading, stopping},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        reading.cancel()
                        call.cancel()
                        return
                    message = reading.result()
                    if message is grpc.aio.EOF:
                        break
                    self.apply(message)
            except grpc.aio.AioRpcError as exc:
                log.warning("credentials_feed_lost", code=exc.code().name,
                            details=exc.details(), retry_in_s=retry_s)
                try:
                    await asyncio.wait_for(stop.wait(), retry_s)
                except TimeoutError:
                    pass
            finally:
                stopping.cancel()


# --- OIDC ---------------------------------------------------------------------------------


@dataclass
class OidcVerifier:
    """Verifies OIDC ID/access tokens of one provider (any that publishes discovery + JWKS)."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: int = 60
    min_refresh_s: float = 30.0
    fetch_timeout_s: float = 5.0
    _keys: dict[str, Any] = field(default_factory=dict)
    _refreshed_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _session: Any = None

    async def _get_json(self, url: str) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.fetch_timeout_s))
        async with self._session.get(url) as response:
            response.raise_for_status()
            return await response.json(content_type=None)

    async def refresh(self) -> None:
        """Reloads the JWKS named by the discovery document."""
        import jwt

        discovery = await self._get_json(
            self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if discovery.get("issuer") != self.issuer:
            raise unauthenticated("the provider's discovery document names another issuer")
        jwks = await self._get_json(discovery["jwks_uri"])
        keys: dict[str, Any] = {}
        for data in jwks.get("keys", []):
            if data.get("use", "sig") != "sig" or "kid" not in data:
                continue
            try:
                keys[data["kid"]] = jwt.PyJWK.from_dict(data)
            except jwt.PyJWTError:
                continue  # a key type or algorithm this deployment does not take
        self._keys = keys
        self._refreshed_at = time.monotonic()

    async def _key(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            # An unknown kid may be a rotation: refresh, but at most once per min_refresh_s,
            # so a flood of made-up kids cannot turn into a flood of JWKS fetches.
            if key is None and time.monotonic() - self._refreshed_at >= self.min_refresh_s:
                try:
                    await self.refresh()
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("jwks_refresh_failed", issuer=self.issuer, error=str(exc))
                    raise TallyError(Reason.UNAVAILABLE, "the identity provider's keys could "
                                     "not be fetched; retry") from None
                key = self._keys.get(kid)
        if key is None:
            raise unauthenticated("token signed by an unknown key")
        return key

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or UNAUTHENTICATED naming what failed."""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("malformed token") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise unauthenticated(f"token algorithm {algorithm!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise unauthenticated("token names no key (kid)")
        key = await self._key(kid)
        if key.algorithm_name != algorithm:
            raise unauthenticated("token algorithm does not match its key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key.key, algorithms=[algorithm], audience=self.audience,
                issuer=self.issuer, leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise unauthenticated(f"invalid token: {exc}") from None
        return claims

    async def close(self) -> None:
        """Closes the HTTP session."""
        if self._session is not None:
            await self._session.close()


# --- the guard ----------------------------------------------------------------------------


def _bearer(metadata: Mapping[str, str]) -> str | None:
    value = metadata.get("authorization")
    if value is None:
        return None
    if len(value) > MAX_TOKEN_BYTES + 7:
        raise unauthenticated(f"credentials longer than {MAX_TOKEN_BYTES} bytes")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthenticated("authorization must be 'Bearer <API key or token>'")
    return token.strip()


def _peer_identity(context: Any) -> str | None:
    """The identity of a client certificate the server verified, if the call has one."""
    if context is None:
        return None
    auth = context.auth_context() or {}
    for name in (b"x509_subject_alternative_name", "x509_subject_alternative_name",
                 b"x509_common_name", "x509_common_name"):
        values = auth.get(name)
        if values:
            value = values[0]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


@dataclass
class Guard:
    """Verifies every call's credentials and checks it against the policy table."""

    cache: CredentialCache
    oidc: OidcVerifier | None = None
    services: Mapping[str, tuple[frozenset[str], frozenset[str] | None]] = field(
        default_factory=dict)
    mesh_identity: bool = False
    rules: Mapping[str, policy.Rule] = field(default_factory=lambda: policy.POLICY)
    follow: Callable[[asyncio.Event], Any] | None = None
    """Started with the server: keeps `cache` current (None: someone else does)."""
    auditor: Auditor | None = None
    """Where audited calls are recorded (None: not audited)."""
    ready_timeout_s: float = 10.0
    """How long `start` waits for the first credentials snapshot."""
    regions: frozenset[str] | None = None
    """The data-residency regions this server serves (None: every region)."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Future[Any]] = field(default_factory=list)
    _audited: dict[str, str] = field(default_factory=dict)

    async def start(self) -> None:
        """Starts following the credentials feed and shipping the audit trail."""
        if self._tasks:
            return
        if self.follow is not None:
            self._tasks.append(asyncio.ensure_future(self.follow(self._stop)))
            # Serving before the first snapshot would refuse every valid key: wait for it
            # (bounded; a server whose accounts is down still starts, refusing keys).
            try:
                await asyncio.wait_for(self.cache.ready.wait(), self.ready_timeout_s)
            except TimeoutError:
                log.error("credentials_not_loaded", waited_s=self.ready_timeout_s)
        if self.auditor is not None:
            self._tasks.append(asyncio.ensure_future(self.auditor.run(self._stop)))

    async def stop(self) -> None:
        """Stops following the feed, ships what is left of the audit trail, closes OIDC."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self.oidc is not None:
            await self.oidc.close()

    def _audit_kind(self, method: str) -> str:
        """'call' (each call recorded), 'summary' (counted per interval) or '' (only its
        refusals recorded)."""
        kind = self._audited.get(method)
        if kind is None:
            kind = self._audited[method] = (
                "" if not is_audited(method)
                else "summary" if method.rsplit("/", 1)[1] in SUMMARIZED else "call")
        return kind

    def pending(self, method: str, principal: Principal | None, context: Any,
                request: Any) -> PendingRecord | None:
        """An admitted call's record, for its handler to write with its change (the kit's
        hook before the handler runs; tally.kit.audit.pending)."""
        if self.auditor is None or self._audit_kind(method) != "call":
            return None
        peer = context.peer() if context is not None else ""
        return self.auditor.pending(method, self.rules.get(method), principal, peer, request)

    def record(self, method: str, principal: Principal | None, context: Any, request: Any,
               code: grpc.StatusCode) -> Awaitable[Any] | None:
        """The kit's hook at the end of every call: audits the ones that must be. Returns
        what the call awaits before it answers (its record made durable), if anything."""
        if self.auditor is None:
            return None
        outcome = code.name
        kind = self._audit_kind(method)
        if outcome == "OK" and kind == "call":
            current = current_record()
            if current is not None and current.is_written:
                return None  # committed with the call's change
        if outcome in DENIED or kind == "call":
            peer = context.peer() if context is not None else ""
            return self.auditor.record(method, self.rules.get(method), principal, peer,
                                       request, outcome)
        if kind == "summary":
            peer = context.peer() if context is not None else ""
            self.auditor.count(method, self.rules.get(method), principal, peer, request,
                               outcome)
        return None

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        """The verified caller (no policy check: `admit` does both)."""
        return await self.verify(metadata, None)

    async def verify(self, metadata: Mapping[str, str], context: Any) -> Principal:
        """The caller, from its credentials; UNAUTHENTICATED without valid ones."""
        token = _bearer(metadata)
        if token is not None:
            if token.startswith(API_KEY_PREFIX):
                if len(token) > MAX_API_KEY_LENGTH:
                    raise unauthenticated("malformed API key")
                return self._key_principal(self.cache.key(token))
            if token.count(".") == 2 and self.oidc is not None:
                return self._person(await self.oidc.verify(token))
            raise unauthenticated("unrecognised bearer credentials")
        identity = _peer_identity(context)
        if identity is None and self.mesh_identity:
            identity = metadata.get(MESH_IDENTITY_HEADER)
            if identity:
                # Linkerd: <serviceaccount>.<namespace>.serviceaccount.identity.<...>
                identity = identity.split(".", 1)[0]
        if identity:
            return self._service(identity)
        raise unauthenticated("no credentials: send 'authorization: Bearer <API key or "
                              "token>' or call over mTLS")

    def _key_principal(self, key: KeyEntry) -> Principal:
        if key.org_id in self.cache.sso_required and key.role in _PERSON_ROLES:
            raise unauthenticated(f"org {key.org_id!r} requires single sign-on: its people "
                                  f"sign in with OIDC; API key {key.key_id} with role "
                                  f"{key.role!r} is refused (gateway keys still work)")
        return Principal(identity=f"key:{key.key_id}", verified_by="api_key",
                         org_roles={key.org_id: frozenset({key.role})},
                         project_id=key.project_id, environment_id=key.environment_id)

    def _person(self, claims: Mapping[str, Any]) -> Principal:
        subject = str(claims["sub"])
        subjects = [subject]
        email = claims.get("email")
        if isinstance(email, str) and claims.get("email_verified") is True:
            subjects.append(email.lower())
        return Principal(identity=f"user:{subject}", verified_by="oidc",
                         org_roles=self.cache.roles_of(*subjects))

    def _service(self, identity: str) -> Principal:
        known = self.services.get(identity)
        if known is None:
            raise unauthenticated(f"service identity {identity!r} is not configured "
                                  "(TALLY_AUTH_SERVICES)")
        roles, orgs = known
        return Principal(identity=f"svc:{identity}", roles=roles, verified_by="mtls",
                         bound_orgs=orgs)

    async def admit(self, method: str, metadata: Mapping[str, str], context: Any,
                    request: Any) -> Principal:
        """Verifies the caller and checks `request` (None for a client stream's open)."""
        principal = await self.verify(metadata, context)
        self.check(principal, method, request)
        return principal

    def check(self, principal: Principal, method: str, request: Any) -> None:
        """PERMISSION_DENIED unless `principal` may call `method` for every org `request`
        names (`request` None: the role alone, at a client stream's open)."""
        rule = self.rules.get(method)
        if rule is None:
            raise TallyError(Reason.PERMISSION_DENIED,
                             f"{method} has no entry in the policy table; refused",
                             metadata={"permission": method})
        orgs = policy.orgs_named(rule, request) if request is not None else set()
        if orgs:
            for org in sorted(orgs):
                if not rule.roles & principal.roles_in(org):
                    raise permission_denied(rule, method, principal, org)
                self._check_region(org)
            _check_scope(principal, request)
            return
        if request is not None and rule.org_fields and rule.org_required:
            if not (rule.roles & principal.roles and principal.bound_orgs is None):
                raise permission_denied(rule, method, principal, None)
            return
        if not rule.roles & principal.all_roles():
            raise permission_denied(rule, method, principal, None)

    def _check_region(self, org: str) -> None:
        """An org whose data lives in a region this server does not serve is sent there."""
        if self.regions is None:
            return
        region = self.cache.regions.get(org)
        if region is not None and region not in self.regions:
            raise TallyError(Reason.WRONG_REGION,
                             f"org {org!r} lives in region {region!r}; this service serves "
                             f"{', '.join(sorted(self.regions))}: call region {region!r}",
                             metadata={"org_id": org, "region": region})

    def check_message(self, principal: Principal, method: str, message: Any) -> None:
        """A client stream's message: the orgs it names, as for a unary request."""
        self.check(principal, method, message)


def _check_scope(principal: Principal, request: Any) -> None:
    """A key limited to a project (environment) acts only there."""
    if not principal.project_id:
        return
    context = getattr(request, "context", None)
    if context is None or not hasattr(context, "project_id"):
        return
    if context.project_id and context.project_id != principal.project_id:
        raise TallyError(Reason.PERMISSION_DENIED, f"permission denied: key limited to "
                         f"project {principal.project_id!r}", field="context.project_id")
    if (principal.environment_id and context.environment
            and context.environment != principal.environment_id):
        raise TallyError(Reason.PERMISSION_DENIED, f"permission denied: key limited to "
                         f"environment {principal.environment_id!r}",
                         field="context.environment")


def permission_denied(rule: policy.Rule, method: str, principal: Principal, org: str | None
                      ) -> TallyError:
    """PERMISSION_DENIED naming the permission, the roles it needs and where (the guard's
    words; the portal refuses a forged form with the same)."""
    permission = rule.permission(method)
    roles = ", ".join(sorted(rule.roles))
    where = f" in org {org!r}" if org else (
        " (the request names no org: only a platform role acting for every org may)"
        if rule.org_fields and rule.org_required else "")
    return TallyError(Reason.PERMISSION_DENIED,
                      f"permission denied: {permission} needs one of [{roles}]{where}; "
                      f"{principal.identity} has none",
                      metadata={"permission": permission, **({"org_id": org} if org else {})})


class TrustCallers(TrustInternalCallers):
    """Development mode: trusts every caller as the actor it names. Never in production."""

    def __init__(self) -> None:
        log.warning("auth_development_mode", detail="TALLY_AUTH_MODE=trust: every caller is "
                    "trusted as whoever it claims to be; no credentials are verified and no "
                    "policy is enforced. Never run a deployment reachable by others this way.")


def build_authenticator(accounts_address: str, service: str,
                        config: AuthConfig | None = None, *,
                        audit_database_url: str | None = None) -> Any:
    """The authenticator a server runs: a Guard following accounts at `accounts_address`
    and shipping `service`'s audit trail there, or TrustCallers in development mode. With
    `audit_database_url` (the service's own database), audit records go through its
    `<service>.audit_outbox` and are durable before their call answers."""
    config = config or load_auth_config()
    if config.mode == "trust":
        return TrustCallers()
    from tally.kit.channels import peer_channel

    cache = CredentialCache()
    auditor = (Auditor(service, grpc_sink(peer_channel(accounts_address)),
                       max_queue=config.audit_max_queue, flush_ms=config.audit_flush_ms,
                       key_uses=cache.take_key_uses,
                       outbox=(AuditOutbox(audit_database_url, f"{service}.audit_outbox")
                               if audit_database_url and config.audit_durable else None))
               if config.audit else None)
    oidc = (OidcVerifier(config.oidc_issuer, config.oidc_audience, config.oidc_algorithms,
                         config.oidc_leeway_s, config.oidc_min_refresh_s)
            if config.oidc_issuer else None)

    async def follow(stop: asyncio.Event) -> None:
        channel = peer_channel(accounts_address)
        try:
            await cache.follow(channel, stop, config.credentials_retry_ms / 1000)
        finally:
            await channel.close()

    log.info("auth_enforced", accounts=accounts_address, oidc_issuer=config.oidc_issuer or None,
             services=sorted(config.services or ()), mesh_identity=config.mesh_identity)
    return Guard(cache, oidc, config.services or {}, config.mesh_identity, follow=follow,
                 auditor=auditor, regions=config.regions)
