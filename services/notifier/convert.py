"""Notifier domain objects -> tally.notifier.v1 messages."""

from __future__ import annotations

from tally.notifier.v1 import notifier_pb2

from .domain import AlertRule, AlertRulePage, NotificationType


def _type_to_proto(kind: NotificationType) -> notifier_pb2.NotificationType.ValueType:
    return notifier_pb2.NotificationType.Value(f"NOTIFICATION_TYPE_{kind.name}")


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
