"""Long CLI runs show progress: reconciling a range of months and exporting many days of
snapshots go one call per month or window of days, with a bar of done/total on standard
error (never on standard output, where the CSV goes). Against a real ledger."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
from rich.console import Console

from tally.cli.statements import (
    day_windows,
    months_between,
    reconcile_months,
    snapshots_between,
)
from tally.kit.config import load_kit_config
from tests.cli.test_payments_cli import tally
from tests.ledger.payments_support import Shop, open_shop


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


def terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=100), screen


def test_ranges_are_cut_into_consecutive_calls() -> None:
    assert day_windows(date(2026, 1, 1), date(2026, 3, 3), 31) == [
        (date(2026, 1, 1), date(2026, 1, 31)), (date(2026, 2, 1), date(2026, 3, 3))]
    assert day_windows(date(2026, 1, 2), date(2026, 1, 2)) == [
        (date(2026, 1, 2), date(2026, 1, 2))]
    assert months_between("2025-11", "2026-02") == ["2025-11", "2025-12", "2026-01",
                                                    "2026-02"]
    assert months_between("2026-05", "") == ["2026-05"]


async def test_reconciling_a_range_of_months_shows_each_month_done(shop: Shop) -> None:
    order = await shop.purchase("po-1")
    assert await shop.pay(order) == 303
    now = datetime.now(UTC)
    before = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    config = load_kit_config({"TALLY_LEDGER_PORT": str(shop.ledger.port)})
    console, screen = terminal()
    replies = await reconcile_months(config, "acme", [before, now.strftime("%Y-%m")], console)
    assert [r.month for r in replies] == [before, now.strftime("%Y-%m")]
    assert all(not r.mismatches for r in replies) and replies[1].credits_purchased_micros > 0
    drawn = screen.getvalue()
    assert "reconciling" in drawn and "2/2" in drawn and now.strftime("%Y-%m") in drawn

    ran = await tally(shop, "reconcile", "--month", before, "--to", now.strftime("%Y-%m"),
                      "--org", "acme")
    assert ran.exit_code == 0, ran.err
    assert ran.out.splitlines() == ["month,kind,subject,expected,found"]  # CSV only
    assert ran.err.count("0 mismatches") == 2


async def test_a_long_snapshot_export_is_read_a_window_at_a_time(shop: Shop) -> None:
    config = load_kit_config({"TALLY_LEDGER_PORT": str(shop.ledger.port)})
    console, screen = terminal()
    first = date.today() - timedelta(days=500)  # more than one ListDailySnapshots may ask
    found = await snapshots_between(config, "acme", first, date.today(), console)
    assert found == []
    windows = len(day_windows(first, date.today()))
    assert windows == 17 and f"{windows}/{windows}" in screen.getvalue()
