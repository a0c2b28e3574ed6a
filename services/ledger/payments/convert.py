"""Payment protos <-> payment domain (the servicer's vocabulary for payment RPCs)."""

from __future__ import annotations

from services.ledger.payments import domain as p
from tally.kit.protoconv import enum_in, enum_out, to_timestamp
from tally.ledger.v1 import ledger_pb2 as pb


def order(o: p.PaymentOrder) -> pb.PaymentOrder:
    return pb.PaymentOrder(
        payment_order_id=o.payment_order_id, org_id=o.org_id,
        state=enum_out(pb.PaymentOrderState, "PAYMENT_ORDER_STATE_", o.state),
        amount_minor=o.amount_minor, currency=o.currency, credits_micros=o.credits_micros,
        bonus_credits_micros=o.bonus_credits_micros,
        checkout_url=o.checkout_url if o.state is p.PaymentOrderState.PENDING else "",
        provider=o.provider, provider_session_id=o.provider_session_id,
        created_at=to_timestamp(o.created_at), settled_at=to_timestamp(o.settled_at),
        kind=enum_out(pb.PaymentOrderKind, "PAYMENT_ORDER_KIND_", o.kind),
        package_id=o.package_id, billing_profile_id=o.billing_profile_id,
        refunded_minor=o.refunded_minor, refunded_micros=o.refunded_micros,
        failure_reason=o.failure_reason,
        manual_method=enum_out(pb.ManualPaymentMethod, "MANUAL_PAYMENT_METHOD_",
                               o.manual_method),
        reference=o.reference, created_by=o.created_by, approved_by=o.approved_by,
        credit_transfer_id=o.credit_transfer_id, price_book_version=o.price_book_version)


def _custom(message: pb.CustomAmount) -> p.CustomAmount:
    return p.CustomAmount(message.amount_minor, message.currency)


def purchase_command(request: pb.PurchaseRequest) -> p.PurchaseCommand:
    which = request.WhichOneof("amount")
    return p.PurchaseCommand(
        payment_order_id=request.payment_order_id, org_id=request.org_id,
        package_id=request.package_id if which == "package_id" else "",
        custom=_custom(request.custom) if which == "custom" else None,
        billing_profile_id=request.billing_profile_id, success_url=request.success_url,
        cancel_url=request.cancel_url)


def manual_command(request: pb.RecordManualPaymentRequest) -> p.ManualPaymentCommand:
    method = enum_in(pb.ManualPaymentMethod, "MANUAL_PAYMENT_METHOD_", request.method,
                     p.ManualPaymentMethod, "method", required=False)
    return p.ManualPaymentCommand(
        request.payment_order_id, request.org_id, request.amount_minor, request.currency,
        request.credits_micros, request.bonus_credits_micros, request.reference, method)


def auto_top_up_in(message: pb.AutoTopUp) -> p.AutoTopUp:
    which = message.WhichOneof("amount")
    return p.AutoTopUp(
        org_id=message.org_id, enabled=message.enabled,
        threshold_micros=message.threshold_micros, max_per_day=message.max_per_day,
        package_id=message.package_id if which == "package_id" else "",
        custom=_custom(message.custom) if which == "custom" else None,
        billing_profile_id=message.billing_profile_id,
        payment_method_id=message.payment_method_id)


def auto_top_up(config: p.AutoTopUp) -> pb.AutoTopUp:
    message = pb.AutoTopUp(
        org_id=config.org_id, enabled=config.enabled,
        threshold_micros=config.threshold_micros, max_per_day=config.max_per_day,
        billing_profile_id=config.billing_profile_id,
        payment_method_id=config.payment_method_id,
        updated_at=to_timestamp(config.updated_at), updated_by=config.updated_by)
    if config.custom is not None:
        message.custom.CopyFrom(pb.CustomAmount(amount_minor=config.custom.amount_minor,
                                                currency=config.custom.currency))
    elif config.package_id:
        message.package_id = config.package_id
    return message
