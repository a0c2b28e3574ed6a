"""Manual settlement's four-eyes check compares verified identities, not claimed actors."""

from __future__ import annotations

import grpc
import pytest

from tally.common.v1 import common_pb2
from tally.ledger.v1 import ledger_pb2 as pb
from tally.ledger.v1 import ledger_pb2_grpc
from tests.ledger.payments_support import open_shop

from .conftest import Identities, mesh

CREDIT = 1_000_000


async def test_the_recorder_cannot_approve_by_claiming_to_be_someone_else(
        ids: Identities, db_url: str) -> None:
    guard = ids.guard()
    async with open_shop(db_url, authenticator=guard) as shop:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{shop.ledger.port}") as channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
            recorded = await ledger.RecordManualPayment(pb.RecordManualPaymentRequest(
                payment_order_id="bank-1", org_id="acme", amount_minor=500_000,
                currency="USD", credits_micros=500_000 * CREDIT, reference="SEPA #4711",
                method=pb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER,
                context=common_pb2.RequestContext(actor="user:bob-billing")),
                metadata=tuple(mesh("finance-a").items()))
            assert recorded.order.created_by == "svc:finance-a"  # the claim is not recorded
            with pytest.raises(grpc.aio.AioRpcError) as same_identity:
                await ledger.ApproveManualPayment(pb.ApproveManualPaymentRequest(
                    payment_order_id="bank-1",
                    context=common_pb2.RequestContext(actor="user:dana-admin")),
                    metadata=tuple(mesh("finance-a").items()))
            assert same_identity.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert await shop.db.fetchval("SELECT count(*) FROM ledger.transfers") == 0
            approved = await ledger.ApproveManualPayment(pb.ApproveManualPaymentRequest(
                payment_order_id="bank-1",
                context=common_pb2.RequestContext(actor="user:bob-billing")),
                metadata=tuple(mesh("finance-b").items()))
            assert (approved.order.state, approved.order.approved_by) == (
                pb.PAYMENT_ORDER_STATE_SUCCEEDED, "svc:finance-b")
