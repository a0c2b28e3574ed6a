"""Re-rating past usage under a draft book."""

from __future__ import annotations

from datetime import timedelta

from tally.rating import (
    Meter,
    PriceBook,
    PriceBookHistory,
    PriceLine,
    SimulationRecord,
    UsageMode,
    rate,
    simulate,
)

from .books import T0, book, flat

ONLINE = UsageMode.ONLINE


def draft_doubling_input() -> PriceBook:
    lines = tuple(
        PriceLine(line.line_id, line.meter, flat("6"), model=line.model, per_units=line.per_units)
        if line.line_id == "chat-1/in"
        else line
        for line in book().lines
    )
    return book("draft", T0 + timedelta(days=60), lines=lines)


def test_simulate_reports_per_org_charged_current_and_draft_totals() -> None:
    current = PriceBookHistory([book()])
    usage = {Meter.INPUT_TOKENS: 10**6}
    charged = rate(book(), "chat", ONLINE, "", usage).total_micros
    records = [
        SimulationRecord("org-a", T0 + timedelta(hours=1), "chat", ONLINE, "", usage, charged),
        ("org-a", T0 + timedelta(hours=2), "chat", ONLINE, "", usage, charged),
        ("org-b", T0 + timedelta(hours=3), "chat", ONLINE, "", {Meter.CALLS: 7}, 7),
        ("org-b", T0 - timedelta(days=1), "chat", ONLINE, "", usage, 1),  # before any book
        ("org-b", T0 + timedelta(hours=4), "nope", ONLINE, "", usage, 1),  # unknown model
    ]
    deltas = simulate(records, current, draft_doubling_input())  # type: ignore[arg-type]
    a, b = deltas["org-a"], deltas["org-b"]
    assert (a.events, a.charged_micros, a.current_micros, a.draft_micros) == (
        2,
        2 * charged,
        2 * charged,
        4 * charged,
    )
    assert a.delta_micros == 2 * charged
    assert (b.events, b.unrated_events, b.delta_micros) == (1, 2, 0)


def test_simulate_tracks_period_usage_for_allowances_per_org_and_month() -> None:
    current = PriceBookHistory([book()])
    reads = {Meter.EMBEDDING_READS: 600}  # 1,000 free per month, then 4 credits each
    records = [
        ("org", T0 + timedelta(days=1), "", ONLINE, "", reads, 0),
        ("org", T0 + timedelta(days=2), "", ONLINE, "", reads, 400_000_000),
        ("org", T0 + timedelta(days=40), "", ONLINE, "", reads, 0),  # next month: free again
        ("other", T0 + timedelta(days=2), "", ONLINE, "", reads, 0),
    ]
    deltas = simulate(records, current, book("draft"))  # type: ignore[arg-type]
    assert deltas["org"].current_micros == 200 * 4 * 10**6
    assert deltas["org"].charged_micros == 400_000_000
    assert deltas["org"].delta_micros == 800_000_000 - 400_000_000
    assert deltas["other"].current_micros == 0
