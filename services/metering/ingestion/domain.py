"""The rules of usage ingestion, in plain Python: what a valid event is, how it is rated, what
its receipt says. No grpc, no SQL: the store persists, the committer orchestrates.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Final

from tally.kit.errors import Reason
from tally.rating import (
    Meter,
    PriceBook,
    PriceBookHistory,
    RatingError,
    UsageMode,
    rate_lines,
)

MAX_EVENT_AGE: Final = timedelta(days=35)
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)
MAX_ID_LENGTH: Final = 64
MAX_QUANTITIES: Final = 20
MAX_LABELS: Final = 32
MAX_CONTENT_HASHES: Final = 16
MAX_RECORD_EVENTS: Final = 100
MAX_STREAM_BATCH_EVENTS: Final = 1000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class EventStatus(enum.StrEnum):
    """Outcome of one event (proto EventStatus)."""

    ACCEPTED = "ACCEPTED"
    DUPLICATE = "DUPLICATE"
    REJECTED = "REJECTED"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What ties a charge to the model call — identifiers and hashes, never content."""

    request_id: str = ""
    upstream_request_id: str = ""
    trace_id: str = ""
    content_hashes: tuple[str, ...] = ()


# The per-event types below (UsageEvent, ReceiptLine, Receipt, EventResult, RatedEvent) are
# not frozen: a frozen dataclass sets each field through object.__setattr__, 0.2-0.4 us a
# field, and an event makes about 50 field sets on the ack path (a fifth of metering's CPU per
# event in bench.ingest). Treat them as values all the same: build new ones (`replace`), never
# assign to a field.
@dataclass(slots=True)
class UsageEvent:
    """One metered request, as reported by the caller."""

    event_id: str
    org_id: str
    occurred_at: datetime | None
    quantities: tuple[tuple[Meter | None, int], ...]
    model: str = ""
    provider: str = ""
    operation: str = ""
    mode: UsageMode = UsageMode.ONLINE
    region: str = ""
    reservation_id: str = ""
    project_id: str = ""
    environment: str = ""
    user_id: str = ""
    api_key_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    evidence: Evidence = Evidence()

    def fingerprint(self) -> str:
        """Hash of the event's meaning: the same id with another fingerprint is key reuse.

        A 128-bit BLAKE2b of the repr of its fields (quantities and labels sorted): repr of
        strings and ints is unambiguous and the same in every process, and far cheaper than
        JSON; events recorded before carry `legacy_fingerprint` (see `has_fingerprint`). The
        ack path stores none: a replay compares with the stored event's (see the store)."""
        return hashlib.blake2b(repr((
            self.org_id, self.occurred_at.isoformat() if self.occurred_at else "",
            sorted((m.value if m else "", q) for m, q in self.quantities), self.model,
            self.provider, self.operation, self.mode.value, self.region, self.reservation_id,
            self.project_id, self.environment, self.user_id, self.api_key_id,
            sorted(self.labels.items()))).encode(), digest_size=16).hexdigest()

    def has_fingerprint(self, stored: str) -> bool:
        """Whether a stored fingerprint is this event's (of either form)."""
        if len(stored) == 64:
            return stored == self.legacy_fingerprint()
        return stored == self.fingerprint()

    def legacy_fingerprint(self) -> str:
        """The SHA-256-over-JSON fingerprint of events recorded before the BLAKE2b one."""
        body = [self.org_id, self.occurred_at.isoformat() if self.occurred_at else "",
                sorted((m.value if m else "", q) for m, q in self.quantities), self.model,
                self.provider, self.operation, self.mode.value, self.region,
                self.reservation_id, self.project_id, self.environment, self.user_id,
                self.api_key_id, sorted(self.labels.items())]
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()


@dataclass(slots=True)
class ReceiptLine:
    """One priced meter of a receipt."""

    meter: Meter
    quantity: int
    rate: str
    per_units: int
    cost_micros: int


@dataclass(slots=True)
class Receipt:
    """What an event cost and what it did to the balance."""

    event_id: str
    cost_micros: int
    price_book_version: int
    resolved_model: str
    lines: tuple[ReceiptLine, ...]
    ledger_transfer_id: str = ""
    balance_after_micros: int = 0
    arrears_micros: int = 0
    recorded_at: datetime | None = None


@dataclass(slots=True)
class EventResult:
    """The answer for one event, in the position of the event in its batch."""

    event_id: str
    status: EventStatus
    receipt: Receipt | None = None
    reason: str = ""
    field: str = ""
    message: str = ""


def rejected(event_id: str, reason: Reason, field_name: str, message: str) -> EventResult:
    """A REJECTED result naming the offending field."""
    return EventResult(event_id, EventStatus.REJECTED, None, reason.value, field_name,
                       f"{field_name}: {message}")


# Each text field of an event and its path in the wire UsageEvent.
_TEXT_FIELDS: Final = (
    ("event_id", "event_id"), ("org_id", "context.org_id"), ("model", "model"),
    ("provider", "provider"), ("region", "region"), ("reservation_id", "reservation_id"),
    ("project_id", "context.project_id"), ("environment", "context.environment"),
    ("user_id", "context.user_id"), ("api_key_id", "context.api_key_id"))
_EVIDENCE_FIELDS: Final = ("request_id", "upstream_request_id", "trace_id")


def _field_with_nul(event: UsageEvent) -> str:
    """The wire path of the first text field holding a NUL character, or ""."""
    for name, path in _TEXT_FIELDS:
        if "\x00" in getattr(event, name):
            return path
    for key, value in event.labels.items():
        if "\x00" in key or "\x00" in value:
            return "context.labels"
    for name in _EVIDENCE_FIELDS:
        if "\x00" in getattr(event.evidence, name):
            return f"evidence.{name}"
    for i, digest in enumerate(event.evidence.content_hashes):
        if "\x00" in digest:
            return f"evidence.content_hashes[{i}]"
    return ""


def check_event(event: UsageEvent, now: datetime) -> EventResult | None:
    """The first problem of an event's own fields, or None (rating checks model and meters)."""
    def bad(field_name: str, message: str, reason: Reason = Reason.INVALID_ARGUMENT
            ) -> EventResult:
        return rejected(event.event_id, reason, field_name, message)

    nul = _field_with_nul(event)
    if nul:  # PostgreSQL cannot store one: this event alone is refused, not its whole call
        return bad(nul, "contains a NUL character")
    if not event.event_id or len(event.event_id) > MAX_ID_LENGTH:
        return bad("event_id", f"must be 1..{MAX_ID_LENGTH} characters")
    if not event.org_id or len(event.org_id) > MAX_ID_LENGTH:
        return bad("context.org_id", f"must be 1..{MAX_ID_LENGTH} characters")
    if event.occurred_at is None:
        return bad("occurred_at", "is required")
    if event.occurred_at < now - MAX_EVENT_AGE:
        return bad("occurred_at", f"is older than {MAX_EVENT_AGE.days} days", Reason.EVENT_TOO_OLD)
    if event.occurred_at > now + MAX_CLOCK_SKEW:
        return bad("occurred_at", "is more than 5 minutes in the future", Reason.EVENT_IN_FUTURE)
    if not event.quantities or len(event.quantities) > MAX_QUANTITIES:
        return bad("quantities", f"must have 1..{MAX_QUANTITIES} entries")
    seen: set[Meter] = set()
    for i, (meter, quantity) in enumerate(event.quantities):
        if meter is None:
            return bad(f"quantities[{i}].meter", "is not a known meter", Reason.UNKNOWN_METER)
        if meter in seen:
            return bad(f"quantities[{i}].meter", f"{meter} appears twice")
        seen.add(meter)
        if quantity < 0:
            return bad(f"quantities[{i}].quantity", "must be >= 0")
    if len(event.labels) > MAX_LABELS:
        return bad("context.labels", f"at most {MAX_LABELS} labels")
    if len(event.evidence.content_hashes) > MAX_CONTENT_HASHES:
        return bad("evidence.content_hashes", f"at most {MAX_CONTENT_HASHES}")
    for i, digest in enumerate(event.evidence.content_hashes):
        if not _HEX64.match(digest):
            return bad(f"evidence.content_hashes[{i}]", "must be a lowercase hex SHA-256")
    return None


@dataclass(slots=True)
class RatedEvent:
    """An event with its price: what is stored and debited."""

    event: UsageEvent
    receipt: Receipt


def rate_event(history: PriceBookHistory, event: UsageEvent, carry_attos: int,
               prior: Mapping[str, int] | None = None, book: PriceBook | None = None
               ) -> tuple[RatedEvent | EventResult, int]:
    """Rates with the book in force at the event's time (`book`, when the caller looked it up
    already); carries the sub-micro remainder.

    Returns the rated event (or a REJECTED result: unknown model, no price) and the new carry.
    """
    assert event.occurred_at is not None
    try:
        if book is None:
            book = history.book_at(event.occurred_at)
        quantities = {m: q for m, q in event.quantities if m is not None}
        total, carry, resolved, priced = rate_lines(
            book, event.model, event.mode, event.region, quantities, prior, carry_attos)
    except RatingError as exc:
        # rating's reasons are spelled like the kit's (UNKNOWN_MODEL, PRICE_NOT_FOUND, ...)
        return rejected(event.event_id, Reason(exc.reason.value), exc.field or "quantities",
                        exc.message), carry_attos
    lines = tuple(ReceiptLine(meter, quantity, _rate_text(rate), per_units, cost)
                  for meter, quantity, rate, per_units, cost in priced)
    version = int(book.version) if book.version.isdigit() else 0
    receipt = Receipt(event.event_id, total, version, resolved, lines)
    return RatedEvent(event, receipt), carry


# id -> (the rate, its text): by identity, as equal Decimals can print differently ("2" and
# "2.0"); holding the rate keeps its id from being reused
_RATE_TEXTS: dict[int, tuple[Decimal, str]] = {}


def _rate_text(rate: Decimal) -> str:
    """str(rate), remembered: a book's rates are a few objects that every receipt repeats."""
    known = _RATE_TEXTS.get(id(rate))
    if known is not None and known[0] is rate:
        return known[1]
    if len(_RATE_TEXTS) > 10_000:  # books come and go; keep it bounded
        _RATE_TEXTS.clear()
    text = str(rate)
    _RATE_TEXTS[id(rate)] = (rate, text)
    return text


ALL_MODELS: Final = "*"
"""The month-to-date usage key of a line that prices a meter for every model."""


class PeriodKeys:
    """Which month-to-date usage an event's rating needs: for each line of its (book, model,
    mode) whose price depends on the units used before it this month (allowances, tiers), the
    line and the usage key it counts against — (model, or ALL_MODELS for a line of every
    model; meter). Flat lines need none, so usage of their meters is not tracked; memoized
    per (book version, model, mode), as books are immutable."""

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        self._memo: dict[tuple[str, str, UsageMode], dict[Meter, tuple[str, str]]] = {}

    def of(self, book: PriceBook, model: str, mode: UsageMode) -> dict[Meter, tuple[str, str]]:
        """meter -> (line id, key model) of each line of `model` in `mode` that counts usage."""
        key = (book.version, model, mode)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = {}
            try:
                resolved = book.resolve_model(model).model if model else ""
            except RatingError:  # rating rejects the event: nothing to count
                return found
            for meter in Meter:
                line = book.find_line(resolved, meter, mode)
                if line is not None and line.counts_period_usage:
                    found[meter] = (line.line_id, resolved if line.model else ALL_MODELS)
        return found

    def needed(self, book: PriceBook, event: UsageEvent) -> list[tuple[Meter, str, str]]:
        """(meter, line id, key model) of the event's reported meters that count usage."""
        lines = self.of(book, event.model, event.mode)
        if not lines:
            return []
        return [(m, *lines[m]) for m, _ in event.quantities if m is not None and m in lines]


@dataclass(frozen=True, slots=True)
class Capture:
    """A reservation an event settles, placed in its org's debit."""

    reservation_id: str
    cost_micros: int
    cost_before_micros: int  # the org's cost before this event in the batch


@dataclass(frozen=True, slots=True)
class OrgDebit:
    """One org's usage in a ledger batch: what metering asks the ledger to charge (the
    contract with the ledger's PostUsageBatch org_debits)."""

    org_id: str
    amount_micros: int
    event_count: int
    events_digest: str
    captures: tuple[Capture, ...] = ()
    lease_id: str = ""  # the org's credit lease that pays first (issue 17)


@dataclass(frozen=True, slots=True)
class OrgOutcome:
    """What the ledger answered for one org's debit: its transfers and the org's available
    credit before it, from which each event's receipt is split (`receipt_share`)."""

    org_id: str
    transfer_id: str
    arrears_transfer_id: str
    available_before_micros: int


def org_debits(events: Sequence[tuple[str, str, int, str]]
               ) -> tuple[list[OrgDebit], list[int]]:
    """The per-org debits of a batch's (org, event id, cost, reservation id) in order, and
    each event's cost_before: what its org's events before it in the batch cost."""
    totals: dict[str, int] = {}
    counts: dict[str, int] = {}
    ids: dict[str, list[str]] = {}
    captures: dict[str, list[Capture]] = {}
    before: list[int] = []
    for org, event_id, cost, reservation_id in events:
        so_far = totals.get(org, 0)
        before.append(so_far)
        totals[org] = so_far + cost
        counts[org] = counts.get(org, 0) + 1
        ids.setdefault(org, []).append(event_id)
        if reservation_id:
            captures.setdefault(org, []).append(Capture(reservation_id, cost, so_far))
    debits = [OrgDebit(org, totals[org], counts[org],
                       hashlib.sha256("\n".join(ids[org]).encode()).hexdigest(),
                       tuple(captures.get(org, ()))) for org in totals]
    return debits, before


def receipt_share(outcome: OrgOutcome, cost_before: int, cost: int) -> tuple[str, int, int]:
    """One event's part of its org's debit, as the ledger splits it in order: (the transfer
    carrying it, the org's available credit after it, its arrears)."""
    available = outcome.available_before_micros
    covered = max(available, 0)
    paid_before = min(covered, cost_before)
    paid = min(covered - paid_before, cost)
    owed = cost - paid
    transfer = outcome.transfer_id if paid else outcome.arrears_transfer_id if owed else ""
    return transfer, available - paid_before - paid, owed


def settled(receipt: Receipt, outcome: OrgOutcome, cost_before: int,
            recorded_at: datetime | None) -> Receipt:
    """A receipt completed with its share of the org's debit."""
    transfer, balance_after, arrears = receipt_share(outcome, cost_before, receipt.cost_micros)
    return Receipt(receipt.event_id, receipt.cost_micros, receipt.price_book_version,
                   receipt.resolved_model, receipt.lines, transfer, balance_after, arrears,
                   recorded_at)


def first_of_each(events: Sequence[UsageEvent]) -> dict[tuple[str, str], int]:
    """Index of the first occurrence of each (org, event id) in a batch."""
    first: dict[tuple[str, str], int] = {}
    for i, event in enumerate(events):
        first.setdefault((event.org_id, event.event_id), i)
    return first
