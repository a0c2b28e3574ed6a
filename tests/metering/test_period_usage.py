"""Month-to-date usage for tiers and allowances: tracked only for lines whose price depends on
it, counted from the recorded events when a line first needs it (a book that turns a flat
line into tiers mid-month), and exact across group commits, late events and duplicates."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from services.metering.ingestion import domain as ing
from services.metering.ingestion.store import UsageEventStore
from tally.kit import db
from tally.rating import Meter, PriceBookHistory, PriceLine, UsageMode, rate_with_carry_attos
from tests.rating.books import T0, book, flat

MID_MARCH = datetime(2026, 3, 15, tzinfo=UTC)
# Book a prices storage and reads flat, so nothing is tracked while it is in force; book b
# (from mid-March) prices storage in graduated tiers and reads with a monthly allowance.
FLAT = book("a", T0, lines=(PriceLine("flat-storage", Meter.STORAGE_GB_HOURS, flat("3")),
                            PriceLine("flat-reads", Meter.EMBEDDING_READS, flat("1"))))
HISTORY = PriceBookHistory([FLAT, book("b", MID_MARCH)])


def _event(i: int, org: str, at: datetime, rng: random.Random) -> ing.UsageEvent:
    return ing.UsageEvent(
        event_id=f"e-{i}", org_id=org, occurred_at=at,
        quantities=((Meter.STORAGE_GB_HOURS, rng.randint(1, 300)),
                    (Meter.EMBEDDING_READS, rng.randint(0, 400))))


def _expected(events: list[ing.UsageEvent]) -> list[int]:
    """Each event's cost rated one by one in arrival order, with every earlier event of its
    org and month counted (the rule, without any tracking shortcut)."""
    used: dict[tuple[str, str, Meter], int] = {}
    carry: dict[str, int] = {}
    costs = []
    for e in events:
        assert e.occurred_at is not None
        month = e.occurred_at.strftime("%Y-%m")
        price_book = HISTORY.book_at(e.occurred_at)
        prior = {}
        for meter, _ in e.quantities:
            assert meter is not None
            line = price_book.find_line("", meter, UsageMode.ONLINE)
            assert line is not None
            prior[line.line_id] = used.get((e.org_id, month, meter), 0)
        quote, carry[e.org_id] = rate_with_carry_attos(
            price_book, "", UsageMode.ONLINE, "", dict(e.quantities), prior,  # type: ignore[arg-type]
            carry.get(e.org_id, 0))
        costs.append(quote.total_micros)
        for meter, quantity in e.quantities:
            assert meter is not None
            used[(e.org_id, month, meter)] = used.get((e.org_id, month, meter), 0) + quantity
    return costs


async def test_tiers_count_usage_from_before_they_took_effect_across_commits(
        db_url: str) -> None:
    rng = random.Random(7)
    # book a's March events arrive first, recorded before anything tracks their usage
    times = [MID_MARCH - timedelta(days=d, hours=1) for d in range(1, 8)] * 2
    later = ([MID_MARCH + timedelta(hours=h) for h in range(1, 20)]  # book b
             + [MID_MARCH - timedelta(days=2), MID_MARCH - timedelta(days=20)]) * 2
    rng.shuffle(later)  # with one more book a event and a late February one among them
    events = [_event(i, ("o1", "o2")[i % 2], at, rng) for i, at in enumerate(times + later)]
    pool = await db.create_pool(db_url, max_size=2)
    try:
        store = UsageEventStore(pool)
        costs = []
        for start in range(0, len(events), 5):  # a group commit per 5 events
            recorded = await store.record(f"b-{start}", events[start:start + 5], HISTORY)
            assert all(r is None for r in recorded.results)
            costs += [r.receipt.cost_micros for r in recorded.new_events]
        assert costs == _expected(events)
        # the month's usage so far changed prices (rated alone, the events cost otherwise)
        assert costs != [_expected([e])[0] for e in events]

        again = await store.record("b-again", events[:5], HISTORY)
        assert [r.status for r in again.results if r] == [ing.EventStatus.DUPLICATE] * 5
        usage = {(r["org_id"], r["month"].isoformat(), r["meter"]): r["quantity"]
                 for r in await pool.fetch("SELECT * FROM metering.period_usage")}
        march = {(e.org_id, e.occurred_at.strftime("%Y-%m"), m.value): 0  # type: ignore[union-attr]
                 for e in events for m, _ in e.quantities if m}
        for e in events:
            assert e.occurred_at is not None
            if e.occurred_at.month == 3:
                for m, q in e.quantities:
                    assert m is not None
                    march[(e.org_id, "2026-03", m.value)] += q
        # only March is tracked (book b's lines need it), and exactly; February is not
        assert usage == {(o, "2026-03-01", m): q for (o, month, m), q in march.items()
                         if month == "2026-03"}
    finally:
        await pool.close()
