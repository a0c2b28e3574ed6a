"""Notifications and deliveries: domain -> proto (and the filters back)."""

from __future__ import annotations

from typing import Any

from tally.kit.errors import invalid
from tally.kit.protoconv import to_timestamp
from tally.kit.telemetry import trace_id_of
from tally.notifier.v1 import notifier_pb2 as pb

from .alerting import Notification
from .delivery_store import Delivery
from .domain import Channel, NotificationType


def _type(kind: NotificationType) -> Any:
    return pb.NotificationType.Value(f"NOTIFICATION_TYPE_{kind.value.upper()}")


def _channel(channel: Channel) -> Any:
    return pb.Channel.Value(f"CHANNEL_{channel.value.upper()}")


def notification(n: Notification) -> pb.Notification:
    """The wire notification."""
    return pb.Notification(
        notification_id=n.notification_id, source_event_id=n.source_event_id, org_id=n.org_id,
        type=_type(n.type), occurred_at=to_timestamp(n.occurred_at),
        trace_id=trace_id_of(n.trace_id),
        title=n.title, attributes=dict(n.attributes))


def delivery(d: Delivery) -> pb.Delivery:
    """The wire delivery."""
    return pb.Delivery(
        delivery_id=d.delivery_id, notification_id=d.notification_id, rule_id=d.rule_id,
        channel=_channel(d.channel), state=pb.DeliveryState.Value(f"DELIVERY_STATE_{d.state}"),
        attempts=d.attempts, last_error=d.last_error,
        next_attempt_at=to_timestamp(d.next_attempt_at),
        delivered_at=to_timestamp(d.delivered_at),
        created_at=to_timestamp(d.created_at), org_id=d.org_id, type=_type(d.type))


def state_filter(value: int) -> str:
    """A DeliveryState filter as the store's state name ("" = any)."""
    if value == pb.DELIVERY_STATE_UNSPECIFIED:
        return ""
    try:
        return str(pb.DeliveryState.Name(value)).removeprefix(  # type: ignore[arg-type]
            "DELIVERY_STATE_")
    except ValueError:
        raise invalid("state", f"unknown delivery state {value}") from None


def type_filter(values: Any) -> set[NotificationType]:
    """Subscribe's types filter (empty = all)."""
    kinds = set()
    for i, value in enumerate(values):
        try:
            name = str(pb.NotificationType.Name(value)).removeprefix("NOTIFICATION_TYPE_")
        except ValueError:
            raise invalid(f"types[{i}]", f"unknown notification type {value}") from None
        if name == "UNSPECIFIED":
            raise invalid(f"types[{i}]", "must not be UNSPECIFIED")
        kinds.add(NotificationType(name.lower()))
    return kinds
