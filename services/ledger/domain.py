"""The ledger's rules, in plain Python: accounts, transfers, grants, reservations, the hash chain.

Nothing here knows about gRPC or SQL. The store locks rows and persists; these functions decide
what may happen and what it looks like (modelled on TigerBeetle: accounts, immutable transfers,
pending transfers that are posted or voided, and flags that forbid overdraft).
"""

from __future__ import annotations

import enum
import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from tally.kit import errors
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid
from tally.kit.money import INT64_MAX

MAX_ID_LENGTH: Final = 64
MAX_TRANSFER_BATCH: Final = 1000
MAX_USAGE_BATCH: Final = 5000
MAX_LABELS: Final = 32
DEFAULT_RESERVATION_TTL: Final = timedelta(seconds=300)
MAX_RESERVATION_TTL: Final = timedelta(seconds=3600)
GENESIS_HASH: Final = "0" * 64
NEVER: Final = datetime.max.replace(tzinfo=UTC)


class AccountKind(enum.StrEnum):
    """Role of an account (proto AccountKind)."""

    ORG_CREDIT = "ORG_CREDIT"
    PAYMENTS_CLEARING = "PAYMENTS_CLEARING"
    REVENUE = "REVENUE"
    BONUS_EXPENSE = "BONUS_EXPENSE"
    PROMOTIONAL_EXPENSE = "PROMOTIONAL_EXPENSE"
    REFUNDS = "REFUNDS"
    ADJUSTMENTS = "ADJUSTMENTS"
    ARREARS = "ARREARS"
    EXPIRY = "EXPIRY"


class TransferKind(enum.StrEnum):
    """Why a transfer exists (proto TransferKind)."""

    PURCHASE = "PURCHASE"
    BONUS = "BONUS"
    PROMOTIONAL_GRANT = "PROMOTIONAL_GRANT"
    USAGE = "USAGE"
    REFUND = "REFUND"
    MANUAL_ADJUSTMENT = "MANUAL_ADJUSTMENT"
    EXPIRY = "EXPIRY"
    REVERSAL = "REVERSAL"


class GrantKind(enum.StrEnum):
    """Kind of credit a grant carries (proto GrantKind)."""

    PURCHASED = "PURCHASED"
    BONUS = "BONUS"
    PROMOTIONAL = "PROMOTIONAL"


class ReservationState(enum.StrEnum):
    """Lifecycle of a hold (proto ReservationState)."""

    HELD = "HELD"
    CAPTURED = "CAPTURED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class BillingState(enum.StrEnum):
    """Spend-control state of an org (proto tally.common.v1.BillingState)."""

    ACTIVE = "ACTIVE"
    THROTTLED = "THROTTLED"
    READ_ONLY = "READ_ONLY"


def automatic_billing_state(posted_micros: int, arrears_micros: int
                            ) -> tuple[BillingState, str]:
    """The state the money puts an org in, and why (unless an operator pinned another):
    usage owed beyond credit -> READ_ONLY; prepaid credit used up -> THROTTLED (a lower rate
    cap, so a top-up can still be bought and used); otherwise ACTIVE. A payment that clears
    the cause therefore restores ACTIVE by itself."""
    if arrears_micros > 0:
        return BillingState.READ_ONLY, "usage beyond available credit is owed (arrears)"
    if posted_micros <= 0:
        return BillingState.THROTTLED, "prepaid balance exhausted"
    return BillingState.ACTIVE, "credit available and nothing owed"


class OutboxEventType(enum.StrEnum):
    """What an outbox event reports (proto OutboxEventType)."""

    BALANCE_CHANGED = "BALANCE_CHANGED"
    BILLING_STATE_CHANGED = "BILLING_STATE_CHANGED"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    ARREARS_RECORDED = "ARREARS_RECORDED"
    LEASE_CHANGED = "LEASE_CHANGED"
    LOW_BALANCE = "LOW_BALANCE"
    PAYMENT_SUCCEEDED = "PAYMENT_SUCCEEDED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    TOP_UP_SUCCEEDED = "TOP_UP_SUCCEEDED"
    TOP_UP_FAILED = "TOP_UP_FAILED"


# --- accounts -----------------------------------------------------------------------------

SYSTEM_ACCOUNTS: Final[Mapping[AccountKind, str]] = {
    AccountKind.PAYMENTS_CLEARING: "sys:payments_clearing",
    AccountKind.REVENUE: "sys:revenue",
    AccountKind.BONUS_EXPENSE: "sys:bonus_expense",
    AccountKind.PROMOTIONAL_EXPENSE: "sys:promotional_expense",
    AccountKind.REFUNDS: "sys:refunds",
    AccountKind.ADJUSTMENTS: "sys:adjustments",
    AccountKind.EXPIRY: "sys:expiry",
}
SYSTEM_SHARDS: Final = 16
"""Each system account is split into this many rows (one per shard of orgs): every debit
locks its system row until commit, and one row for every org would serialize the whole
ledger on it. The account's balance is the sum of its shards (the migration creates them)."""


def system_account(kind: AccountKind, org_id: str) -> str:
    """The shard of system account `kind` that `org_id`'s transfers use."""
    return f"{SYSTEM_ACCOUNTS[kind]}#{zlib.crc32(org_id.encode()) % SYSTEM_SHARDS}"


def credit_account(org_id: str) -> str:
    """The org's spendable-credit account."""
    return f"org:{org_id}"


def arrears_account(org_id: str) -> str:
    """The org's arrears account: its balance is minus what the org owes."""
    return f"arrears:{org_id}"


def account_kind(account_id: str) -> AccountKind:
    """The kind of an account, from its id."""
    if account_id.startswith("org:"):
        return AccountKind.ORG_CREDIT
    if account_id.startswith("arrears:"):
        return AccountKind.ARREARS
    base = account_id.partition("#")[0]
    for kind, system_id in SYSTEM_ACCOUNTS.items():
        if system_id == base:
            return kind
    raise ValueError(f"unknown account {account_id!r}")


# Which system account sits on the other side of a credit-adding or credit-removing kind.
CREDIT_SOURCE: Final[Mapping[TransferKind, AccountKind]] = {
    TransferKind.PURCHASE: AccountKind.PAYMENTS_CLEARING,
    TransferKind.BONUS: AccountKind.BONUS_EXPENSE,
    TransferKind.PROMOTIONAL_GRANT: AccountKind.PROMOTIONAL_EXPENSE,
    TransferKind.MANUAL_ADJUSTMENT: AccountKind.ADJUSTMENTS,
}
DEBIT_SINK: Final[Mapping[TransferKind, AccountKind]] = {
    TransferKind.USAGE: AccountKind.REVENUE,
    TransferKind.REFUND: AccountKind.REFUNDS,
    TransferKind.MANUAL_ADJUSTMENT: AccountKind.ADJUSTMENTS,
    TransferKind.EXPIRY: AccountKind.EXPIRY,
}
GRANT_OF_KIND: Final[Mapping[TransferKind, GrantKind]] = {
    TransferKind.PURCHASE: GrantKind.PURCHASED,
    TransferKind.BONUS: GrantKind.BONUS,
    TransferKind.PROMOTIONAL_GRANT: GrantKind.PROMOTIONAL,
    TransferKind.MANUAL_ADJUSTMENT: GrantKind.PURCHASED,
    TransferKind.REVERSAL: GrantKind.PURCHASED,
}
# Kinds a client may post through Transfer; the others have their own RPC.
CLIENT_TRANSFER_KINDS: Final = frozenset(
    {
        TransferKind.BONUS,
        TransferKind.PROMOTIONAL_GRANT,
        TransferKind.USAGE,
        TransferKind.EXPIRY,
        TransferKind.REVERSAL,
    }
)


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GrantSpec:
    """The grant a credit-adding transfer creates."""

    kind: GrantKind
    priority: int = 0
    expires_at: datetime | None = None


DEFAULT_PRIORITY: Final[Mapping[GrantKind, int]] = {
    GrantKind.PROMOTIONAL: 100,
    GrantKind.BONUS: 200,
    GrantKind.PURCHASED: 300,
}


@dataclass(slots=True)
class Grant:
    """Credit of one kind, burned down by usage in burn order."""

    grant_id: str
    org_id: str
    kind: GrantKind
    priority: int
    original_micros: int
    remaining_micros: int
    expires_at: datetime | None
    source_transfer_id: str
    created_at: datetime


def burn_order(grant: Grant) -> tuple[bool, datetime, int, datetime, str]:
    """Usage burns soonest-expiring credit first (never-expiring last); at equal expiry the
    lower priority first (promotional 100 < bonus 200 < purchased 300 by default), then the
    oldest. This spends the credit most at risk of being lost before the credit paid for."""
    never = grant.expires_at is None
    expires = grant.expires_at or NEVER  # never-expiring grants tie, so priority decides
    return (never, expires, grant.priority, grant.created_at, grant.grant_id)


def allocate(grants: Iterable[Grant], amount_micros: int) -> list[tuple[Grant, int]]:
    """Which grants cover `amount_micros`, in burn order; may cover less if credit runs out."""
    taken: list[tuple[Grant, int]] = []
    left = amount_micros
    for grant in sorted(grants, key=burn_order):
        if left == 0:
            break
        take = min(grant.remaining_micros, left)
        if take > 0:
            taken.append((grant, take))
            left -= take
    return taken


@dataclass(frozen=True, slots=True)
class Transfer:
    """An immutable entry: `amount_micros` leaves the debit account and enters the credit one."""

    transfer_id: str
    kind: TransferKind
    debit_account_id: str
    credit_account_id: str
    org_id: str
    amount_micros: int
    actor: str
    reason: str
    trace_id: str
    user_id: str
    labels: Mapping[str, str]
    grant_id: str
    reservation_id: str
    reverses_transfer_id: str
    payment_order_id: str
    created_at: datetime
    prev_hash: str
    entry_hash: str
    org_posted_after: int
    org_held_after: int
    org_arrears_after: int
    hash_version: int = 2
    """The canonical encoding `entry_hash` is computed with (HASH_VERSION when written)."""


HASH_VERSION: Final = 2
"""The canonical encoding new entries are chained with. Version 1 covered the money and its
audit line (ids, kind, accounts, org, amount, actor, reason, time) but not the entry's other
stored fields, which could then be rewritten unnoticed; version 2 covers every field an entry
is stored with. Migration 0006 re-chained the rows written under version 1 and kept their
version 1 chain beside it (prev_hash_v1, entry_hash_v1), so both stay verifiable."""
HASH_VERSIONS: Final = (1, 2)


def canonical_entry(
    transfer_id: str,
    kind: str,
    debit_account_id: str,
    credit_account_id: str,
    org_id: str,
    amount_micros: int,
    actor: str,
    reason: str,
    created_at: datetime | str,
    *,
    trace_id: str,
    user_id: str,
    labels: Mapping[str, str] | None,
    grant_id: str,
    reservation_id: str,
    reverses_transfer_id: str,
    payment_order_id: str,
    org_posted_after: int,
    org_held_after: int,
    org_arrears_after: int,
    version: int = HASH_VERSION,
) -> bytes:
    """The bytes an entry's hash covers under `version`. Version 2 (current): every stored
    field of the entry, as a JSON array (unambiguous whatever the strings hold; labels with
    sorted keys, as jsonb gives them back in its own order). Version 1: the first nine fields
    joined by U+001F, kept to verify entries written before version 2. (`created_at` may come
    already spelled as its isoformat(), as a batch of entries made at one instant passes it.)

    The fields after `created_at` are keyword-only and required, so a caller can never leave
    one out of the hash by accident."""
    stamp = created_at if isinstance(created_at, str) else created_at.isoformat()
    if version == 1:
        return "\x1f".join(
            [transfer_id, kind, debit_account_id, credit_account_id, org_id, str(amount_micros),
             actor, reason, stamp]
        ).encode()
    if version != 2:
        raise ValueError(f"unknown hash version {version}")
    return json.dumps(
        ["tally.ledger.entry", 2, transfer_id, kind, debit_account_id, credit_account_id,
         org_id, amount_micros, actor, reason, stamp, trace_id, user_id,
         dict(sorted((labels or {}).items())), grant_id, reservation_id, reverses_transfer_id,
         payment_order_id, org_posted_after, org_held_after, org_arrears_after],
        separators=(",", ":"),
    ).encode()


def transfer_entry(t: Transfer, version: int) -> bytes:
    """`canonical_entry` of a stored transfer under `version` (to verify it)."""
    return canonical_entry(
        t.transfer_id, t.kind.value, t.debit_account_id, t.credit_account_id, t.org_id,
        t.amount_micros, t.actor, t.reason, t.created_at, trace_id=t.trace_id,
        user_id=t.user_id, labels=t.labels, grant_id=t.grant_id,
        reservation_id=t.reservation_id, reverses_transfer_id=t.reverses_transfer_id,
        payment_order_id=t.payment_order_id, org_posted_after=t.org_posted_after,
        org_held_after=t.org_held_after, org_arrears_after=t.org_arrears_after,
        version=version)


def chain_hash(prev_hash: str, entry: bytes) -> str:
    """sha256(previous hash || entry), lowercase hex: each org's entries form a chain."""
    return hashlib.sha256(prev_hash.encode() + entry).hexdigest()


def state_seal(prev_seal: str, entry_hash: str, billing_state_after: str | None) -> str:
    """The link of an org's state chain: sha256(previous seal || the entry's hash and the
    org's billing state after it), lowercase hex.

    An entry's `org_billing_state_after` is the org's state as its whole transaction leaves it
    (the billing rules run at the end, after the entries are hashed), so the entry chain cannot
    cover it. The state chain does, once the transaction knows it (Work's flush): each link
    covers an entry's final hash and that state, and the org's last link is kept with its
    accounts (`last_seal`) as `last_hash` keeps the entry chain's. Rewriting a state, or an
    entry and its hashes, then breaks it as a rewritten entry breaks the entry chain. A state
    stored as NULL (entries written before migration 0002) is sealed as JSON null, so NULL and
    '' differ."""
    link = json.dumps(["tally.ledger.state", entry_hash, billing_state_after],
                      separators=(",", ":"))
    return hashlib.sha256(prev_seal.encode() + link.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Balance:
    """An org's credit position."""

    org_id: str
    posted_micros: int
    held_micros: int
    arrears_micros: int
    billing_state: BillingState
    grants: Sequence[Grant] = ()
    as_of: datetime | None = None
    leased_micros: int = 0  # part of held_micros kept by open credit leases
    in_flight_micros: int = 0  # what the leases' holders last reported their requests hold

    @property
    def available_micros(self) -> int:
        """What can be spent or reserved now."""
        return self.posted_micros - self.held_micros


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on credit for an in-flight request."""

    reservation_id: str
    org_id: str
    amount_micros: int
    state: ReservationState
    expires_at: datetime
    captured_micros: int
    arrears_micros: int
    capture_transfer_id: str
    created_at: datetime
    settled_at: datetime | None

    def is_expired(self, now: datetime) -> bool:
        """A HELD reservation whose ttl has passed (released by the sweeper, or on touch)."""
        return self.state is ReservationState.HELD and self.expires_at <= now


@dataclass(frozen=True, slots=True)
class UsageResult:
    """What one usage event cost the org: the receipt the ledger keeps forever."""

    event_id: str
    transfer_id: str
    debited_micros: int
    arrears_micros: int
    balance_after_micros: int
    is_duplicate: bool = False


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A balance-affecting fact published to consumers (notifier, auto-top-up)."""

    event_id: str
    sequence: int
    org_id: str
    type: OutboxEventType
    occurred_at: datetime
    trace_id: str
    available_micros_after: int
    arrears_micros: int
    billing_state: BillingState
    attributes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Result of walking the hash chains and the zero-sum invariant."""

    ok: bool
    entries_checked: int
    first_bad_transfer_id: str = ""
    detail: str = ""


# --- commands and their validation ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, for the audit fields of every entry."""

    actor: str = "service:anonymous"
    trace_id: str = ""
    user_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TransferCommand:
    """Post one transfer (the Transfer RPC, an item of TransferBatch, or Adjust)."""

    transfer_id: str
    org_id: str
    kind: TransferKind
    amount_micros: int
    reason: str = ""
    grant: GrantSpec | None = None
    reverses_transfer_id: str = ""


@dataclass(frozen=True, slots=True)
class ReserveCommand:
    """Hold credit for an in-flight request (the Reserve RPC)."""

    reservation_id: str
    org_id: str
    amount_micros: int
    ttl: timedelta
    caller: Caller

    def problems(self) -> list[FieldViolation | None]:
        return [check_id("reservation_id", self.reservation_id),
                check_id("org_id", self.org_id),
                check_amount("amount_micros", self.amount_micros)]

    def fingerprint(self) -> str:
        return fingerprint(self.org_id, self.amount_micros, self.ttl.total_seconds())


@dataclass(frozen=True, slots=True)
class UsageItem:
    """One rated usage event to debit."""

    event_id: str
    org_id: str
    cost_micros: int
    reservation_id: str = ""  # its cost-allocation labels are metering's, not the ledger's
    lease_id: str = ""  # the credit lease whose hold pays the cost first (leases.py)


@dataclass(frozen=True, slots=True)
class UsageCapture:
    """A reservation settled by one event of an org's usage debit."""

    reservation_id: str
    cost_micros: int
    cost_before_micros: int = 0  # the org's cost before this event in the batch


@dataclass(frozen=True, slots=True)
class OrgUsageDebit:
    """One org's usage in a batch: the sum of its rated events, debited as one transfer."""

    org_id: str
    amount_micros: int
    event_count: int
    events_digest: str = ""
    captures: Sequence[UsageCapture] = ()
    lease_id: str = ""  # the org's credit lease that pays first (issue 17: postings hook)


@dataclass(frozen=True, slots=True)
class OrgUsageResult:
    """What one org's usage debit did: the transfers and the org's available credit around
    it (before: after freeing the captured holds), from which each event's receipt splits."""

    org_id: str
    transfer_id: str
    arrears_transfer_id: str
    debited_micros: int
    arrears_micros: int
    available_before_micros: int
    balance_after_micros: int
    is_duplicate: bool = False


UsageResults = list[UsageResult] | list[OrgUsageResult]
"""A PostUsageBatch's answer: per item, or per org debit."""


def usage_transfer_id(batch_id: str, org_id: str) -> str:
    """The USAGE transfer of an org's debit in a batch (known to metering before it posts)."""
    return f"usage:{batch_id}:{org_id}"


def usage_arrears_transfer_id(batch_id: str, org_id: str) -> str:
    """The USAGE transfer recording the part of an org's debit credit did not cover."""
    return f"usage:{batch_id}:{org_id}:arrears"


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """One PostUsageBatch request, applied once under its id: per-event `items` (the older
    form) or one `org_debits` entry per org."""

    batch_id: str
    items: Sequence[UsageItem]
    caller: Caller
    org_debits: Sequence[OrgUsageDebit] = ()

    def fingerprint(self) -> str:
        """What a replay of the id must match (labels are annotations, not meaning)."""
        if self.org_debits:
            return fingerprint([(o.org_id, o.amount_micros, o.event_count, o.events_digest,
                                 [(c.reservation_id, c.cost_micros, c.cost_before_micros)
                                  for c in o.captures], o.lease_id) for o in self.org_debits])
        return fingerprint([(i.event_id, i.org_id, i.cost_micros, i.reservation_id)
                            for i in self.items])

    @property
    def size(self) -> int:
        """Its weight in a group commit: events or org debits."""
        return len(self.org_debits) or len(self.items)

    def audited_as(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        """The audit fields its entries carry (actor, user, labels): only batches that agree
        on them may share entries."""
        caller = self.caller
        return caller.actor, caller.user_id, tuple(sorted(caller.labels.items()))


def fingerprint(*parts: object) -> str:
    """A stable hash of a request's meaning: the same id with another fingerprint is reuse."""

    def encode(value: object) -> object:
        if hasattr(value, "__dataclass_fields__"):
            return asdict(value)  # type: ignore[call-overload]
        return value

    text = json.dumps([encode(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_id(name: str, value: str) -> FieldViolation | None:
    """A client-chosen id: 1..64 printable characters."""
    return errors.check_id(name, value, MAX_ID_LENGTH)


def check_amount(name: str, value: int, *, allow_zero: bool = False) -> FieldViolation | None:
    """A positive (or, where allowed, zero) int64 amount of micro-credits."""
    if value < 0 or (value == 0 and not allow_zero):
        return FieldViolation(name, "must be > 0" if not allow_zero else "must be >= 0")
    if value > INT64_MAX:
        return FieldViolation(name, "exceeds int64")
    return None


raise_if = errors.raise_if


def validate_transfer(cmd: TransferCommand, prefix: str = "") -> list[FieldViolation | None]:
    """Every problem of a TransferCommand, each naming its field (with `prefix`)."""
    problems = [
        check_id(f"{prefix}transfer_id", cmd.transfer_id),
        check_id(f"{prefix}org_id", cmd.org_id),
    ]
    if cmd.kind is TransferKind.REVERSAL:
        problems.append(check_id(f"{prefix}reverses_transfer_id", cmd.reverses_transfer_id))
        problems.append(check_amount(f"{prefix}amount_micros", cmd.amount_micros, allow_zero=True))
    elif cmd.kind is TransferKind.MANUAL_ADJUSTMENT:
        # signed: positive adds credit, negative removes it
        problems.append(check_amount(f"{prefix}amount_micros", abs(cmd.amount_micros)))
    else:
        problems.append(check_amount(f"{prefix}amount_micros", cmd.amount_micros))
    if cmd.grant is not None and cmd.kind in GRANT_OF_KIND and cmd.kind not in (
        TransferKind.MANUAL_ADJUSTMENT, TransferKind.REVERSAL
    ) and cmd.grant.kind is not GRANT_OF_KIND[cmd.kind]:
        problems.append(FieldViolation(f"{prefix}grant.grant_kind",
                                       f"must be {GRANT_OF_KIND[cmd.kind]} for {cmd.kind}"))
    if cmd.kind in (TransferKind.REVERSAL, TransferKind.EXPIRY, TransferKind.MANUAL_ADJUSTMENT):
        if not cmd.reason.strip():
            problems.append(FieldViolation(f"{prefix}reason", f"is required for {cmd.kind}"))
    if cmd.grant is not None and cmd.grant.priority < 0:
        problems.append(FieldViolation(f"{prefix}grant.priority", "must be >= 0"))
    return problems


def validate_client_kind(kind: TransferKind | None, name: str = "kind") -> TransferKind:
    """The kinds Transfer accepts; PURCHASE/REFUND/MANUAL_ADJUSTMENT have their own RPCs."""
    if kind is None or kind not in CLIENT_TRANSFER_KINDS:
        allowed = ", ".join(sorted(CLIENT_TRANSFER_KINDS))
        raise invalid(name, f"must be one of {allowed}")
    return kind


def validate_ttl(ttl_seconds: int) -> timedelta:
    """A reservation ttl: 0 means the default; at most MAX_RESERVATION_TTL."""
    if ttl_seconds == 0:
        return DEFAULT_RESERVATION_TTL
    if ttl_seconds < 0 or ttl_seconds > MAX_RESERVATION_TTL.total_seconds():
        raise invalid("ttl_seconds", f"must be 0..{int(MAX_RESERVATION_TTL.total_seconds())}")
    return timedelta(seconds=ttl_seconds)


def validate_usage_batch(batch_id: str, items: Sequence[UsageItem]) -> None:
    """Batch bounds and every item's fields; duplicate event ids within one batch are refused."""
    if len(items) > MAX_USAGE_BATCH:
        raise TallyError(
            Reason.BATCH_TOO_LARGE,
            f"items: {len(items)} items; at most {MAX_USAGE_BATCH} per batch",
            field="items",
        )
    if items and check_id("batch_id", batch_id) is None and _usage_items_valid(items):
        return
    problems: list[FieldViolation | None] = [check_id("batch_id", batch_id)]
    if not items:
        problems.append(FieldViolation("items", "must not be empty"))
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        problems.append(check_id(f"items[{i}].event_id", item.event_id))
        problems.append(check_id(f"items[{i}].org_id", item.org_id))
        problems.append(check_amount(f"items[{i}].cost_micros", item.cost_micros, allow_zero=True))
        if item.reservation_id:
            problems.append(check_id(f"items[{i}].reservation_id", item.reservation_id))
        key = (item.org_id, item.event_id)
        if key in seen:
            problems.append(FieldViolation(f"items[{i}].event_id", "appears twice in the batch"))
        seen.add(key)
    raise_if(problems)


MAX_DIGEST_LENGTH: Final = 128


def validate_org_debits(batch_id: str, debits: Sequence[OrgUsageDebit]) -> None:
    """Batch bounds and every org debit's fields; an org twice in one batch is refused."""
    if len(debits) > MAX_USAGE_BATCH:
        raise TallyError(
            Reason.BATCH_TOO_LARGE,
            f"org_debits: {len(debits)} orgs; at most {MAX_USAGE_BATCH} per batch",
            field="org_debits",
        )
    problems: list[FieldViolation | None] = [check_id("batch_id", batch_id)]
    seen: set[str] = set()
    for i, debit in enumerate(debits):
        at = f"org_debits[{i}]"
        org, amount = debit.org_id, debit.amount_micros
        if not (org and len(org) <= MAX_ID_LENGTH and org.isprintable()):
            problems.append(check_id(f"{at}.org_id", org))
        if not 0 <= amount <= INT64_MAX:
            problems.append(check_amount(f"{at}.amount_micros", amount, allow_zero=True))
        if debit.event_count < 1:
            problems.append(FieldViolation(f"{at}.event_count", "must be >= 1"))
        if len(debit.events_digest) > MAX_DIGEST_LENGTH:
            problems.append(FieldViolation(f"{at}.events_digest",
                                           f"at most {MAX_DIGEST_LENGTH} characters"))
        for j, capture in enumerate(debit.captures):
            problems.append(check_id(f"{at}.captures[{j}].reservation_id",
                                     capture.reservation_id))
            cost, before = capture.cost_micros, capture.cost_before_micros
            if cost < 0 or before < 0 or cost + before > amount:
                problems.append(FieldViolation(
                    f"{at}.captures[{j}].cost_micros",
                    "cost and cost_before must be >= 0 and within the org's amount"))
        if org in seen:
            problems.append(FieldViolation(f"{at}.org_id", "appears twice in the batch"))
        seen.add(org)
    if not debits:
        problems.append(FieldViolation("org_debits", "must not be empty"))
    raise_if(problems)


def _usage_items_valid(items: Sequence[UsageItem]) -> bool:
    """The common case of validate_usage_batch, without naming fields: True when every item
    is valid (the same rules as check_id and check_amount, inlined: this runs for every item
    of every batch)."""
    longest = MAX_ID_LENGTH
    keys = set()
    for item in items:
        event, org, cost, reservation = (item.event_id, item.org_id, item.cost_micros,
                                         item.reservation_id)
        if not (event and org and 0 <= cost <= INT64_MAX and len(event) <= longest
                and len(org) <= longest and event.isprintable() and org.isprintable()):
            return False
        if reservation and not (len(reservation) <= longest and reservation.isprintable()):
            return False
        keys.add((org, event))
    return len(keys) == len(items)


def insufficient(available_micros: int, needed_micros: int, field_name: str) -> TallyError:
    """INSUFFICIENT_CREDITS with the available amount in ErrorInfo metadata."""
    return TallyError(
        Reason.INSUFFICIENT_CREDITS,
        f"{field_name}: {needed_micros} micro-credits needed, {available_micros} available",
        metadata={"available_micros": str(available_micros), "needed_micros": str(needed_micros)},
    )


def reused(key: str) -> TallyError:
    """The same client id with a different payload."""
    return TallyError(
        Reason.IDEMPOTENCY_KEY_REUSED,
        f"{key} was already used for a different request",
        metadata={"key": key},
    )


def split_debit(available_micros: int, cost_micros: int) -> tuple[int, int]:
    """Usage already happened, so it is never refused: what credit covers, and the arrears."""
    debited = min(max(available_micros, 0), cost_micros)
    return debited, cost_micros - debited
