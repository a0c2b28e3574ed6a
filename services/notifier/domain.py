"""Notifier's rules for alert rules and webhook signing secrets, in plain Python.

What a rule is, what makes one valid (`validate_rule` names every bad field by its proto path,
`rule.*`), how an update mask applies, how a list of rules is paged, and what rotating an
org's signing secret means. Every write is idempotent on the client's request id: the domain
names the write (`IdempotentWrite`: "<Rpc>:<org>:<request_id>" and a hash of what the request
means) and the store claims it in the transaction that does the write. No grpc, no SQL: the
stores are anything with the `AlertRuleStore` / `WebhookSecretStore` shape.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from tally.kit import errors
from tally.kit.errors import FieldViolation, Reason, TallyError
from tally.kit.paging import encode_token, page_problems, page_request

MAX_ID_LENGTH: Final = 128
MAX_WEBHOOK_URL_LENGTH: Final = 2048
MAX_EMAIL_LENGTH: Final = 254
"""Longest address SMTP carries (RFC 5321 path limit less the brackets)."""
MAX_COOLDOWN_SECONDS: Final = 7 * 24 * 3600
DEFAULT_SECRET_OVERLAP: Final = timedelta(hours=24)
MAX_SECRET_OVERLAP_SECONDS: Final = 7 * 24 * 3600
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
"""Hosts a webhook may reach over plain http:// (tests and local development)."""
SECRET_PREFIX: Final = "whsec_"

# Plausible, not RFC 5322: one address, a local part, a dotted domain, nothing that would let a
# header be split or a second recipient slip in.
_EMAIL: Final = re.compile(r"[^@\s,;<>\"()\[\]\\]+@(?:[\w-]+\.)+[\w-]{2,}")


class NotificationType(enum.StrEnum):
    """Kinds of notification a rule can match (proto NotificationType, lower-cased)."""

    LOW_BALANCE = "low_balance"
    BUDGET_THRESHOLD = "budget_threshold"
    HARD_LIMIT_HIT = "hard_limit_hit"
    BILLING_STATE_CHANGED = "billing_state_changed"
    PAYMENT_SUCCEEDED = "payment_succeeded"
    PAYMENT_FAILED = "payment_failed"
    TOP_UP_SUCCEEDED = "top_up_succeeded"
    TOP_UP_FAILED = "top_up_failed"
    BALANCE_CHANGED = "balance_changed"


class Channel(enum.StrEnum):
    """Where a rule delivers (proto Channel, lower-cased)."""

    WEBHOOK = "webhook"
    EMAIL = "email"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class AlertRule:
    """Which notifications an org wants, and where."""

    rule_id: str
    org_id: str
    types: tuple[NotificationType, ...]
    channel: Channel
    webhook_url: str
    email_to: str
    cooldown_seconds: int
    low_balance_threshold_micros: int
    is_enabled: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AlertRulePage:
    """One page of rules, newest first."""

    rules: Sequence[AlertRule]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """The writable fields of a rule as a client sent them: None = an enum left UNSPECIFIED
    (or a value this server does not know)."""

    types: tuple[NotificationType | None, ...]
    channel: Channel | None
    webhook_url: str
    email_to: str
    cooldown_seconds: int
    low_balance_threshold_micros: int
    is_enabled: bool


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """The writable fields of a rule once `validate_rule` accepted them."""

    types: tuple[NotificationType, ...]
    channel: Channel
    webhook_url: str
    email_to: str
    cooldown_seconds: int
    low_balance_threshold_micros: int
    is_enabled: bool


MASK_PATHS: Final[Mapping[str, str]] = {
    "types": "types",
    "channel": "channel",
    "webhook_url": "webhook_url",
    "email_to": "email_to",
    "cooldown_seconds": "cooldown_seconds",
    "low_balance_threshold_micros": "low_balance_threshold_micros",
    "enabled": "is_enabled",
}
"""Update-mask path (proto field of AlertRule) -> `RuleSpec` attribute, for every writable one."""
OUTPUT_ONLY_PATHS: Final = frozenset({"rule_id", "org_id", "created_at", "updated_at"})


@dataclass(frozen=True, slots=True)
class IdempotentWrite:
    """One client write, named for its idempotency claim."""

    rpc: str
    org_id: str
    request_id: str
    request_hash: str
    """What the request means; the same id with another hash is IDEMPOTENCY_KEY_REUSED."""

    @property
    def key(self) -> str:
        """The claim's key: request ids are the client's, so they are scoped by RPC and org."""
        return f"{self.rpc}:{self.org_id}:{self.request_id}"

    def reused(self) -> TallyError:
        """The error for this id arriving again with a different payload."""
        return TallyError(
            Reason.IDEMPOTENCY_KEY_REUSED,
            f"request_id: {self.request_id!r} was already used for a different {self.rpc} "
            "request", field="request_id", metadata={"request_id": self.request_id})


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A freshly generated signing secret."""

    secret_id: str
    secret: str


@dataclass(frozen=True, slots=True)
class Rotation:
    """What RotateWebhookSecret answers: the new secret (shown once) and until when the one it
    replaced keeps signing alongside it."""

    secret_id: str
    secret: str
    previous_valid_until: datetime | None


# --- validation -------------------------------------------------------------------------------


def check_id(field: str, value: str) -> FieldViolation | None:
    """An id: 1..128 printable characters."""
    return errors.check_id(field, value, MAX_ID_LENGTH)


raise_if = errors.raise_if


def _webhook_url_problem(url: str) -> str | None:
    if len(url) > MAX_WEBHOOK_URL_LENGTH:
        return f"must be at most {MAX_WEBHOOK_URL_LENGTH} characters"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "is not a valid URL"
    if not host:
        return "must be an absolute URL with a host, e.g. https://hooks.example.com/tally"
    if parts.scheme == "https" or (parts.scheme == "http" and host in LOCAL_HOSTS):
        return None
    return "must be an https:// URL (http:// only for localhost, 127.0.0.1 or [::1])"


def _email_problem(address: str) -> str | None:
    if len(address) > MAX_EMAIL_LENGTH:
        return f"must be at most {MAX_EMAIL_LENGTH} characters"
    if not _EMAIL.fullmatch(address):
        return "must be one e-mail address, e.g. billing@example.com"
    return None


def _type_problems(types: Sequence[NotificationType | None]) -> list[FieldViolation]:
    if not types:
        return [FieldViolation("rule.types", "must name at least one notification type")]
    if len(types) > len(NotificationType):
        # More entries than there are types means repeats; one line says so, not thousands.
        return [FieldViolation("rule.types", f"at most {len(NotificationType)} entries, "
                               "each type once")]
    problems: list[FieldViolation] = []
    seen: set[NotificationType] = set()
    for i, kind in enumerate(types):
        if kind is None:
            problems.append(FieldViolation(f"rule.types[{i}]",
                                           "must be a known type, not UNSPECIFIED"))
        elif kind in seen:
            problems.append(FieldViolation(f"rule.types[{i}]", f"repeats {kind.name}"))
        else:
            seen.add(kind)
    return problems


def _target_problems(spec: RuleSpec) -> list[FieldViolation]:
    """Where the rule delivers: the channel, and the one target field it needs."""
    problems: list[FieldViolation] = []
    if spec.channel is None:
        problems.append(FieldViolation("rule.channel", "is required (WEBHOOK, EMAIL or STREAM)"))
    targets = ((Channel.WEBHOOK, "rule.webhook_url", spec.webhook_url, _webhook_url_problem),
               (Channel.EMAIL, "rule.email_to", spec.email_to, _email_problem))
    for channel, field, value, problem_of in targets:
        if value:
            if spec.channel is not None and spec.channel is not channel:
                problems.append(FieldViolation(field,
                                               f"must be empty for channel {spec.channel.name}"))
            elif (bad := problem_of(value)) is not None:
                problems.append(FieldViolation(field, bad))
        elif spec.channel is channel:
            problems.append(FieldViolation(field, f"is required for channel {channel.name}"))
    return problems


def validate_rule(spec: RuleSpec, *, org_id: str,
                  problems: Iterable[FieldViolation | None] = ()) -> RuleSettings:
    """The settings `spec` describes, or INVALID_ARGUMENT naming every bad field (`rule.*`)
    together with `problems` found elsewhere in the request."""
    found = [p for p in problems if p is not None]
    if (bad_org := check_id("rule.org_id", org_id)) is not None:
        found.append(bad_org)
    found.extend(_type_problems(spec.types))
    found.extend(_target_problems(spec))
    if not 0 <= spec.cooldown_seconds <= MAX_COOLDOWN_SECONDS:
        found.append(FieldViolation("rule.cooldown_seconds",
                                    f"must be 0..{MAX_COOLDOWN_SECONDS} (7 days)"))
    if spec.low_balance_threshold_micros < 0:
        found.append(FieldViolation("rule.low_balance_threshold_micros", "must be >= 0"))
    elif (spec.low_balance_threshold_micros
          and NotificationType.LOW_BALANCE not in spec.types):
        # A threshold the rule never consults would look like an alert that silently never fires.
        found.append(FieldViolation("rule.low_balance_threshold_micros",
                                    "must be 0 unless types include LOW_BALANCE"))
    raise_if(found)
    assert spec.channel is not None
    return RuleSettings(
        types=tuple(t for t in spec.types if t is not None), channel=spec.channel,
        webhook_url=spec.webhook_url, email_to=spec.email_to,
        cooldown_seconds=spec.cooldown_seconds,
        low_balance_threshold_micros=spec.low_balance_threshold_micros,
        is_enabled=spec.is_enabled)


def mask_problems(paths: Sequence[str]) -> list[FieldViolation]:
    """What is wrong with an update mask: paths that are not writable fields of AlertRule."""
    return [FieldViolation("update_mask", f"{path!r} is output only or names the rule"
                           if path in OUTPUT_ONLY_PATHS else f"{path!r} is not a writable field")
            for path in paths if path not in MASK_PATHS]


def spec_of(rule: AlertRule | RuleSettings) -> RuleSpec:
    """The writable fields of a stored rule, as a spec."""
    return RuleSpec(
        types=tuple(rule.types), channel=rule.channel, webhook_url=rule.webhook_url,
        email_to=rule.email_to, cooldown_seconds=rule.cooldown_seconds,
        low_balance_threshold_micros=rule.low_balance_threshold_micros,
        is_enabled=rule.is_enabled)


def apply_mask(existing: AlertRule, new: RuleSpec, paths: Sequence[str]) -> RuleSpec:
    """`existing` with the fields named in `paths` taken from `new` (no paths = all of them)."""
    chosen = {MASK_PATHS[p] for p in paths or MASK_PATHS}
    old = spec_of(existing)
    return RuleSpec(**{f.name: getattr(new if f.name in chosen else old, f.name)
                       for f in dataclasses.fields(RuleSpec)})


def request_fingerprint(*parts: Any) -> str:
    """A stable hash of what a request means (enums by value, dataclasses by field)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, timedelta):
            return value.total_seconds()
        raise TypeError(f"{type(value).__name__} is not part of a fingerprint")

    canonical = json.dumps(parts, sort_keys=True, default=plain, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def rule_not_found(field: str, org_id: str, rule_id: str) -> TallyError:
    """NOT_FOUND for a rule id that is unknown in the org, or deleted."""
    return TallyError(Reason.NOT_FOUND, f"{field}: no alert rule {rule_id!r} in org {org_id!r}",
                      field=field)


def new_rule_id() -> str:
    """A fresh rule id."""
    return f"rule_{uuid.uuid4().hex}"


def new_signing_secret() -> NewSecret:
    """A fresh signing secret: 256 random bits, prefixed so it is recognisable in a leak scan."""
    return NewSecret(f"whs_{uuid.uuid4().hex}", SECRET_PREFIX + secrets.token_urlsafe(32))


def overlap_problem(overlap_seconds: int) -> FieldViolation | None:
    """A rotation's overlap must be 0 (the default) .. 7 days, in seconds."""
    if not 0 <= overlap_seconds <= MAX_SECRET_OVERLAP_SECONDS:
        return FieldViolation("overlap_seconds",
                              f"must be 0 (default 86400) .. {MAX_SECRET_OVERLAP_SECONDS}")
    return None


def secret_overlap(overlap_seconds: int) -> timedelta:
    """How long a replaced secret keeps signing (0 = 24 h); call `overlap_problem` first."""
    return timedelta(seconds=overlap_seconds) if overlap_seconds else DEFAULT_SECRET_OVERLAP


# --- the stores' shapes -------------------------------------------------------------------------

RuleChange = Callable[[AlertRule], RuleSettings]
"""What an update makes of the rule as stored (raises INVALID_ARGUMENT to refuse)."""


class AlertRuleStore(Protocol):
    """The store's side of alert rules. Writes claim `write` in their transaction: a replay
    returns the first call's result, a different payload raises `write.reused()`, and an error
    raised inside leaves nothing written (the claim included)."""

    async def list_rules(self, org_id: str, *, offset: int, limit: int) -> Sequence[AlertRule]:
        """The org's rules that are not deleted, newest first, `limit` of them from `offset`."""
        ...

    async def rule(self, org_id: str, rule_id: str) -> AlertRule | None:
        """One live rule of the org, or None."""
        ...

    async def create_rule(self, write: IdempotentWrite, settings: RuleSettings) -> AlertRule:
        """Stores a new rule for `write.org_id`."""
        ...

    async def update_rule(self, write: IdempotentWrite, rule_id: str, change: RuleChange
                          ) -> AlertRule:
        """Replaces a live rule's settings with `change(rule)`; `rule_not_found` if none."""
        ...

    async def delete_rule(self, write: IdempotentWrite, rule_id: str) -> None:
        """Soft-deletes a live rule and drops its pending deliveries; `rule_not_found` if none."""
        ...


class WebhookSecretStore(Protocol):
    """The store's side of signing secrets."""

    async def rotate(self, write: IdempotentWrite, overlap: timedelta, new: NewSecret
                     ) -> Rotation:
        """Makes `new` the org's signing secret; the current one retires after `overlap`."""
        ...


# --- the services -------------------------------------------------------------------------------


class AlertRules:
    """An org's alert rules."""

    def __init__(self, store: AlertRuleStore) -> None:
        self.store = store

    async def list_rules(self, org_id: str, page_size: int, page_token: str) -> AlertRulePage:
        """One page of the org's live rules; raises INVALID_ARGUMENT naming each bad field."""
        raise_if([check_id("org_id", org_id), *page_problems(page_size, page_token)])
        page = page_request(page_size, page_token)
        # One extra row says whether another page follows, without counting the rest.
        found = await self.store.list_rules(
            org_id, offset=page.offset, limit=page.page_size + 1
        )
        has_more = len(found) > page.page_size
        token = encode_token("offset", page.offset + page.page_size) if has_more else ""
        return AlertRulePage(found[: page.page_size], token)

    async def create_rule(self, request_id: str, org_id: str, spec: RuleSpec) -> AlertRule:
        """Creates a rule with a new id; a replay returns the rule first created."""
        settings = validate_rule(spec, org_id=org_id,
                                 problems=[check_id("request_id", request_id)])
        write = IdempotentWrite("CreateAlertRule", org_id, request_id,
                                request_fingerprint(org_id, settings))
        return await self.store.create_rule(write, settings)

    async def update_rule(self, request_id: str, org_id: str, rule_id: str, spec: RuleSpec,
                          paths: Sequence[str]) -> AlertRule:
        """Changes the fields in `paths` (none = every writable field); a replay returns the
        rule as this update left it."""
        raise_if([check_id("request_id", request_id), check_id("rule.org_id", org_id),
                  check_id("rule.rule_id", rule_id), *mask_problems(paths)])
        # Only the masked fields are the request's meaning: values outside the mask are ignored.
        chosen = sorted(set(paths or MASK_PATHS))
        meaning = {p: getattr(spec, MASK_PATHS[p]) for p in chosen}
        write = IdempotentWrite("UpdateAlertRule", org_id, request_id,
                                request_fingerprint(rule_id, meaning))

        def change(existing: AlertRule) -> RuleSettings:
            return validate_rule(apply_mask(existing, spec, chosen), org_id=org_id)

        return await self.store.update_rule(write, rule_id, change)

    async def get_rule(self, org_id: str, rule_id: str) -> AlertRule:
        """One live rule."""
        raise_if([check_id("org_id", org_id), check_id("rule_id", rule_id)])
        found = await self.store.rule(org_id, rule_id)
        if found is None:
            raise rule_not_found("rule_id", org_id, rule_id)
        return found

    async def delete_rule(self, request_id: str, org_id: str, rule_id: str) -> None:
        """Soft-deletes a live rule; a replay succeeds again."""
        raise_if([check_id("request_id", request_id), check_id("org_id", org_id),
                  check_id("rule_id", rule_id)])
        write = IdempotentWrite("DeleteAlertRule", org_id, request_id,
                                request_fingerprint(rule_id))
        await self.store.delete_rule(write, rule_id)


class SigningSecrets:
    """An org's webhook signing secrets: rotation (verification and signing read the store)."""

    def __init__(self, store: WebhookSecretStore) -> None:
        self.store = store

    async def rotate(self, request_id: str, org_id: str, overlap_seconds: int) -> Rotation:
        """Creates a new signing secret; the previous one keeps signing for the overlap (0 =
        24 h). A replay returns the same new secret."""
        raise_if([check_id("request_id", request_id), check_id("org_id", org_id),
                  overlap_problem(overlap_seconds)])
        overlap = secret_overlap(overlap_seconds)
        write = IdempotentWrite("RotateWebhookSecret", org_id, request_id,
                                request_fingerprint(org_id, overlap))
        return await self.store.rotate(write, overlap, new_signing_secret())
