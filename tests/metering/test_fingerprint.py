"""An event's fingerprint: the same meaning gives the same one whatever the order of its
quantities and labels; events recorded with the former SHA-256 form still match theirs, and
events recorded without one (the ack path hashes nothing) are compared as stored."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.metering.ingestion.domain import EventStatus, UsageEvent
from services.metering.ingestion.store import UsageEventStore
from tally.kit import db
from tally.rating import Meter, PriceBookHistory
from tally.rating.catalog import load_catalog

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


async def test_a_replay_is_compared_with_the_event_as_stored(db_url: str) -> None:
    history = PriceBookHistory([load_catalog()])
    now = datetime.now(UTC).replace(microsecond=123456) - timedelta(hours=1)
    event = replace(EVENT, occurred_at=now)
    legacy = replace(EVENT, event_id="e-legacy", occurred_at=now)
    pool = await db.create_pool(db_url, max_size=2)
    try:
        store = UsageEventStore(pool)
        recorded = await store.record("b-1", [event, legacy], history)
        assert recorded.results == [None, None]
        # a row recorded before the ack path stopped hashing: its SHA-256 form
        await pool.execute("UPDATE metering.usage_events SET request_hash = $1 "
                           "WHERE event_id = 'e-legacy'", legacy.legacy_fingerprint())
        same = replace(event, quantities=tuple(reversed(event.quantities)),
                       labels={"env": "prod", "team": "search"})
        replays = [same, replace(event, event_id="e1", labels={"team": "chat"}),
                   replace(legacy, labels={"env": "prod", "team": "search"}),
                   replace(legacy, quantities=((Meter.INPUT_TOKENS, 99),))]
        for i, replay in enumerate(replays):
            answer = (await store.record(f"b-r{i}", [replay], history)).results[0]
            assert answer is not None
            expected = EventStatus.DUPLICATE if i % 2 == 0 else EventStatus.REJECTED
            assert answer.status is expected, (i, answer)
            if expected is EventStatus.REJECTED:
                assert answer.reason == "IDEMPOTENCY_KEY_REUSED" and answer.field == "event_id"
    finally:
        await pool.close()
