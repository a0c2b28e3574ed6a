"""Postgres side of the notifier: alert rules in the `notifier` schema (SQLAlchemy Core)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from .domain import AlertRule, Channel, NotificationType

alert_rules: Final = sa.Table(
    "alert_rules",
    sa.MetaData(schema="notifier"),
    sa.Column("rule_id", sa.Text, primary_key=True),
    sa.Column("org_id", sa.Text),
    sa.Column("request_id", sa.Text),
    sa.Column("body", JSONB),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
)
"""Alert rules (migrations/versions/0001_alert_rules.py); `body` holds `rule_body`'s shape."""


def rule_body(rule: AlertRule) -> dict[str, Any]:
    """The JSON stored in `alert_rules.body` for `rule` (what `_rule` reads back)."""
    return {
        "types": [t.value for t in rule.types],
        "channel": rule.channel.value,
        "webhook_url": rule.webhook_url,
        "email_to": rule.email_to,
        "cooldown_seconds": rule.cooldown_seconds,
        "low_balance_threshold_micros": rule.low_balance_threshold_micros,
        "enabled": rule.is_enabled,
    }


def _rule(row: RowMapping) -> AlertRule:
    body: Mapping[str, Any] = row["body"]
    return AlertRule(
        rule_id=row["rule_id"],
        org_id=row["org_id"],
        types=tuple(NotificationType(t) for t in body["types"]),
        channel=Channel(body["channel"]),
        webhook_url=body.get("webhook_url", ""),
        email_to=body.get("email_to", ""),
        cooldown_seconds=body.get("cooldown_seconds", 0),
        low_balance_threshold_micros=body.get("low_balance_threshold_micros", 0),
        is_enabled=body.get("enabled", True),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class AlertRuleRepository:
    """Reads alert rules; implements `domain.AlertRuleStore`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def list_rules(self, org_id: str, *, offset: int, limit: int) -> Sequence[AlertRule]:
        """The org's live rules, newest first (ties broken by rule id, so pages are stable)."""
        stmt = (
            sa.select(alert_rules)
            .where(alert_rules.c.org_id == org_id, alert_rules.c.deleted_at.is_(None))
            .order_by(alert_rules.c.created_at.desc(), alert_rules.c.rule_id.desc())
            .offset(offset)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return [_rule(row) for row in rows]
