"""The CSV of statements, snapshots and reconciliations opens in a spreadsheet: RFC 4180
quoting and CRLF, a header row, every amount as credits with six decimals and as micros."""

from __future__ import annotations

import csv
import io

from tally.cli.statements import (
    credits6,
    reconciliation_csv,
    snapshots_csv,
    statement_csv,
)
from tally.ledger.v1 import billing_pb2 as pb


def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def test_credits_have_exactly_six_decimals_and_keep_the_sign() -> None:
    assert [credits6(x) for x in (0, 1, 1_500_000, -2_000_001, 12)] == [
        "0.000000", "0.000001", "1.500000", "-2.000001", "0.000012"]


def test_a_statement_csv_has_a_header_and_both_amounts_per_line() -> None:
    s = pb.Statement(org_id="acme", month="2026-11", opening_balance_micros=10_000_000,
                     closing_balance_micros=7_500_000, entry_count=2, lines=[
                         pb.StatementLine(category="USAGE", description='Usage, "paid"',
                                          amount_micros=-2_500_000, entry_count=2)])
    text = statement_csv(s)
    assert text.endswith("\r\n") and '"Usage, ""paid"""' in text  # RFC 4180 quoting
    table = rows(text)
    assert table[0] == ["month", "line", "description", "credits", "micros", "entries"]
    assert table[1] == ["2026-11", "OPENING_BALANCE", "Opening balance", "10.000000",
                        "10000000", ""]
    assert table[2] == ["2026-11", "USAGE", 'Usage, "paid"', "-2.500000", "-2500000", "2"]
    assert table[3][:5] == ["2026-11", "CLOSING_BALANCE", "Closing balance", "7.500000",
                            "7500000"]


def test_snapshot_and_reconciliation_csvs_have_headers_and_iso_dates() -> None:
    snap = pb.DailySnapshot(org_id="acme", day="2026-11-30", posted_micros=5,
                            available_micros=5, billing_state="ACTIVE")
    snap.written_at.FromSeconds(1_796_000_000)
    table = rows(snapshots_csv([snap]))
    assert table[0][:4] == ["day", "org_id", "posted_credits", "posted_micros"]
    assert table[1][:4] == ["2026-11-30", "acme", "0.000005", "5"]
    assert table[1][-1].endswith("Z") and "T" in table[1][-1]
    empty = rows(reconciliation_csv(pb.ReconcileResponse(month="2026-11")))
    assert empty == [["month", "kind", "subject", "expected", "found"]]


def test_metering_usage_by_model_and_meter_appends_to_the_statement_csv() -> None:
    from tally.cli.statements import csv_text, usage_rows
    from tally.common.v1 import common_pb2
    from tally.metering.v1 import metering_pb2 as mpb

    summary = mpb.GetUsageSummaryResponse(rows=[mpb.UsageSummaryRow(
        key={"model": "claude-sonnet-4"}, meter=common_pb2.METER_INPUT_TOKENS,
        quantity=1200, credits_micros=1_050_000, event_count=3)])
    table = rows(csv_text([], usage_rows("2026-11", summary)))
    assert table == [["2026-11", "USAGE_BY_MODEL_METER",
                      "claude-sonnet-4 / input_tokens (1200 units)", "1.050000", "1050000", "3"]]


def test_a_statements_usage_breakdown_follows_it_in_the_csv_one_row_per_value() -> None:
    s = pb.Statement(org_id="acme", month="2026-11", usage_total_micros=7,
                     usage_itemized_micros=5, usage_breakdown_available=True,
                     usage_breakdown=[
                         pb.StatementUsageRow(dimension="meter", value="input_tokens",
                                              credits_micros=5, event_count=2),
                         pb.StatementUsageRow(dimension="project", value="",
                                              credits_micros=5, event_count=2),
                         pb.StatementUsageRow(dimension="label", value="team=a, b",
                                              credits_micros=3, event_count=1)])
    table = rows(statement_csv(s))
    assert table[-4:] == [
        ["2026-11", "USAGE_ITEMIZED", "Usage itemized by metering", "0.000005", "5", ""],
        ["2026-11", "USAGE_BY_METER", "input_tokens", "0.000005", "5", "2"],
        ["2026-11", "USAGE_BY_PROJECT", "(none)", "0.000005", "5", "2"],
        ["2026-11", "USAGE_BY_LABEL", "team=a, b", "0.000003", "3", "1"]]
    unavailable = pb.Statement(org_id="acme", month="2026-11", usage_total_micros=7)
    assert rows(statement_csv(unavailable))[-1][1] == "USAGE_TOTAL"
