"""Re-rating past usage under a draft price book (pricing's `SimulatePriceChange`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from .engine import rate_total
from .errors import RatingError
from .model import Meter, PriceBook, PriceBookHistory, UsageMode


class SimulationRecord(NamedTuple):
    """One past usage event and what it was charged."""

    org_id: str
    occurred_at: datetime
    model: str
    mode: UsageMode
    region: str
    quantities: Mapping[Meter, int]
    charged_micros: int


@dataclass(frozen=True, slots=True)
class OrgDelta:
    """One org's usage re-rated.

    `current_micros` re-rates with the books that were in force (it should equal
    `charged_micros`; a difference means the recorded charges drifted), `draft_micros` with
    the draft. `delta_micros` = draft - charged: positive means the org would pay more.
    Events either book cannot price are counted in `unrated_events` and left out of every sum.
    """

    org_id: str
    events: int
    unrated_events: int
    charged_micros: int
    current_micros: int
    draft_micros: int

    @property
    def delta_micros(self) -> int:
        """What the draft would charge minus what was charged."""
        return self.draft_micros - self.charged_micros


class _Side:
    """Rating state for one side of the comparison: period usage per line, carry per org."""

    def __init__(self) -> None:
        self.usage: dict[tuple[str, int, int], dict[str, int]] = {}
        self.carry: dict[str, int] = {}

    def rate(self, book: PriceBook, record: SimulationRecord) -> tuple[int, int]:
        """(cost, new carry) for `record`; pure, so a refused record changes nothing."""
        return rate_total(
            book,
            record.model,
            record.mode,
            record.region,
            record.quantities,
            self.usage.get(_period(record)),
            self.carry.get(record.org_id, 0),
        )

    def commit(self, book: PriceBook, record: SimulationRecord, carry: int) -> None:
        self.carry[record.org_id] = carry
        usage = self.usage.setdefault(_period(record), {})
        resolved = book.resolve_model(record.model).model if record.model else ""
        for meter, quantity in record.quantities.items():
            line = book.find_line(resolved, Meter(meter), UsageMode(record.mode))
            if line is not None:
                usage[line.line_id] = usage.get(line.line_id, 0) + quantity


def _period(record: SimulationRecord) -> tuple[str, int, int]:
    at = record.occurred_at.astimezone(UTC)
    return (record.org_id, at.year, at.month)  # calendar-month periods, UTC


def simulate(
    records: Iterable[SimulationRecord],
    current_history: PriceBookHistory,
    draft_book: PriceBook,
) -> dict[str, OrgDelta]:
    """Per-org totals of `records` (in the order given, oldest first) charged vs re-rated.

    Each side keeps its own per-line period usage (calendar months in UTC) for allowances and
    tiers, and its own per-org carry, exactly as metering would have. The draft prices every
    record, whatever its timestamp: "what if this book had been in force".
    """
    current, draft = _Side(), _Side()
    totals: dict[str, list[int]] = {}
    for raw in records:
        record = SimulationRecord(*raw)
        row = totals.setdefault(record.org_id, [0, 0, 0, 0, 0])
        try:
            book = current_history.book_at(record.occurred_at)
            current_cost, current_carry = current.rate(book, record)
            draft_cost, draft_carry = draft.rate(draft_book, record)
        except RatingError:
            row[1] += 1
            continue
        current.commit(book, record, current_carry)
        draft.commit(draft_book, record, draft_carry)
        row[0] += 1
        row[2] += record.charged_micros
        row[3] += current_cost
        row[4] += draft_cost
    return {
        org_id: OrgDelta(org_id, row[0], row[1], row[2], row[3], row[4])
        for org_id, row in totals.items()
    }
