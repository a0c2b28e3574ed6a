"""Postgres side of the notifier: alert rules and webhook signing secrets in the `notifier`
schema (SQLAlchemy Core on the service's AsyncEngine).

Every write is idempotent on the client's request id: one transaction claims
`notifier.admin_requests` (key "<Rpc>:<org>:<request_id>" with a hash of the request's meaning,
see `domain.IdempotentWrite`), does the write and stores its result there. A replay with the same
hash returns that stored result; the same id with another payload is IDEMPOTENCY_KEY_REUSED and
writes nothing. A failed write (bad input, unknown rule) rolls the claim back with it, so the id
stays free. CreateAlertRule claims there too, not only through `alert_rules.request_id`: a replay
must return the rule as first created even after later updates changed its body, and the request
hash has to be kept somewhere. `alert_rules.request_id` holds the same namespaced key, so two orgs
may pick the same request id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tally.kit import idempotency
from tally.kit.secrets import Sealer

from .domain import (
    AlertRule,
    Channel,
    IdempotentWrite,
    NewSecret,
    NotificationType,
    Rotation,
    RuleChange,
    RuleSettings,
    new_rule_id,
    new_signing_secret,
    rule_not_found,
)

_schema: Final = sa.MetaData(schema="notifier")

alert_rules: Final = sa.Table(
    "alert_rules",
    _schema,
    sa.Column("rule_id", sa.Text, primary_key=True),
    sa.Column("org_id", sa.Text),
    sa.Column("request_id", sa.Text),
    sa.Column("body", JSONB),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
)
"""Alert rules (migrations/versions/0001_alert_rules.py); `body` holds `rule_body`'s shape."""

webhook_secrets: Final = sa.Table(
    "webhook_secrets",
    _schema,
    sa.Column("org_id", sa.Text, primary_key=True),
    sa.Column("secret_id", sa.Text, primary_key=True),
    sa.Column("secret", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("retired_at", sa.DateTime(timezone=True)),
)
"""Signing secrets per org (0002_deliveries.py): the newest unretired one is current; one with
`retired_at` in the future still signs (the rotation overlap)."""

_deliveries: Final = sa.Table(
    "deliveries",
    _schema,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("rule_id", sa.Text),
    sa.Column("state", sa.Text),
)
"""The delivery engine's table (0002_deliveries.py); here only to drop a deleted rule's pending
deliveries."""

_PENDING_STATES: Final = ("PENDING", "RETRYING")


def rule_body(rule: AlertRule | RuleSettings, sealer: Sealer | None = None) -> dict[str, Any]:
    """The JSON stored in `alert_rules.body` for `rule` (what `_rule` reads back). The webhook
    URL is sealed with `sealer`: chat webhooks (Slack, Teams, Discord) carry their credential
    in the URL."""
    return {
        "types": [t.value for t in rule.types],
        "channel": rule.channel.value,
        "webhook_url": (sealer.seal(rule.webhook_url) if sealer and rule.webhook_url
                        else rule.webhook_url),
        "email_to": rule.email_to,
        "cooldown_seconds": rule.cooldown_seconds,
        "low_balance_threshold_micros": rule.low_balance_threshold_micros,
        "enabled": rule.is_enabled,
    }


def rule_from_row(row: Mapping[Any, Any], sealer: Sealer | None = None) -> AlertRule:
    """An alert rule from its row (any mapping with the columns; `body` as a dict), its
    webhook URL opened with `sealer`."""
    body: Mapping[str, Any] = row["body"]
    url = body.get("webhook_url", "")
    return AlertRule(
        rule_id=row["rule_id"],
        org_id=row["org_id"],
        types=tuple(NotificationType(t) for t in body["types"]),
        channel=Channel(body["channel"]),
        webhook_url=sealer.open(url) if sealer else url,
        email_to=body.get("email_to", ""),
        cooldown_seconds=body.get("cooldown_seconds", 0),
        low_balance_threshold_micros=body.get("low_balance_threshold_micros", 0),
        is_enabled=body.get("enabled", True),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _rule_result(rule: AlertRule, sealer: Sealer | None) -> dict[str, Any]:
    """A rule as an admin_requests result (what `_rule_of_result` reads back)."""
    return {"rule_id": rule.rule_id, "org_id": rule.org_id, "body": rule_body(rule, sealer),
            "created_at": rule.created_at.isoformat(), "updated_at": rule.updated_at.isoformat()}


def _rule_of_result(result: Mapping[str, Any], sealer: Sealer | None) -> AlertRule:
    return rule_from_row({**result, "created_at": datetime.fromisoformat(result["created_at"]),
                  "updated_at": datetime.fromisoformat(result["updated_at"])}, sealer)


# the notifier's claims (tally.kit.idempotency: one claim for every service)
CLAIMS: Final = idempotency.ClaimTable("notifier.admin_requests")


async def _claim(conn: AsyncConnection, write: IdempotentWrite) -> Mapping[str, Any] | None:
    """None when this transaction now owns the write's key; the stored result when an earlier
    call made the same request; `write.reused()` when it made another one. A concurrent claim
    of the same key waits here until the other transaction ends."""
    claimed = await idempotency.claim(conn, CLAIMS, write.key, write.request_hash)
    if claimed.reused:
        raise write.reused()
    if claimed.owned:
        return None
    result: Mapping[str, Any] = json.loads(claimed.result or "{}")
    return result


async def _record(conn: AsyncConnection, write: IdempotentWrite, result: Mapping[str, Any]
                  ) -> None:
    await idempotency.record(conn, CLAIMS, write.key, json.dumps(dict(result)))


def _live(org_id: str, rule_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(alert_rules.c.rule_id == rule_id, alert_rules.c.org_id == org_id,
                   alert_rules.c.deleted_at.is_(None))


class AlertRuleRepository:
    """Alert rules in Postgres; implements `domain.AlertRuleStore`."""

    def __init__(self, engine: AsyncEngine, sealer: Sealer | None = None) -> None:
        self.engine = engine
        self.sealer = sealer

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
        return [rule_from_row(row, self.sealer) for row in rows]

    async def rule(self, org_id: str, rule_id: str) -> AlertRule | None:
        """One live rule of the org, or None."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                sa.select(alert_rules).where(_live(org_id, rule_id)))).mappings().first()
        return None if row is None else rule_from_row(row, self.sealer)

    async def create_rule(self, write: IdempotentWrite, settings: RuleSettings) -> AlertRule:
        """Stores a new rule; a replay returns the rule as first created."""
        async with self.engine.begin() as conn:
            stored = await _claim(conn, write)
            if stored is not None:
                return _rule_of_result(stored, self.sealer)
            row = (await conn.execute(
                sa.insert(alert_rules)
                .values(rule_id=new_rule_id(), org_id=write.org_id, request_id=write.key,
                        body=rule_body(settings, self.sealer))
                .returning(alert_rules))).mappings().one()
            rule = rule_from_row(row, self.sealer)
            await _record(conn, write, _rule_result(rule, self.sealer))
            return rule

    async def update_rule(self, write: IdempotentWrite, rule_id: str, change: RuleChange
                          ) -> AlertRule:
        """Replaces a live rule's settings with `change(rule)`, the row locked meanwhile; a
        replay returns the rule as this update left it."""
        async with self.engine.begin() as conn:
            stored = await _claim(conn, write)
            if stored is not None:
                return _rule_of_result(stored, self.sealer)
            existing = (await conn.execute(
                sa.select(alert_rules).where(_live(write.org_id, rule_id)).with_for_update()
            )).mappings().first()
            if existing is None:
                raise rule_not_found("rule.rule_id", write.org_id, rule_id)
            settings = change(rule_from_row(existing, self.sealer))
            row = (await conn.execute(
                sa.update(alert_rules)
                .where(alert_rules.c.rule_id == rule_id)
                .values(body=rule_body(settings, self.sealer), updated_at=sa.func.now())
                .returning(alert_rules))).mappings().one()
            rule = rule_from_row(row, self.sealer)
            await _record(conn, write, _rule_result(rule, self.sealer))
            return rule

    async def delete_rule(self, write: IdempotentWrite, rule_id: str) -> None:
        """Soft-deletes a live rule and drops its deliveries not yet made (the proto's "pending
        deliveries of it are dropped"); a replay succeeds again."""
        async with self.engine.begin() as conn:
            if await _claim(conn, write) is not None:
                return
            deleted = await conn.scalar(
                sa.update(alert_rules)
                .where(_live(write.org_id, rule_id))
                .values(deleted_at=sa.func.now(), updated_at=sa.func.now())
                .returning(alert_rules.c.rule_id))
            if deleted is None:
                raise rule_not_found("rule_id", write.org_id, rule_id)
            await conn.execute(sa.delete(_deliveries).where(
                _deliveries.c.rule_id == rule_id, _deliveries.c.state.in_(_PENDING_STATES)))
            await _record(conn, write, {})


def _current_secret(org_id: str) -> sa.Select[tuple[str]]:
    return (sa.select(webhook_secrets.c.secret)
            .where(webhook_secrets.c.org_id == org_id, webhook_secrets.c.retired_at.is_(None))
            .order_by(webhook_secrets.c.created_at.desc(), webhook_secrets.c.secret_id.desc())
            .limit(1))


async def _lock_secrets(conn: AsyncConnection, org_id: str) -> datetime:
    """Serializes changes to one org's secrets (a rotation, or creating the first one) until
    the transaction ends; returns the time after the lock was had, so a secret created later
    always sorts newer."""
    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
        sa.func.hashtextextended(f"notifier.webhook_secrets:{org_id}", 0))))
    now = await conn.scalar(sa.select(sa.func.clock_timestamp()))
    assert isinstance(now, datetime)
    return now


async def _insert_secret(conn: AsyncConnection, org_id: str, new: NewSecret, at: datetime,
                         stored: str) -> None:
    await conn.execute(sa.insert(webhook_secrets).values(
        org_id=org_id, secret_id=new.secret_id, secret=stored, created_at=at))


class WebhookSecrets:
    """Webhook signing secrets in Postgres; implements `domain.WebhookSecretStore` and gives the
    delivery engine the secrets to sign with. Built on the service's SQLAlchemy AsyncEngine."""

    def __init__(self, engine: AsyncEngine, sealer: Sealer | None = None) -> None:
        self.engine = engine
        # Envelope encryption of the stored secrets (tally.kit.secrets); None: stored as
        # they are (no KEK configured; the server warns at start-up).
        self.sealer = sealer

    def _seal(self, secret: str) -> str:
        return self.sealer.seal(secret) if self.sealer else secret

    def _open(self, stored: str) -> str:
        return self.sealer.open(stored) if self.sealer else stored

    async def rotate(self, write: IdempotentWrite, overlap: timedelta, new: NewSecret
                     ) -> Rotation:
        """Makes `new` the org's current secret and retires the current one `overlap` from now;
        a replay returns the first call's answer (the same secret)."""
        async with self.engine.begin() as conn:
            stored = await _claim(conn, write)
            if stored is not None:
                until = stored["previous_valid_until"]
                return Rotation(stored["secret_id"], self._open(stored["secret"]),
                                None if until is None else datetime.fromisoformat(until))
            now = await _lock_secrets(conn, write.org_id)
            retired = (await conn.execute(
                sa.update(webhook_secrets)
                .where(webhook_secrets.c.org_id == write.org_id,
                       webhook_secrets.c.retired_at.is_(None))
                .values(retired_at=now + overlap)
                .returning(webhook_secrets.c.retired_at))).scalars().all()
            await _insert_secret(conn, write.org_id, new, now, self._seal(new.secret))
            rotation = Rotation(new.secret_id, new.secret, max(retired) if retired else None)
            await _record(conn, write, {
                "secret_id": rotation.secret_id, "secret": self._seal(rotation.secret),
                "previous_valid_until": None if rotation.previous_valid_until is None
                else rotation.previous_valid_until.isoformat()})
            return rotation

    async def signing_secret(self, org_id: str) -> str:
        """The org's current secret (the newest unretired one), created if it has none yet."""
        async with self.engine.connect() as conn:
            found: str | None = await conn.scalar(_current_secret(org_id))
        if found is not None:
            return self._open(found)
        async with self.engine.begin() as conn:
            now = await _lock_secrets(conn, org_id)
            found = await conn.scalar(_current_secret(org_id))
            if found is None:
                new = new_signing_secret()
                await _insert_secret(conn, org_id, new, now, self._seal(new.secret))
                return new.secret
            return self._open(found)

    async def valid_secrets(self, org_id: str, at: datetime) -> list[str]:
        """The org's secrets not retired at `at`, newest first: the current one, then any still
        inside a rotation's overlap. Empty if the org has none (`signing_secret` creates one)."""
        async with self.engine.connect() as conn:
            found = (await conn.execute(
                sa.select(webhook_secrets.c.secret)
                .where(webhook_secrets.c.org_id == org_id,
                       sa.or_(webhook_secrets.c.retired_at.is_(None),
                              webhook_secrets.c.retired_at > at))
                .order_by(webhook_secrets.c.created_at.desc(),
                          webhook_secrets.c.secret_id.desc()))).scalars().all()
        return [self._open(stored) for stored in found]
