"""Reports over ingested usage: summaries by label, hourly/daily exports, the CLI's receipts and
CSV — every figure checked against the receipts the events got."""

from __future__ import annotations

import csv
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tally.cli import usage as usage_cli
from tally.kit.errors import Reason, TallyError
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
from tests.metering.test_ingestion import ACCEPTED, usage

_NOW = datetime.now(UTC)
_MONTH_START = _NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
# Three distinct past hours in one calendar month (the summaries asked for are that month's):
# in a month's first hours, the end of the month before.
NOW = (_NOW if _NOW - timedelta(hours=5) >= _MONTH_START
       else _MONTH_START - timedelta(minutes=1)).replace(minute=30, second=0, microsecond=0)
# Three distinct hours, all in the current month's window of late events.
HOURS = [NOW - timedelta(hours=h) for h in (2, 3, 4)]


async def record(suite: Suite, events: list[mpb.UsageEvent]) -> list[mpb.EventResult]:
    results: list[mpb.EventResult] = []
    for start in range(0, len(events), 100):
        reply = await suite.client.metering.RecordUsage(
            mpb.RecordUsageRequest(events=events[start:start + 100]))
        results.extend(reply.results)
    assert all(r.status == ACCEPTED for r in results), results
    return results


def mixed_events() -> list[mpb.UsageEvent]:
    """Events over three hours, two models, two teams and some without a team label."""
    events = []
    for i in range(60):
        labels = {"team": ("search", "chat")[i % 2]} if i % 3 else {}
        events.append(usage(f"r-{i}", model=("gpt-4.1-mini", "claude-sonnet")[i % 4 == 0],
                            input_tokens=100 + i * 37, output_tokens=20 + i * 11,
                            at=HOURS[i % 3], user_id=f"u-{i % 5}", labels=labels))
    return events


async def export_all(suite: Suite, request: mpb.ExportUsageRequest) -> list[mpb.UsageSummaryRow]:
    """Every page of a summary export, following the tokens."""
    rows: list[mpb.UsageSummaryRow] = []
    pages = 0
    while True:
        token = ""
        async for message in suite.client.metering.ExportUsage(request):
            if message.HasField("summary"):
                rows.append(message.summary)
            token = message.next_page_token or token
        pages += 1
        if not token:
            break
        request.page_token = token
    assert pages > 1 or len(rows) <= request.page_size
    return rows


async def test_summary_by_label_and_model_matches_the_receipts(suite: Suite) -> None:
    await suite.fund("acme", 1_000)
    events = mixed_events()
    results = await record(suite, events)
    by_team: dict[tuple[str, str], int] = defaultdict(int)
    for event, result in zip(events, results, strict=True):
        if "team" in event.context.labels:
            by_team[(event.context.labels["team"], result.receipt.resolved_model)] += (
                result.receipt.cost_micros)
    summary = await suite.client.metering.GetUsageSummary(mpb.GetUsageSummaryRequest(
        org_id="acme", year=NOW.year, month=NOW.month, label_key="team",
        group_by=[mpb.USAGE_GROUP_BY_LABEL, mpb.USAGE_GROUP_BY_MODEL]))
    rolled: dict[tuple[str, str], int] = defaultdict(int)
    for row in summary.rows:
        assert set(row.key) == {"label.team", "model"}
        rolled[(row.key["label.team"], row.key["model"])] += row.credits_micros
    assert rolled == by_team
    # Totals cover all usage of the month, labelled or not.
    assert summary.total_credits_micros == sum(r.receipt.cost_micros for r in results)
    assert summary.total_event_count == len(events)


@pytest.mark.parametrize("kind", [mpb.EXPORT_KIND_HOURLY_SUMMARY, mpb.EXPORT_KIND_DAILY_SUMMARY])
async def test_summary_exports_page_through_every_roll_up_row_once(
    suite: Suite, kind: mpb.ExportKind.ValueType,
) -> None:
    await suite.fund("acme", 1_000)
    events = mixed_events()
    results = await record(suite, events)
    request = mpb.ExportUsageRequest(org_id="acme", kind=kind, page_size=3)
    request.start_time.FromDatetime(NOW - timedelta(days=2))
    rows = await export_all(suite, request)
    keys = [(r.bucket_start.ToDatetime(), r.key["model"], r.key["operation"], r.meter)
            for r in rows]
    assert len(keys) == len(set(keys)), "a row came twice across pages"
    assert keys == sorted(keys)
    assert sum(r.credits_micros for r in rows) == sum(r.receipt.cost_micros for r in results)
    if kind == mpb.EXPORT_KIND_HOURLY_SUMMARY:
        assert {r.bucket_start.ToDatetime(tzinfo=UTC) for r in rows} == {
            h.replace(minute=0) for h in HOURS}
    cost_by_model: dict[str, int] = defaultdict(int)
    for result in results:
        cost_by_model[result.receipt.resolved_model] += result.receipt.cost_micros
    exported_by_model: dict[str, int] = defaultdict(int)
    for row in rows:
        exported_by_model[row.key["model"]] += row.credits_micros
    assert exported_by_model == cost_by_model


async def test_a_daily_label_export_keys_rows_by_the_label(suite: Suite) -> None:
    await suite.fund("acme", 1_000)
    events = mixed_events()
    results = await record(suite, events)
    request = mpb.ExportUsageRequest(org_id="acme", kind=mpb.EXPORT_KIND_DAILY_SUMMARY,
                                     page_size=2, label_key="team",
                                     group_by=[mpb.USAGE_GROUP_BY_LABEL])
    rows = await export_all(suite, request)
    exported: dict[str, int] = defaultdict(int)
    for row in rows:
        exported[row.key["label.team"]] += row.credits_micros
    expected: dict[str, int] = defaultdict(int)
    for event, result in zip(events, results, strict=True):
        if "team" in event.context.labels:
            expected[event.context.labels["team"]] += result.receipt.cost_micros
    assert exported == expected


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"org_id": "", "kind": mpb.EXPORT_KIND_DAILY_SUMMARY}, "org_id"),
        ({"org_id": "acme", "kind": mpb.EXPORT_KIND_HOURLY_SUMMARY, "label_key": "team",
          "group_by": [mpb.USAGE_GROUP_BY_LABEL]}, "kind"),
        ({"org_id": "acme", "kind": mpb.EXPORT_KIND_DAILY_SUMMARY,
          "group_by": [mpb.USAGE_GROUP_BY_LABEL]}, "label_key"),
        ({"org_id": "acme", "kind": mpb.EXPORT_KIND_DAILY_SUMMARY, "label_key": "team",
          "group_by": [mpb.USAGE_GROUP_BY_LABEL, mpb.USAGE_GROUP_BY_USER]}, "group_by[1]"),
        ({"org_id": "acme", "kind": mpb.EXPORT_KIND_UNSPECIFIED}, "kind"),
        ({"org_id": "acme", "kind": mpb.EXPORT_KIND_DAILY_SUMMARY, "page_token": "bogus"},
         "page_token"),
    ],
)
async def test_bad_summary_exports_are_refused_naming_the_field(
    suite: Suite, fields: dict[str, object], field: str,
) -> None:
    with pytest.raises(TallyError) as caught:  # streams raise TallyError like unary calls
        async for _ in suite.client.metering.ExportUsage(mpb.ExportUsageRequest(**fields)):
            pass
    error = caught.value
    assert error.reason is Reason.INVALID_ARGUMENT
    assert error.message.startswith(f"{field}:"), error.message


async def test_cli_prints_a_receipt_and_writes_csv_of_events_and_roll_ups(
    suite: Suite, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    await suite.fund("acme", 1_000)
    events = mixed_events()
    results = await record(suite, events)

    await usage_cli.show(suite.config, "acme", "r-7")
    printed = capsys.readouterr().out
    receipt = results[7].receipt
    assert f"price book v{receipt.price_book_version}" in printed
    assert receipt.ledger_transfer_id in printed
    assert printed.count(" x ") == len(receipt.lines)

    raw = tmp_path / "raw.csv"
    assert await usage_cli.export(suite.config, "acme", None, None, raw) == len(events)
    with raw.open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["event_id"] for r in rows} == {e.event_id for e in events}
    assert sum(int(r["cost_micros"]) for r in rows) == sum(
        r.receipt.cost_micros for r in results)

    daily = tmp_path / "daily.csv"
    written = await usage_cli.export(suite.config, "acme", None, None, daily, "daily")
    with daily.open() as handle:
        rolled = list(csv.DictReader(handle))
    assert len(rolled) == written > 0
    assert sum(int(r["credits_micros"]) for r in rolled) == sum(
        r.receipt.cost_micros for r in results)
