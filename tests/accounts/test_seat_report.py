"""The monthly seat report: peak paid seats and paid seat-time, replayed from the history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.accounts.domain import MemberEvent, Role, seat_report
from tally.accounts.v1 import accounts_pb2 as pb

from .conftest import Stub, make_org

DAY = 86_400
NOV = datetime(2026, 11, 1, tzinfo=UTC)


def at(days: float) -> datetime:
    return NOV + timedelta(days=days)


def test_seats_held_before_the_month_count_from_its_first_second_and_removals_end_them() -> None:
    events = [MemberEvent("owner", Role.OWNER, at(-40)),
              MemberEvent("dev", Role.DEVELOPER, at(-10)),
              MemberEvent("viewer", Role.VIEWER, at(-5)),
              MemberEvent("dev", None, at(10)),            # leaves on the 11th
              MemberEvent("viewer", Role.ADMIN, at(20)),   # promoted on the 21st
              MemberEvent("late", Role.DEVELOPER, at(35))]  # December: not in November
    report = seat_report("acme", 2026, 11, events, now=at(60))
    assert report.peak_paid_seats == 2
    assert report.paid_seat_seconds == 30 * DAY + 10 * DAY + 10 * DAY
    assert report.paid_seats_at_end == 2


def test_the_peak_counts_seats_held_at_once_within_the_month() -> None:
    events = [MemberEvent("a", Role.ADMIN, at(1)), MemberEvent("b", Role.DEVELOPER, at(2)),
              MemberEvent("c", Role.DEVELOPER, at(3)), MemberEvent("b", None, at(4)),
              MemberEvent("c", Role.BILLING, at(5))]
    report = seat_report("acme", 2026, 11, events, now=at(60))
    assert (report.peak_paid_seats, report.paid_seats_at_end) == (3, 1)
    assert report.paid_seat_seconds == 29 * DAY + 2 * DAY + 2 * DAY


def test_the_current_month_counts_up_to_now() -> None:
    report = seat_report("acme", 2026, 11, [MemberEvent("a", Role.OWNER, at(-1))],
                         now=at(3))
    assert report.paid_seat_seconds == 3 * DAY


async def test_the_report_of_the_current_month_through_the_server(accounts: Stub) -> None:
    await make_org(accounts, seat_limit=5)
    await accounts.InviteMember(pb.InviteMemberRequest(org_id="acme", subject="d@acme.test",
                                                       role=pb.ROLE_DEVELOPER))
    await accounts.InviteMember(pb.InviteMemberRequest(org_id="acme", subject="v@acme.test",
                                                       role=pb.ROLE_VIEWER))
    now = datetime.now(UTC)
    report = await accounts.GetSeatReport(pb.GetSeatReportRequest(
        org_id="acme", year=now.year, month=now.month))
    assert (report.peak_paid_seats, report.paid_seats_at_end) == (2, 2)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await accounts.GetSeatReport(pb.GetSeatReportRequest(org_id="acme", year=2026,
                                                             month=13))
    assert "month" in (failure.value.details() or "")
