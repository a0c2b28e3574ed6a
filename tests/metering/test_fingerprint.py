"""An event's fingerprint: the same meaning gives the same one whatever the order of its
quantities and labels; events recorded with the former SHA-256 form still match theirs."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from services.metering.ingestion.domain import UsageEvent
from tally.rating import Meter

EVENT = UsageEvent(
    event_id="e1", org_id="acme", occurred_at=datetime(2026, 3, 1, tzinfo=UTC),
    quantities=((Meter.INPUT_TOKENS, 10), (Meter.OUTPUT_TOKENS, 3)), model="gpt-4.1",
    labels={"team": "search", "env": "prod"})


def test_the_fingerprint_ignores_order_but_not_meaning() -> None:
    reordered = replace(EVENT, quantities=tuple(reversed(EVENT.quantities)),
                        labels={"env": "prod", "team": "search"})
    assert reordered.fingerprint() == EVENT.fingerprint()
    for changed in (replace(EVENT, quantities=((Meter.INPUT_TOKENS, 11),
                                               (Meter.OUTPUT_TOKENS, 3))),
                    replace(EVENT, labels={"team": "chat", "env": "prod"}),
                    replace(EVENT, model="gpt-4.1-mini"), replace(EVENT, user_id="u"),
                    # an id holding what a joined form would use as a separator
                    replace(EVENT, org_id="acme', 'x")):
        assert changed.fingerprint() != EVENT.fingerprint()
        assert not changed.has_fingerprint(EVENT.fingerprint())


def test_a_fingerprint_stored_in_the_former_form_still_matches() -> None:
    assert EVENT.has_fingerprint(EVENT.legacy_fingerprint())
    assert EVENT.has_fingerprint(EVENT.fingerprint())
    assert not replace(EVENT, model="o4-mini").has_fingerprint(EVENT.legacy_fingerprint())
