"""tally.notifier.v1 messages <-> notifier domain objects.

Incoming rules become specs as sent: an UNSPECIFIED (or unknown) enum is None, and
`domain.validate_rule` names it with every other bad field. Output-only fields are not read.
"""

from __future__ import annotations

from tally.kit.protoconv import enum_or_none, to_timestamp
from tally.notifier.v1 import notifier_pb2

from .domain import AlertRule, AlertRulePage, Channel, NotificationType, Rotation, RuleSpec


def _type_to_proto(kind: NotificationType) -> notifier_pb2.NotificationType.ValueType:
    return notifier_pb2.NotificationType.Value(f"NOTIFICATION_TYPE_{kind.name}")


def rule_spec(message: notifier_pb2.AlertRule) -> RuleSpec:
    """The writable fields of a wire rule."""
    return RuleSpec(
        types=tuple(enum_or_none(notifier_pb2.NotificationType, "NOTIFICATION_TYPE_", t,
                                 NotificationType) for t in message.types),
        channel=enum_or_none(notifier_pb2.Channel, "CHANNEL_", message.channel, Channel),
        webhook_url=message.webhook_url,
        email_to=message.email_to,
        cooldown_seconds=message.cooldown_seconds,
        low_balance_threshold_micros=message.low_balance_threshold_micros,
        is_enabled=message.enabled,
    )


def rule_to_proto(rule: AlertRule) -> notifier_pb2.AlertRule:
    """An alert rule as the wire message."""
    message = notifier_pb2.AlertRule(
        rule_id=rule.rule_id,
        org_id=rule.org_id,
        types=[_type_to_proto(t) for t in rule.types],
        channel=notifier_pb2.Channel.Value(f"CHANNEL_{rule.channel.name}"),
        webhook_url=rule.webhook_url,
        email_to=rule.email_to,
        cooldown_seconds=rule.cooldown_seconds,
        low_balance_threshold_micros=rule.low_balance_threshold_micros,
        enabled=rule.is_enabled,
    )
    message.created_at.FromDatetime(rule.created_at)
    message.updated_at.FromDatetime(rule.updated_at)
    return message


def rule_page_to_proto(page: AlertRulePage) -> notifier_pb2.ListAlertRulesResponse:
    """A page of rules as the ListAlertRules response."""
    return notifier_pb2.ListAlertRulesResponse(
        rules=[rule_to_proto(r) for r in page.rules], next_page_token=page.next_page_token
    )


def rotation_to_proto(rotation: Rotation) -> notifier_pb2.RotateWebhookSecretResponse:
    """A rotation as the RotateWebhookSecret response (previous_valid_until unset if none)."""
    return notifier_pb2.RotateWebhookSecretResponse(
        secret_id=rotation.secret_id, secret=rotation.secret,
        previous_valid_until=to_timestamp(rotation.previous_valid_until))
