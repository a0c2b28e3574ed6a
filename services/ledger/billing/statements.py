"""Monthly statements and daily snapshots, in plain Python: an org's credit over a period, from
the ledger's immutable entries, to the micro-credit.

The ledger keeps two balances per org: posted credit (account `org:<org>`) and what the org
owes (account `arrears:<org>`, balance = minus the arrears). Every entry of an org moves one of
them or both, so over any period

    opening posted + sum of the movements of `org:<org>` = closing posted
    opening arrears + usage beyond credit - arrears settled = closing arrears

hold exactly, and `fold` checks both before anything is shown. Positions are sums of entries
(never the balance-after columns of a single entry, which a transaction that started before
the boundary but committed after it would misplace).

A period is final once `SETTLE_MARGIN` has passed after its end: by then every transaction
stamped inside it has committed (ledger transactions last milliseconds; the margin is three
orders of magnitude more), so its entries never change again, and a final statement is stored
the first time it is computed and served as stored from then on.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Final, Protocol

from services.ledger import domain as d
from tally.kit.errors import Reason, TallyError, invalid

SETTLE_MARGIN: Final = timedelta(minutes=15)
"""How long after a period's end its entries are taken as complete (final)."""
MAX_SNAPSHOT_DAYS: Final = 400
"""Most days one ListDailySnapshots may ask for."""
MAX_STATEMENT_PAGE: Final = 120
DEFAULT_STATEMENT_PAGE: Final = 12


class Category(enum.StrEnum):
    """A statement line: where a movement of an org's posted credit comes from."""

    PURCHASES = "PURCHASES"
    BONUSES = "BONUSES"
    GRANTS = "GRANTS"
    USAGE = "USAGE"
    ARREARS_SETTLED = "ARREARS_SETTLED"
    REFUNDS = "REFUNDS"
    ADJUSTMENTS = "ADJUSTMENTS"
    EXPIRATIONS = "EXPIRATIONS"
    REVERSALS = "REVERSALS"


DESCRIPTION: Final[Mapping[Category, str]] = {
    Category.PURCHASES: "Credit bought (paid orders)",
    Category.BONUSES: "Bonus credit with packages",
    Category.GRANTS: "Promotional grants",
    Category.USAGE: "Usage paid from credit",
    Category.ARREARS_SETTLED: "Arrears paid from new credit",
    Category.REFUNDS: "Credit reversed by refunds",
    Category.ADJUSTMENTS: "Manual adjustments",
    Category.EXPIRATIONS: "Expired credit",
    Category.REVERSALS: "Reversals of entries",
}

_CATEGORY_OF_KIND: Final[Mapping[d.TransferKind, Category]] = {
    d.TransferKind.PURCHASE: Category.PURCHASES,
    d.TransferKind.BONUS: Category.BONUSES,
    d.TransferKind.PROMOTIONAL_GRANT: Category.GRANTS,
    d.TransferKind.USAGE: Category.USAGE,
    d.TransferKind.REFUND: Category.REFUNDS,
    d.TransferKind.MANUAL_ADJUSTMENT: Category.ADJUSTMENTS,
    d.TransferKind.EXPIRY: Category.EXPIRATIONS,
    d.TransferKind.REVERSAL: Category.REVERSALS,
}


@dataclass(frozen=True, slots=True)
class EntrySum:
    """The entries of one kind and direction in a period (a GROUP BY row): which of the org's
    two accounts they leave or enter, how many, how much."""

    kind: d.TransferKind
    from_credit: bool
    to_credit: bool
    from_arrears: bool
    to_arrears: bool
    entry_count: int
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Position:
    """An org's posted credit and arrears at an instant (sums of its entries before it)."""

    posted_micros: int = 0
    arrears_micros: int = 0


@dataclass(frozen=True, slots=True)
class Line:
    """One category of a statement: signed change of posted credit, and its entries."""

    category: Category
    amount_micros: int
    entry_count: int

    @property
    def description(self) -> str:
        return DESCRIPTION[self.category]


@dataclass(frozen=True, slots=True)
class Movements:
    """What a period's entries did to an org's two balances."""

    lines: list[Line]
    usage_arrears_micros: int
    arrears_settled_micros: int
    entry_count: int

    def line(self, category: Category) -> Line:
        return next(x for x in self.lines if x.category is category)

    @property
    def posted_change_micros(self) -> int:
        return sum(x.amount_micros for x in self.lines)

    @property
    def arrears_change_micros(self) -> int:
        return self.usage_arrears_micros - self.arrears_settled_micros

    @property
    def usage_total_micros(self) -> int:
        """Usage of the period: what credit paid plus what became arrears."""
        return -self.line(Category.USAGE).amount_micros + self.usage_arrears_micros


def fold(sums: Iterable[EntrySum]) -> Movements:
    """The statement lines of a period's entry sums. A USAGE entry from the org's credit to its
    arrears account settles arrears (ARREARS_SETTLED), not usage: counting it as usage would
    charge the same usage twice (once as arrears, once when paid)."""
    amounts = {c: 0 for c in Category}
    counts = {c: 0 for c in Category}
    usage_arrears = settled = entries = 0
    for s in sums:
        entries += s.entry_count
        category = _CATEGORY_OF_KIND[s.kind]
        if s.from_credit and s.to_arrears:
            category = Category.ARREARS_SETTLED
        if s.to_credit:
            amounts[category] += s.amount_micros
        if s.from_credit:
            amounts[category] -= s.amount_micros
        if s.to_credit or s.from_credit:
            counts[category] += s.entry_count
        if s.from_arrears:
            usage_arrears += s.amount_micros
        if s.to_arrears:
            settled += s.amount_micros
    return Movements([Line(c, amounts[c], counts[c]) for c in Category], usage_arrears,
                     settled, entries)


def moved(position: Position, movements: Movements) -> Position:
    """The position after a period's movements."""
    return Position(position.posted_micros + movements.posted_change_micros,
                    position.arrears_micros + movements.arrears_change_micros)


# -- months and days -------------------------------------------------------------------------

_MONTH: Final = re.compile(r"^(\d{4})-(\d{2})$")
_DAY: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_month(text: str, now: datetime, name: str = "month") -> date:
    """The first day of month `YYYY-MM`; INVALID_ARGUMENT naming `name` when malformed or
    after the current month."""
    found = _MONTH.match(text)
    if not found or not 1 <= int(found[2]) <= 12 or int(found[1]) < 1970:
        raise invalid(name, f"must be a month as YYYY-MM, got {text!r}")
    first = date(int(found[1]), int(found[2]), 1)
    if first > now.astimezone(UTC).date():
        raise invalid(name, f"{text} has not begun yet")
    return first


def parse_day(text: str, name: str) -> date:
    """A day `YYYY-MM-DD`; INVALID_ARGUMENT naming `name` when malformed."""
    try:
        if not _DAY.match(text):
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise invalid(name, f"must be a day as YYYY-MM-DD, got {text!r}") from None


def check_day_range(first: date, last: date) -> None:
    """At most MAX_SNAPSHOT_DAYS days, in order."""
    if last < first:
        raise invalid("to_day", "must not be before from_day")
    if (last - first).days >= MAX_SNAPSHOT_DAYS:
        raise invalid("to_day", f"at most {MAX_SNAPSHOT_DAYS} days after from_day")


def start_of(day: date) -> datetime:
    """Midnight UTC at the start of `day`."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def previous_month(first: date) -> date:
    return date(first.year - (first.month == 1), (first.month - 2) % 12 + 1, 1)


def month_text(first: date) -> str:
    return f"{first.year:04d}-{first.month:02d}"


def is_final(period_end: datetime, now: datetime) -> bool:
    """Whether a period's entries are complete (SETTLE_MARGIN after its end)."""
    return now >= period_end + SETTLE_MARGIN


def last_final_day(now: datetime) -> date:
    """The newest day whose end is at least SETTLE_MARGIN ago."""
    return (now - SETTLE_MARGIN).astimezone(UTC).date() - timedelta(days=1)


# -- usage by meter, model, project and label (metering's, for the ledger's batches) ---------


class UsageUnavailable(Exception):
    """Metering could not be asked (not configured, unreachable): no itemized usage."""


@dataclass(frozen=True, slots=True)
class BatchCharge:
    """One usage batch of one org: what one side says it charged, micro-credits."""

    batch_id: str
    credits_micros: int
    event_count: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Credits charged for one value of one dimension ("meter", "model", "project",
    "label" with "key=value")."""

    dimension: str
    value: str
    credits_micros: int
    event_count: int


@dataclass(frozen=True, slots=True)
class BatchUsage:
    """Metering's events of some of an org's usage batches: per batch, and broken down."""

    batches: list[BatchCharge]
    breakdown: list[UsageRow]


class UsageItemizer(Protocol):
    """Metering's side (GetBatchUsage): metering owns usage events; the ledger only knows
    each batch's debit per org. Raises UsageUnavailable when metering cannot be asked."""

    async def batch_usage(self, org_id: str, batch_ids: list[str]) -> BatchUsage:
        ...


class NoItemizer:
    """A ledger without metering: nothing is itemized."""

    async def batch_usage(self, org_id: str, batch_ids: list[str]) -> BatchUsage:
        raise UsageUnavailable("metering is not configured")


ITEMIZED_DIMENSIONS: Final = ("meter", "model", "project")
"""Dimensions whose rows add up to the itemized usage (an event has one value of each)."""


@dataclass(frozen=True, slots=True)
class UsageItems:
    """A statement's usage breakdown: `itemized_micros` is the ledger's debits (credit +
    arrears) of the org's usage batches in the period, `rows` metering's events of exactly
    those batches."""

    itemized_micros: int
    rows: list[UsageRow]


def batch_mismatches(ledger: list[BatchCharge], metering: list[BatchCharge]
                     ) -> list[tuple[str, int, int | None]]:
    """(batch, ledger's debit, metering's charges or None when it has no event of it) for
    every batch where the two differ, in the ledger's order."""
    found = {b.batch_id: b.credits_micros for b in metering}
    return [(b.batch_id, b.credits_micros, found.get(b.batch_id)) for b in ledger
            if found.get(b.batch_id) != b.credits_micros]


def usage_items(ledger: list[BatchCharge], metering: BatchUsage) -> UsageItems | None:
    """The breakdown when metering's events agree with the ledger's debits batch by batch and
    each itemized dimension adds up to them; None when they do not (Reconcile names the
    batches)."""
    total = sum(b.credits_micros for b in ledger)
    if batch_mismatches(ledger, metering.batches):
        return None
    for dimension in ITEMIZED_DIMENSIONS:
        if sum(r.credits_micros for r in metering.breakdown
               if r.dimension == dimension) != total:
            return None
    return UsageItems(total, list(metering.breakdown))


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    """An org's statement of one month (proto Statement)."""

    org_id: str
    month: date
    is_final: bool
    generated_at: datetime
    opening: Position
    movements: Movements
    closing: Position
    usage: UsageItems | None = None
    """Usage by meter, model, project and label; None when metering could not itemize it."""

    @property
    def usage_not_itemized_micros(self) -> int:
        """Usage of the period posted without metering's events (captures, per-event items)."""
        return self.movements.usage_total_micros - (self.usage.itemized_micros
                                                    if self.usage else 0)

    @property
    def period_start(self) -> datetime:
        return start_of(self.month)

    @property
    def period_end(self) -> datetime:
        return start_of(next_month(self.month))


def statement(org_id: str, month: date, opening: Position, movements: Movements,
              now: datetime) -> Statement:
    """The statement of a month whose opening and movements were read from the ledger."""
    end = start_of(next_month(month))
    return Statement(org_id, month, is_final(end, now), now, opening, movements,
                     moved(opening, movements))


def check_closing(s: Statement, closing: Position) -> None:
    """The statement's closing position is the ledger's (summed independently); anything
    else is a bug, never shown to a customer."""
    if s.closing != closing:
        raise TallyError(Reason.INTERNAL,
                         f"statement {s.org_id} {month_text(s.month)} does not reconcile: "
                         f"opening + movements = {s.closing}, ledger says {closing}")


@dataclass(frozen=True, slots=True)
class DailySnapshot:
    """An org's position at the end of one UTC day (proto DailySnapshot)."""

    org_id: str
    day: date
    posted_micros: int
    held_micros: int
    arrears_micros: int
    billing_state: str
    credits_bought_micros: int
    usage_micros: int
    net_change_micros: int
    written_at: datetime
    grants_by_expiry_micros: dict[str, int] = field(default_factory=dict)

    @property
    def available_micros(self) -> int:
        return self.posted_micros - self.held_micros
