"""LedgerService over gRPC: proto in, domain call, proto out — nothing else."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import grpc

from services.ledger import convert, leases
from services.ledger import domain as d
from services.ledger.payments import convert as pay_convert
from services.ledger.payments.domain import PaymentOrderKind, PaymentOrderState
from services.ledger.payments.service import Payments
from services.ledger.store import LedgerStore
from tally.common.v1 import common_pb2
from tally.kit.background import Signal
from tally.kit.errors import Reason, TallyError
from tally.kit.group_commit import GroupCommit
from tally.kit.protoconv import enum_in, enums_in, from_timestamp
from tally.kit.server import current_principal
from tally.kit.telemetry import annotate
from tally.ledger.v1 import ledger_pb2 as pb
from tally.ledger.v1 import ledger_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _actor() -> str:
    principal = current_principal.get()
    return principal.identity if principal else "service:anonymous"


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    """Translates LedgerService calls to LedgerStore operations."""

    def __init__(self, store: LedgerStore, payments: Payments, *,
                 usage: GroupCommit[d.UsageBatch, d.UsageResults],
                 holds: GroupCommit[d.ReserveCommand, tuple[d.Reservation, int, d.BillingState]],
                 outbox_poll_s: float = 0.2, stream_lifetime_s: float = 300.0,
                 shutting_down: asyncio.Event | None = None, one_of_regions: bool = False
                 ) -> None:
        self.store = store
        self.payments = payments
        # one copy of several regions in one process (tally.kit.regions): a call naming no
        # org that is about another region's data answers NOT_FOUND, so the router asks on
        self.one_of_regions = one_of_regions
        # concurrent calls share transactions (store.post_usage_batches, store.reserve_many)
        self.usage = usage
        self.holds = holds
        self.outbox_poll_s = outbox_poll_s
        self.stream_lifetime_s = stream_lifetime_s
        # the server's ServiceApp.shutting_down: event streams end when it is set
        self.shutting_down = shutting_down or asyncio.Event()
        # fired when the outbox is sealed (by any replica; the server wires it to the NOTIFY);
        # sealed_by_others, when set, is then the streams' safety-net poll in seconds
        self.sealed = Signal()
        self.sealed_by_others: float | None = None

    async def Transfer(self, request: pb.TransferRequest, context: Context
                       ) -> pb.TransferResponse:
        posted, balance = await self.store.transfer(
            convert.transfer_command(request), convert.caller(request.context, _actor()))
        return pb.TransferResponse(transfer=convert.transfer(posted),
                                   balance_after=convert.balance(balance))

    async def TransferBatch(self, request: pb.TransferBatchRequest, context: Context
                            ) -> pb.TransferBatchResponse:
        commands = [convert.transfer_command(t, f"transfers[{i}].")
                    for i, t in enumerate(request.transfers)]
        results = await self.store.transfer_batch(
            request.batch_id, commands, convert.caller(request.context, _actor()))
        last = {b.org_id: b for _, b in results}
        return pb.TransferBatchResponse(
            transfers=[convert.transfer(t) for t, _ in results],
            balances_after=[convert.balance(last[org]) for org in sorted(last)])

    async def Adjust(self, request: pb.AdjustRequest, context: Context) -> pb.AdjustResponse:
        command = d.TransferCommand(
            request.adjustment_id, request.org_id, d.TransferKind.MANUAL_ADJUSTMENT,
            request.amount_micros, request.reason,
            convert.grant_spec(request.grant, "grant") if request.HasField("grant") else None)
        posted, balance = await self.store.transfer(
            command, convert.caller(request.context, _actor()))
        return pb.AdjustResponse(transfer=convert.transfer(posted),
                                 balance_after=convert.balance(balance))

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        annotate(org_id=request.org_id, amount_micros=request.amount_micros)
        held, available, state = await self.holds.submit(d.ReserveCommand(
            request.reservation_id, request.org_id, request.amount_micros,
            d.validate_ttl(request.ttl_seconds), convert.caller(request.context, _actor())))
        return pb.ReserveResponse(reservation=convert.reservation(held),
                                  available_micros=available,
                                  billing_state=convert.billing_state(state))

    async def Capture(self, request: pb.CaptureRequest, context: Context) -> pb.CaptureResponse:
        captured, posted, balance = await self.store.capture(
            request.reservation_id, request.org_id, request.actual_micros,
            convert.caller(request.context, _actor()))
        return pb.CaptureResponse(
            reservation=convert.reservation(captured),
            transfer=convert.transfer(posted) if posted else None,
            balance_after=convert.balance(balance))

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        released, available = await self.store.release(
            request.reservation_id, request.org_id, convert.caller(request.context, _actor()))
        return pb.ReleaseResponse(reservation=convert.reservation(released),
                                  available_micros=available)

    async def ExtendLease(self, request: pb.ExtendLeaseRequest, context: Context
                          ) -> pb.ExtendLeaseResponse:
        annotate(org_id=request.org_id, lease_id=request.lease_id)
        extended = await self.store.leases.extend(leases.ExtendLease(
            request.request_id, request.lease_id, request.org_id, request.holder,
            request.add_micros, request.return_micros, timedelta(seconds=request.ttl_seconds),
            request.in_flight_micros, convert.caller(request.context, _actor())))
        return pb.ExtendLeaseResponse(
            lease=convert.lease(extended.lease), available_micros=extended.available_micros,
            billing_state=convert.billing_state(extended.billing_state),
            added_micros=extended.added_micros)

    async def GetReservation(self, request: pb.GetReservationRequest, context: Context
                             ) -> pb.GetReservationResponse:
        found = await self.store.get_reservation(request.reservation_id, request.org_id)
        return pb.GetReservationResponse(reservation=convert.reservation(found))

    async def PostUsageBatch(self, request: pb.PostUsageBatchRequest, context: Context
                             ) -> pb.PostUsageBatchResponse:
        batch = convert.usage_batch(request, convert.caller(request.context, _actor()))
        results = await self.usage.submit(batch)
        annotate(item_count=len(results),
                 debited_micros=sum(r.debited_micros for r in results))
        response = pb.PostUsageBatchResponse()
        convert.add_usage_results(response, results)
        return response

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context
                         ) -> pb.GetBalanceResponse:
        balance = await self.store.get_balance(request.org_id)
        return pb.GetBalanceResponse(balance=convert.balance(balance))

    async def SetBillingState(self, request: pb.SetBillingStateRequest, context: Context
                              ) -> pb.SetBillingStateResponse:
        state = enum_in(common_pb2.BillingState, "BILLING_STATE_", request.state,
                        d.BillingState, "state")
        assert state is not None
        previous, now_state, changed_at = await self.store.set_billing_state(
            request.request_id, request.org_id, state, request.cause,
            convert.caller(request.context, _actor()))
        response = pb.SetBillingStateResponse(
            previous_state=convert.billing_state(previous),
            state=convert.billing_state(now_state))
        response.changed_at.FromDatetime(changed_at)
        return response

    async def GetTransfer(self, request: pb.GetTransferRequest, context: Context
                          ) -> pb.GetTransferResponse:
        found = await self.store.get_transfer(request.org_id, request.transfer_id)
        return pb.GetTransferResponse(transfer=convert.transfer(found))

    async def ListTransactions(self, request: pb.ListTransactionsRequest, context: Context
                               ) -> pb.ListTransactionsResponse:
        kinds = enums_in(pb.TransferKind, "TRANSFER_KIND_", request.kinds, d.TransferKind,
                         "kinds")
        transfers, token = await self.store.list_transactions(
            request.org_id, kinds=kinds,
            start=from_timestamp(request, "start_time"), end=from_timestamp(request, "end_time"),
            user_id=request.user_id, labels=dict(request.labels), size=request.page_size,
            token=request.page_token)
        return pb.ListTransactionsResponse(transfers=[convert.transfer(t) for t in transfers],
                                           next_page_token=token)

    async def VerifyLedger(self, request: pb.VerifyLedgerRequest, context: Context
                           ) -> pb.VerifyLedgerResponse:
        report = await self.store.verify(request.org_id)
        return pb.VerifyLedgerResponse(ok=report.ok, entries_checked=report.entries_checked,
                                       first_bad_transfer_id=report.first_bad_transfer_id,
                                       detail=report.detail)

    async def Purchase(self, request: pb.PurchaseRequest, context: Context
                       ) -> pb.PurchaseResponse:
        order = await self.payments.purchase(pay_convert.purchase_command(request),
                                             convert.caller(request.context, _actor()))
        return pb.PurchaseResponse(order=pay_convert.order(order))

    async def GetPaymentOrder(self, request: pb.GetPaymentOrderRequest, context: Context
                              ) -> pb.GetPaymentOrderResponse:
        order = await self.payments.store.get_order(request.org_id, request.payment_order_id)
        return pb.GetPaymentOrderResponse(order=pay_convert.order(order))

    async def ListPaymentOrders(self, request: pb.ListPaymentOrdersRequest, context: Context
                                ) -> pb.ListPaymentOrdersResponse:
        orders, token = await self.payments.store.list_orders(
            request.org_id,
            states=enums_in(pb.PaymentOrderState, "PAYMENT_ORDER_STATE_", request.states,
                            PaymentOrderState, "states"),
            kinds=enums_in(pb.PaymentOrderKind, "PAYMENT_ORDER_KIND_", request.kinds,
                           PaymentOrderKind, "kinds"), size=request.page_size,
            token=request.page_token)
        return pb.ListPaymentOrdersResponse(orders=[pay_convert.order(o) for o in orders],
                                            next_page_token=token)

    async def ConfirmPayment(self, request: pb.ConfirmPaymentRequest, context: Context
                             ) -> pb.ConfirmPaymentResponse:
        if self.one_of_regions:
            await self._raise_unless_order_is_here(request)
        first, order = await self.payments.confirm(request.provider, request.payload,
                                                   request.signature_header)
        return pb.ConfirmPaymentResponse(
            processed_first_time=first, order=pay_convert.order(order) if order else None)

    async def _raise_unless_order_is_here(self, request: pb.ConfirmPaymentRequest) -> None:
        """NOT_FOUND when the webhook's payment order is not in this region's database: the
        event must be recorded and applied in its order's region only (the router then asks
        the next region). A payload that does not parse is left to `confirm` to refuse."""
        if request.provider != self.payments.provider.name:
            return
        try:
            order_id = self.payments.provider.parse_event(request.payload).payment_order_id
        except ValueError:
            return
        if order_id and not await self.store.has_payment_order(order_id):
            raise TallyError(Reason.NOT_FOUND, f"payment order {order_id!r} is not in this "
                             "region", field="payload")

    async def RecordManualPayment(self, request: pb.RecordManualPaymentRequest,
                                  context: Context) -> pb.RecordManualPaymentResponse:
        order = await self.payments.record_manual(pay_convert.manual_command(request),
                                                  convert.caller(request.context, _actor()))
        return pb.RecordManualPaymentResponse(order=pay_convert.order(order))

    async def ApproveManualPayment(self, request: pb.ApproveManualPaymentRequest,
                                   context: Context) -> pb.ApproveManualPaymentResponse:
        order, balance = await self.payments.approve(
            request.payment_order_id, convert.caller(request.context, _actor()))
        return pb.ApproveManualPaymentResponse(order=pay_convert.order(order),
                                               balance_after=convert.balance(balance))

    async def Refund(self, request: pb.RefundRequest, context: Context) -> pb.RefundResponse:
        plan, transfer, order = await self.payments.refund(
            request.refund_id, request.payment_order_id, request.amount_micros, request.reason,
            convert.caller(request.context, _actor()))
        return pb.RefundResponse(
            refund_id=request.refund_id, reversed_micros=plan.reversed_micros,
            provider_refund_minor=plan.provider_refund_minor,
            transfer=convert.transfer(transfer),
            bonus_forfeited_micros=plan.bonus_forfeited_micros, order=pay_convert.order(order))

    async def SetAutoTopUp(self, request: pb.SetAutoTopUpRequest, context: Context
                           ) -> pb.SetAutoTopUpResponse:
        stored = await self.payments.set_auto_top_up(
            request.request_id, pay_convert.auto_top_up_in(request.auto_top_up),
            convert.caller(request.context, _actor()))
        return pb.SetAutoTopUpResponse(auto_top_up=pay_convert.auto_top_up(stored))

    async def GetAutoTopUp(self, request: pb.GetAutoTopUpRequest, context: Context
                           ) -> pb.GetAutoTopUpResponse:
        config = await self.payments.store.get_auto_top_up(request.org_id)
        return pb.GetAutoTopUpResponse(auto_top_up=pay_convert.auto_top_up(config))

    async def StreamEvents(self, request: pb.StreamEventsRequest, context: Context) -> Any:
        types = enums_in(pb.OutboxEventType, "OUTBOX_EVENT_TYPE_", request.types,
                         d.OutboxEventType, "types")
        after = request.after_event_sequence
        deadline = asyncio.get_running_loop().time() + self.stream_lifetime_s
        # Bounded lifetime so a mesh can rebalance; the client resumes from its last sequence.
        while (not self.shutting_down.is_set()
               and asyncio.get_running_loop().time() < deadline):
            sealed = self.sealed.ticket()
            if self.sealed_by_others is None:  # nothing announces sealing: seal here
                await self.store.seal_outbox()
            events = await self.store.outbox_after(after, types)
            if events:
                after = events[-1].sequence
                yield pb.StreamEventsResponse(events=[convert.outbox_event(e) for e in events])
                continue
            # wait for the next sealing (any replica's), or poll as a safety net
            waits = [asyncio.ensure_future(sealed.wait()),
                     asyncio.ensure_future(self.shutting_down.wait())]
            await asyncio.wait(waits, timeout=self.sealed_by_others or self.outbox_poll_s,
                               return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
