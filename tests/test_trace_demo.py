"""`tally trace-demo`: one metered request is one trace across all four services, exported
over OTLP to the demo's receiver, from Authorize to the notifier's alert."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tally.cli import tracedemo
from tally.kit.config import load_kit_config


def path_to(spans: list[tracedemo.Span], leaf: str) -> list[str]:
    """Names from the root down to the first span named `leaf`."""
    by_id = {s.span_id: s for s in spans}
    span = next(s for s in spans if s.name == leaf)
    names = [span.name]
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names[::-1]


async def test_one_request_is_one_trace_from_authorize_to_the_notifier(
        db_url: str, tmp_path: Path) -> None:
    base = dataclasses.replace(load_kit_config({}), database_url=db_url)
    trace_id, spans = await tracedemo.run(base, tmp_path / "trace-demo")
    assert spans and all(s.trace_id == trace_id for s in spans)
    services = {s.service for s in spans}
    assert {"tally-demo", "tally-metering", "tally-ledger", "tally-notifier"} <= services
    ledger = "tally.ledger.v1.LedgerService"
    metering = "tally.metering.v1.MeteringService"
    # a new org's first Authorize opens its credit lease in the ledger (later ones do not)
    lease = [s for s in spans if s.service == "tally-ledger" and s.name.endswith("/ExtendLease")]
    assert path_to(spans, lease[0].name)[:2] == [tracedemo.ROOT, f"/{metering}/Authorize"]
    assert "metering.price_book" in {s.name for s in spans}
    posted = path_to(spans, f"/{ledger}/PostUsageBatch")
    assert posted[:3] == [tracedemo.ROOT, f"/{metering}/StreamUsage", "metering.group_commit"]
    authorized = next(s for s in spans if s.service == "tally-metering"
                      and s.name == f"/{metering}/Authorize" and s.attributes)
    assert authorized.attributes["tally.decision"] == "ALLOW"
    assert authorized.attributes["tally.org_id"].startswith("trace-")
    batch = next(s for s in spans if s.service == "tally-ledger"
                 and s.name == f"/{ledger}/PostUsageBatch")
    assert batch.attributes["tally.item_count"] == "1"
    assert int(batch.attributes["tally.debited_micros"]) > 0
    notified = [s for s in spans if s.name == "notifier.notification"]
    assert [s.service for s in notified] == ["tally-notifier"]
    # not an orphan: its parent is the ledger span that wrote the outbox event
    by_id = {s.span_id: s for s in spans}
    assert by_id[notified[0].parent_id].service == "tally-ledger"
    assert any(s.database == "postgresql" for s in spans)
    rendered = tracedemo.render(spans)
    assert rendered.splitlines()[0] == f"tally-demo: {tracedemo.ROOT}"
    assert "tally-notifier: notifier.notification" in rendered
