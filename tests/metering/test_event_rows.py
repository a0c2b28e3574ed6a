"""The ack path writes event rows by its own binary COPY: every field an event was reported
with comes back from the store as it was sent (GetUsageEvent and ExportUsage read these rows),
and its priced lines come back as its receipt said."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.metering.ingestion import domain as ing
from services.metering.ingestion.store import UsageEventStore
from tally.kit import db
from tally.rating import Meter, PriceBookHistory, UsageMode
from tally.rating.catalog import load_catalog

_HASH = "ab" * 32


def _events(now: datetime) -> list[ing.UsageEvent]:
    return [
        ing.UsageEvent(  # every optional field, quantities not in rating's meter order
            event_id="e-full", org_id="org-ü",
            occurred_at=now - timedelta(days=3, microseconds=123_457),
            quantities=((Meter.OUTPUT_TOKENS, 7), (Meter.INPUT_TOKENS, 1_000_003)),
            model="claude-sonnet", provider="anthropic", operation="chat", mode=UsageMode.BATCH,
            region="eu-west", reservation_id="", project_id="p-1", environment="prod",
            user_id="u-\"quoted\"", api_key_id="key-1",
            labels={"team": "search", "emoji": "🚀", "quote": "a\"b\\c"},
            evidence=ing.Evidence("req-1", "up-1", "trace-1", (_HASH, _HASH[::-1]))),
        ing.UsageEvent(  # the bare minimum: one meter, no labels, no evidence
            event_id="e-bare", org_id="org-ü", occurred_at=now - timedelta(minutes=1),
            quantities=((Meter.INPUT_TOKENS, 0),), model="gpt-4.1-mini"),
        ing.UsageEvent(
            event_id="e-other", org_id="org-2", occurred_at=now - timedelta(seconds=1),
            quantities=((Meter.INPUT_TOKENS, 5), (Meter.OUTPUT_TOKENS, 9)), model="gpt-4.1-mini",
            labels={"team": "ops"}),
    ]


async def test_recorded_rows_give_back_each_event_and_its_receipt_lines(db_url: str) -> None:
    history = PriceBookHistory([load_catalog()])
    events = _events(datetime.now(UTC))
    pool = await db.create_pool(db_url, max_size=2)
    try:
        store = UsageEventStore(pool)
        recorded = await store.record("batch-rows", events, history)
        assert recorded.results == [None, None, None]
        for event, rated, before in zip(events, recorded.new_events, recorded.cost_before,
                                        strict=True):
            found = await store.event(event.org_id, event.event_id)
            assert found is not None
            stored, receipt = found
            assert stored == event
            assert receipt.lines == rated.receipt.lines
            assert (receipt.cost_micros, receipt.price_book_version, receipt.resolved_model) == (
                rated.receipt.cost_micros, rated.receipt.price_book_version,
                rated.receipt.resolved_model)
            assert await pool.fetchval(
                "SELECT batch_cost_before_micros FROM metering.usage_events "
                "WHERE org_id = $1 AND event_id = $2", event.org_id, event.event_id) == before
        # a replay of the same events finds every row by its key (dedup forever)
        again = await store.record("batch-again", events, history)
        assert [r.status if r else None for r in again.results] == (
            [ing.EventStatus.DUPLICATE] * 3)
    finally:
        await pool.close()
