"""Metering's usage events and the ledger's billing documents, with both services running:
the month's statement itemizes its usage by meter, model, project and label from metering's
events of exactly the batches it debited (each dimension adds up to those debits, and the
PDF shows it), and Reconcile compares metering's events with the ledger's debits batch by
batch, naming the batch whose side was altered."""

from __future__ import annotations

import io
from collections import defaultdict
from datetime import UTC, datetime

import asyncpg
import pytest
from pypdf import PdfReader

from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.kit.money import format_credits
from tally.ledger.v1 import billing_pb2 as bpb
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
from tests.metering.test_ingestion import usage
from tests.metering.test_reports import record
from tests.support.money import money_problems

MONTH = datetime.now(UTC).strftime("%Y-%m")


def billed_events() -> list[mpb.UsageEvent]:
    """Two models, two projects, a team label on most events, in the current month."""
    return [usage(f"bill-{i}", model=("gpt-4.1-mini", "claude-sonnet")[i % 3 == 0],
                  input_tokens=500 + 41 * i, output_tokens=90 + 7 * i,
                  at=datetime.now(UTC), project_id=("proj-a", "proj-b")[i % 2],
                  labels={"team": ("search", "chat")[i % 4 == 0]} if i % 5 else {})
            for i in range(24)]


async def recorded(suite: Suite) -> tuple[list[mpb.UsageEvent], list[mpb.EventResult]]:
    await suite.fund("acme", 1_000)
    events = billed_events()
    results = []
    for start in range(0, len(events), 8):  # three RecordUsage calls: several ledger batches
        results += await record(suite, events[start:start + 8])
    return events, results


async def test_a_statement_itemizes_its_usage_by_meter_model_project_and_label(
        suite: Suite) -> None:
    events, results = await recorded(suite)
    by: dict[tuple[str, str], int] = defaultdict(int)
    for event, result in zip(events, results, strict=True):
        cost = result.receipt.cost_micros
        by[("project", event.context.project_id)] += cost
        for key, value in event.context.labels.items():
            by[("label", f"{key}={value}")] += cost
        for line in result.receipt.lines:
            by[("meter_cost", str(line.meter))] += line.cost_micros
    total = sum(r.receipt.cost_micros for r in results)

    s = (await suite.client.billing.GetStatement(bpb.GetStatementRequest(
        org_id="acme", month=MONTH))).statement
    assert s.usage_breakdown_available
    # every usage debit of the month came through metering's batches: all of it itemized
    assert s.usage_total_micros == s.usage_itemized_micros == total
    rows: dict[str, dict[str, int]] = defaultdict(dict)
    for r in s.usage_breakdown:
        rows[r.dimension][r.value] = r.credits_micros
    for dimension in ("meter", "model", "project"):
        assert sum(rows[dimension].values()) == total, dimension
    assert rows["project"] == {"proj-a": by[("project", "proj-a")],
                               "proj-b": by[("project", "proj-b")]}
    assert rows["label"] == {k[1]: v for k, v in by.items() if k[0] == "label"}
    assert set(rows["model"]) == {"gpt-4.1-mini", "claude-sonnet"}
    assert sorted(rows["meter"].values()) == sorted(
        v for k, v in by.items() if k[0] == "meter_cost")
    counts = {r.value: r.event_count for r in s.usage_breakdown if r.dimension == "project"}
    assert counts == {"proj-a": 12, "proj-b": 12}

    pdf = b"".join([c.chunk async for c in suite.client.billing.DownloadStatementPdf(
        bpb.DownloadStatementPdfRequest(org_id="acme", month=MONTH))])
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    for heading in ("Usage by meter", "Usage by model", "Usage by project", "Usage by label"):
        assert heading in text
    for value in ("proj-a", "proj-b", "claude-sonnet", "team=search"):
        assert value in text
    assert format_credits(by[("project", "proj-a")]) in text
    assert format_credits(total) in text


async def reconcile(suite: Suite) -> bpb.ReconcileResponse:
    return await suite.client.billing.Reconcile(bpb.ReconcileRequest(org_id="acme",
                                                                     month=MONTH))


@pytest.mark.ledger_tampered
async def test_reconcile_names_the_batch_whose_usage_events_were_altered(suite: Suite) -> None:
    _, results = await recorded(suite)
    agreed = await reconcile(suite)
    assert agreed.usage_events_checked and list(agreed.mismatches) == []
    assert agreed.usage_events_micros == (agreed.usage_debited_micros
                                          + agreed.usage_arrears_micros)
    assert agreed.usage_events_micros == sum(r.receipt.cost_micros for r in results)
    assert await money_problems(suite.db_url) == []

    conn = await asyncpg.connect(db.asyncpg_url(suite.db_url))
    try:  # metering's side of one event says one micro-credit more than was debited
        batch = await conn.fetchval(
            "UPDATE metering.usage_events SET cost_micros = cost_micros + 1 "
            "WHERE org_id = 'acme' AND event_id = 'bill-9' RETURNING ledger_batch_id")
        debit = await conn.fetchval(
            "SELECT x.debited + x.owed FROM ledger.usage_batch_results b, unnest(b.org_ids, "
            "b.debited_micros, b.arrears_micros) AS x(org_id, debited, owed) "
            "WHERE b.batch_id = $1 AND x.org_id = 'acme'", batch)
    finally:
        await conn.close()
    found = await reconcile(suite)
    assert [(m.kind, m.subject, m.expected, m.found) for m in found.mismatches] == [
        ("USAGE_EVENTS", f"{batch} acme", str(debit), str(debit + 1))]
    assert found.usage_events_micros == agreed.usage_events_micros + 1
    # the after-test money check sees it too, naming the same batch
    problems = await money_problems(suite.db_url)
    assert len(problems) == 1 and f"{batch} acme" in problems[0]
    # and the month's statement is not itemized while the two sides disagree
    s = (await suite.client.billing.GetStatement(bpb.GetStatementRequest(
        org_id="acme", month=MONTH))).statement
    assert not s.usage_breakdown_available and list(s.usage_breakdown) == []


async def test_get_batch_usage_refuses_an_unbounded_or_unnamed_question(suite: Suite) -> None:
    for request, field in (
            (mpb.GetBatchUsageRequest(org_id="acme", batch_ids=["b"] * 1001), "batch_ids"),
            (mpb.GetBatchUsageRequest(org_id="", batch_ids=["b"]), "org_id"),
            (mpb.GetBatchUsageRequest(org_id="acme", batch_ids=["b", ""]), "batch_ids")):
        with pytest.raises(TallyError) as caught:
            await suite.client.metering.GetBatchUsage(request)
        assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, field)
    empty = await suite.client.metering.GetBatchUsage(mpb.GetBatchUsageRequest(
        org_id="acme", batch_ids=["never-posted"]))
    assert list(empty.batches) == [] and list(empty.breakdown) == []
