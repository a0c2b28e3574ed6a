"""Ledger proto <-> domain conversions (the servicer's vocabulary)."""

from __future__ import annotations

from typing import Any

from services.ledger import domain as d
from services.ledger.leases import Lease
from tally.common.v1 import common_pb2
from tally.kit.errors import invalid
from tally.kit.protoconv import enum_in, enum_out, from_timestamp, to_timestamp
from tally.kit.server import acting_identity
from tally.kit.telemetry import current_trace_id, trace_id_of
from tally.ledger.v1 import ledger_pb2 as pb


def caller(context: common_pb2.RequestContext, actor: str) -> d.Caller:
    """Audit identity of a request: the verified principal whatever the context claims (so
    manual settlement's four-eyes check compares proven identities); in development mode the
    context's actor, else the principal's name."""
    return d.Caller(actor=acting_identity(context.actor) if context.actor else actor,
                    trace_id=current_trace_id(),
                    user_id=context.user_id,
                    labels=dict(context.labels.items()))


def grant_spec(message: pb.GrantSpec, field: str) -> d.GrantSpec | None:
    kind = enum_in(pb.GrantKind, "GRANT_KIND_", message.grant_kind, d.GrantKind,
                   f"{field}.grant_kind", required=False)
    if kind is None:
        return None
    return d.GrantSpec(kind, message.priority, from_timestamp(message, "expires_at"))


def transfer_command(request: pb.TransferRequest, prefix: str = "") -> d.TransferCommand:
    kind = enum_in(pb.TransferKind, "TRANSFER_KIND_", request.kind, d.TransferKind,
                   f"{prefix}kind")
    cmd = d.TransferCommand(
        transfer_id=request.transfer_id,
        org_id=request.org_id,
        kind=d.validate_client_kind(kind, f"{prefix}kind"),
        amount_micros=request.amount_micros,
        reason=request.reason,
        grant=grant_spec(request.grant, f"{prefix}grant") if request.HasField("grant") else None,
        reverses_transfer_id=request.reverses_transfer_id,
    )
    return cmd


def transfer(t: d.Transfer) -> pb.Transfer:
    return pb.Transfer(
        transfer_id=t.transfer_id,
        kind=enum_out(pb.TransferKind, "TRANSFER_KIND_", t.kind),
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        org_id=t.org_id,
        amount_micros=t.amount_micros,
        actor=t.actor,
        reason=t.reason,
        trace_id=t.trace_id,
        labels=dict(t.labels),
        created_at=to_timestamp(t.created_at),
        grant_id=t.grant_id,
        reservation_id=t.reservation_id,
        entry_hash=t.entry_hash,
        debit_account_kind=enum_out(pb.AccountKind, "ACCOUNT_KIND_",
                                    d.account_kind(t.debit_account_id)),
        credit_account_kind=enum_out(pb.AccountKind, "ACCOUNT_KIND_",
                                     d.account_kind(t.credit_account_id)),
        user_id=t.user_id,
        reverses_transfer_id=t.reverses_transfer_id,
        payment_order_id=t.payment_order_id,
    )


def billing_state(state: d.BillingState) -> Any:
    return enum_out(common_pb2.BillingState, "BILLING_STATE_", state)


def balance(b: d.Balance) -> pb.Balance:
    return pb.Balance(
        org_id=b.org_id,
        posted_micros=b.posted_micros,
        held_micros=b.held_micros,
        available_micros=b.available_micros,
        arrears_micros=b.arrears_micros,
        billing_state=billing_state(b.billing_state),
        grants=[
            pb.GrantBalance(
                grant_id=g.grant_id,
                grant_kind=enum_out(pb.GrantKind, "GRANT_KIND_", g.kind),
                priority=g.priority,
                original_micros=g.original_micros,
                remaining_micros=g.remaining_micros,
                expires_at=to_timestamp(g.expires_at),
                source_transfer_id=g.source_transfer_id,
            )
            for g in b.grants
        ],
        as_of=to_timestamp(b.as_of),
        leased_micros=b.leased_micros,
        in_flight_micros=b.in_flight_micros,
    )


def lease(x: Lease) -> pb.Lease:
    return pb.Lease(
        lease_id=x.lease_id, org_id=x.org_id, holder=x.holder,
        granted_micros=x.granted_micros, charged_micros=x.charged_micros,
        consumed_micros=x.consumed_micros, returned_micros=x.returned_micros,
        hold_micros=x.hold_micros, in_flight_micros=x.in_flight_micros,
        state=pb.LEASE_STATE_OPEN if x.state == "OPEN" else pb.LEASE_STATE_ENDED,
        expires_at=to_timestamp(x.expires_at))


def reservation(r: d.Reservation) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=r.reservation_id,
        org_id=r.org_id,
        amount_micros=r.amount_micros,
        state=enum_out(pb.ReservationState, "RESERVATION_STATE_", r.state),
        expires_at=to_timestamp(r.expires_at),
        captured_micros=r.captured_micros,
        arrears_micros=r.arrears_micros,
        created_at=to_timestamp(r.created_at),
        settled_at=to_timestamp(r.settled_at),
        capture_transfer_id=r.capture_transfer_id,
    )


def usage_item(item: pb.UsageItem) -> d.UsageItem:
    return d.UsageItem(item.event_id, item.org_id, item.cost_micros, item.reservation_id,
                       item.lease_id)


def usage_batch(request: pb.PostUsageBatchRequest, caller: d.Caller) -> d.UsageBatch:
    """A PostUsageBatch request: per-event items or per-org debits (not both)."""
    if request.items and request.org_debits:
        raise invalid("org_debits", "a batch carries items or org_debits, not both")
    debits = [d.OrgUsageDebit(
        o.org_id, o.amount_micros, o.event_count, o.events_digest,
        [d.UsageCapture(c.reservation_id, c.cost_micros, c.cost_before_micros)
         for c in o.captures] if o.captures else (), o.lease_id) for o in request.org_debits]
    return d.UsageBatch(request.batch_id, [usage_item(i) for i in request.items], caller,
                        debits)


def add_usage_results(into: pb.PostUsageBatchResponse, results: d.UsageResults) -> None:
    """Appends `results` to a batch's reply (results or org_results): add() builds each
    message in place, without an intermediate message copied into the list."""
    for r in results:
        if isinstance(r, d.OrgUsageResult):
            into.org_results.add(
                org_id=r.org_id, transfer_id=r.transfer_id,
                arrears_transfer_id=r.arrears_transfer_id, debited_micros=r.debited_micros,
                arrears_micros=r.arrears_micros,
                available_before_micros=r.available_before_micros,
                balance_after_micros=r.balance_after_micros, is_duplicate=r.is_duplicate)
        else:
            into.results.add(
                event_id=r.event_id, transfer_id=r.transfer_id,
                debited_micros=r.debited_micros, arrears_micros=r.arrears_micros,
                balance_after_micros=r.balance_after_micros, is_duplicate=r.is_duplicate)


def outbox_event(e: d.OutboxEvent) -> pb.OutboxEvent:
    return pb.OutboxEvent(
        event_id=e.event_id, sequence=e.sequence, org_id=e.org_id,
        type=enum_out(pb.OutboxEventType, "OUTBOX_EVENT_TYPE_", e.type),
        occurred_at=to_timestamp(e.occurred_at), trace_id=trace_id_of(e.trace_id),
        traceparent=e.trace_id if e.trace_id != trace_id_of(e.trace_id) else "",
        available_micros_after=e.available_micros_after, arrears_micros=e.arrears_micros,
        billing_state=billing_state(e.billing_state),
        attributes=dict(e.attributes))
