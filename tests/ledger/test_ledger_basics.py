"""The ledger's core behaviour through gRPC, against real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient

CREDIT = 1_000_000


async def grant(tally: TallyClient, org: str, amount: int, transfer_id: str,
                kind: int = pb.TRANSFER_KIND_PROMOTIONAL_GRANT) -> pb.TransferResponse:
    return await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id=transfer_id, org_id=org, kind=kind, amount_micros=amount,
        reason="test grant"))


async def test_a_grant_opens_the_account_and_shows_in_the_balance(tally: TallyClient) -> None:
    reply = await grant(tally, "acme", 10 * CREDIT, "g-1")
    assert reply.balance_after.available_micros == 10 * CREDIT
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance
    assert (balance.posted_micros, balance.held_micros, balance.available_micros) == (
        10 * CREDIT, 0, 10 * CREDIT)
    assert [g.remaining_micros for g in balance.grants] == [10 * CREDIT]
    assert reply.transfer.entry_hash and reply.transfer.actor == "user:test-operator"


async def test_replaying_a_transfer_returns_the_original(tally: TallyClient) -> None:
    first = await grant(tally, "acme", 5 * CREDIT, "g-1")
    again = await grant(tally, "acme", 5 * CREDIT, "g-1")
    assert again.transfer == first.transfer
    assert again.balance_after.available_micros == 5 * CREDIT
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance
    assert balance.posted_micros == 5 * CREDIT


async def test_same_id_different_payload_is_refused_and_writes_nothing(
    tally: TallyClient,
) -> None:
    await grant(tally, "acme", 5 * CREDIT, "g-1")
    with pytest.raises(TallyError) as caught:
        await grant(tally, "acme", 6 * CREDIT, "g-1")
    assert caught.value.reason is Reason.IDEMPOTENCY_KEY_REUSED
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance
    assert balance.posted_micros == 5 * CREDIT


async def test_reserve_capture_release_lifecycle(tally: TallyClient) -> None:
    await grant(tally, "acme", 10 * CREDIT, "g-1")
    held = await tally.ledger.Reserve(pb.ReserveRequest(
        reservation_id="r-1", org_id="acme", amount_micros=4 * CREDIT, ttl_seconds=60))
    assert held.available_micros == 6 * CREDIT
    captured = await tally.ledger.Capture(pb.CaptureRequest(
        reservation_id="r-1", org_id="acme", actual_micros=3 * CREDIT))
    assert captured.reservation.state == pb.RESERVATION_STATE_CAPTURED
    assert captured.balance_after.available_micros == 7 * CREDIT
    assert captured.balance_after.held_micros == 0
    again = await tally.ledger.Capture(pb.CaptureRequest(
        reservation_id="r-1", org_id="acme", actual_micros=3 * CREDIT))
    assert again.transfer.transfer_id == captured.transfer.transfer_id
    with pytest.raises(TallyError) as caught:
        await tally.ledger.Capture(pb.CaptureRequest(
            reservation_id="r-1", org_id="acme", actual_micros=2 * CREDIT))
    assert caught.value.reason is Reason.RESERVATION_ALREADY_CAPTURED

    await tally.ledger.Reserve(pb.ReserveRequest(
        reservation_id="r-2", org_id="acme", amount_micros=CREDIT))
    released = await tally.ledger.Release(pb.ReleaseRequest(reservation_id="r-2", org_id="acme"))
    assert released.reservation.state == pb.RESERVATION_STATE_RELEASED
    assert released.available_micros == 7 * CREDIT
    with pytest.raises(TallyError) as caught:
        await tally.ledger.Capture(pb.CaptureRequest(
            reservation_id="r-2", org_id="acme", actual_micros=1))
    assert caught.value.reason is Reason.RESERVATION_ALREADY_RELEASED
    with pytest.raises(TallyError) as caught:
        await tally.ledger.Capture(pb.CaptureRequest(
            reservation_id="nope", org_id="acme", actual_micros=1))
    assert caught.value.reason is Reason.RESERVATION_NOT_FOUND


async def test_reserve_beyond_available_is_refused_with_the_available_amount(
    tally: TallyClient,
) -> None:
    await grant(tally, "acme", 2 * CREDIT, "g-1")
    with pytest.raises(TallyError) as caught:
        await tally.ledger.Reserve(pb.ReserveRequest(
            reservation_id="r-1", org_id="acme", amount_micros=3 * CREDIT))
    assert caught.value.reason is Reason.INSUFFICIENT_CREDITS
    assert caught.value.metadata["available_micros"] == str(2 * CREDIT)


async def test_capture_beyond_credit_records_arrears(tally: TallyClient) -> None:
    await grant(tally, "acme", 2 * CREDIT, "g-1")
    await tally.ledger.Reserve(pb.ReserveRequest(
        reservation_id="r-1", org_id="acme", amount_micros=CREDIT))
    captured = await tally.ledger.Capture(pb.CaptureRequest(
        reservation_id="r-1", org_id="acme", actual_micros=5 * CREDIT))
    assert captured.reservation.arrears_micros == 3 * CREDIT
    assert captured.balance_after.available_micros == 0
    assert captured.balance_after.arrears_micros == 3 * CREDIT
    # the next credit settles the arrears first
    reply = await grant(tally, "acme", 4 * CREDIT, "g-2")
    assert reply.balance_after.arrears_micros == 0
    assert reply.balance_after.available_micros == CREDIT
    report = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert report.ok, report.detail


async def test_usage_burns_soonest_expiring_promotional_before_paid(tally: TallyClient) -> None:
    from datetime import UTC, datetime, timedelta

    from google.protobuf.timestamp_pb2 import Timestamp

    soon = Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(days=5))
    later = Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(days=50))
    await tally.ledger.Adjust(pb.AdjustRequest(
        adjustment_id="paid", org_id="acme", amount_micros=5 * CREDIT, reason="paid credit",
        grant=pb.GrantSpec(grant_kind=pb.GRANT_KIND_PURCHASED, expires_at=soon)))
    await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="promo", org_id="acme", kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=5 * CREDIT, reason="promo",
        grant=pb.GrantSpec(grant_kind=pb.GRANT_KIND_PROMOTIONAL, expires_at=soon)))
    await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="bonus-late", org_id="acme", kind=pb.TRANSFER_KIND_BONUS,
        amount_micros=5 * CREDIT, grant=pb.GrantSpec(grant_kind=pb.GRANT_KIND_BONUS,
                                                   expires_at=later)))
    await tally.ledger.PostUsageBatch(pb.PostUsageBatchRequest(batch_id="b-1", items=[
        pb.UsageItem(event_id="e-1", org_id="acme", cost_micros=7 * CREDIT)]))
    grants = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"))).balance.grants
    remaining = {g.source_transfer_id: g.remaining_micros for g in grants}
    assert remaining == {"paid": 3 * CREDIT, "bonus-late": 5 * CREDIT}


async def test_bad_input_names_the_field_and_writes_nothing(tally: TallyClient) -> None:
    cases = [
        (pb.TransferRequest(transfer_id="t", org_id="acme",
                            kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=0),
         "amount_micros"),
        (pb.TransferRequest(transfer_id="t", org_id="acme",
                            kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=-5),
         "amount_micros"),
        (pb.TransferRequest(transfer_id="", org_id="acme",
                            kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=5),
         "transfer_id"),
        (pb.TransferRequest(transfer_id="t", org_id="",
                            kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=5),
         "org_id"),
        (pb.TransferRequest(transfer_id="t", org_id="ghost", kind=pb.TRANSFER_KIND_USAGE,
                            amount_micros=5), "org_id"),
        (pb.TransferRequest(transfer_id="t", org_id="acme", kind=pb.TRANSFER_KIND_PURCHASE,
                            amount_micros=5), "kind"),
    ]
    for request, field in cases:
        with pytest.raises(TallyError) as caught:
            await tally.ledger.Transfer(request)
        assert caught.value.reason is Reason.INVALID_ARGUMENT, request
        assert caught.value.field == field, (request, caught.value.violations)
    oversized = pb.PostUsageBatchRequest(batch_id="big", items=[
        pb.UsageItem(event_id=f"e{i}", org_id="acme", cost_micros=1) for i in range(5001)])
    with pytest.raises(TallyError) as caught:
        await tally.ledger.PostUsageBatch(oversized)
    assert caught.value.reason is Reason.BATCH_TOO_LARGE
    with pytest.raises(TallyError) as caught:
        await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="ghost"))
    assert caught.value.reason is Reason.NOT_FOUND
    report = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert report.ok and report.entries_checked == 0


async def test_a_failing_stream_raises_tally_error_like_a_unary_call(tally: TallyClient) -> None:
    bad = pb.StreamEventsRequest(types=[99])  # type: ignore[list-item]
    with pytest.raises(TallyError) as read:
        await tally.ledger.StreamEvents(bad).read()
    with pytest.raises(TallyError) as iterated:
        async for _ in tally.ledger.StreamEvents(bad):
            pass
    for caught in (read, iterated):
        assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT, "types")
    stream = tally.ledger.StreamEvents(pb.StreamEventsRequest())
    assert stream.cancel()  # control still reaches the real call
    with pytest.raises(asyncio.CancelledError):
        await stream.read()
    assert stream.cancelled()
