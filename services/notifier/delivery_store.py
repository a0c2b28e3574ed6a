"""Postgres side of alerting: what the outboxes caused, and the deliveries it owes.

`record` runs one transaction per batch of source events: it takes the source's lock (one
follower at a time, whichever replica), decides with `alerting.decide` under the rules'
remembered state, writes notifications (their ids make a replayed event a no-op), one delivery
per new notification, the rules' new state, and the source's cursor — so a crash either
records all of a batch or none, and the follower resumes after the last recorded event.

Deliveries are claimed with a lease (`next_attempt_at` pushed ahead in the claiming
statement), sent outside any transaction, then settled; a worker that dies mid-send leaves
the lease to expire and another sends again (at least once; receivers dedupe on the
notification id).
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg

from tally.kit import idempotency
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid_fields
from tally.kit.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_cursor, encode_cursor
from tally.kit.secrets import Sealer

from .alerting import Notification, RuleState, SourceEvent, decide
from .domain import AlertRule, Channel, NotificationType
from .store import CLAIMS, rule_from_row

LEASE: Final = timedelta(seconds=60)
MAX_REPLAY: Final = 1000


class DeliveryState:
    """States of a delivery (proto DeliveryState names)."""

    PENDING = "PENDING"
    RETRYING = "RETRYING"
    DELIVERED = "DELIVERED"
    DEAD_LETTERED = "DEAD_LETTERED"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification owed (or sent) through one rule's channel."""

    delivery_id: str
    notification_id: str
    rule_id: str
    org_id: str
    type: NotificationType
    channel: Channel
    target: str
    state: str
    attempts: int
    last_error: str
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


def _delivery(row: Any, sealer: Sealer | None) -> Delivery:
    target = sealer.open(row["target"]) if sealer else row["target"]
    return Delivery(row["delivery_id"], row["notification_id"], row["rule_id"], row["org_id"],
                    NotificationType(row["type"]), Channel(row["channel"]), target,
                    row["state"], row["attempts"], row["last_error"], row["next_attempt_at"],
                    row["delivered_at"], row["created_at"])


def _notification(row: Any) -> Notification:
    return Notification(row["notification_id"], row["source_event_id"], row["rule_id"],
                        row["org_id"], NotificationType(row["type"]), row["occurred_at"],
                        row["trace_id"], row["title"], json.loads(row["attributes"]))


def _target(rule: AlertRule, sealer: Sealer | None) -> str:
    if rule.channel is Channel.WEBHOOK:  # sealed: the URL may carry a chat webhook's token
        return sealer.seal(rule.webhook_url) if sealer else rule.webhook_url
    return rule.email_to if rule.channel is Channel.EMAIL else ""


class DeliveryStore:
    """Notifications, deliveries, cursors and rule state in the notifier schema."""

    def __init__(self, pool: asyncpg.Pool, sealer: Sealer | None = None) -> None:
        self.pool = pool
        self.sealer = sealer

    async def cursor(self, source: str) -> int:
        """The last recorded sequence of `source` (0 before the first)."""
        found = await self.pool.fetchval(
            "SELECT sequence FROM notifier.source_cursors WHERE source = $1", source)
        return int(found or 0)

    async def record(self, source: str, events: Sequence[SourceEvent], now: datetime
                     ) -> list[Notification]:
        """Records what `events` (one source, outbox order) cause; returns the notifications
        that are new."""
        if not events:
            return []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)",
                               zlib.crc32(f"notifier-source:{source}".encode()))
            done = await conn.fetchval(
                "SELECT sequence FROM notifier.source_cursors WHERE source = $1", source) or 0
            events = [e for e in events if e.sequence > done]
            if not events:
                return []
            orgs = sorted({e.org_id for e in events})
            rows = await conn.fetch(
                "SELECT rule_id, org_id, body::text AS body, created_at, updated_at "
                "FROM notifier.alert_rules WHERE org_id = ANY($1::text[]) "
                "AND deleted_at IS NULL ORDER BY rule_id", orgs)
            rules = [rule_from_row({**r, "body": json.loads(r["body"])}, self.sealer)
                     for r in rows]
            rules_of: dict[str, list[AlertRule]] = {}
            for rule in rules:
                rules_of.setdefault(rule.org_id, []).append(rule)
            ids = [r.rule_id for r in rules]
            below = {r["rule_id"]: r["below"] for r in await conn.fetch(
                "SELECT rule_id, below FROM notifier.low_balance_state "
                "WHERE rule_id = ANY($1::text[]) ORDER BY rule_id FOR UPDATE", ids)}
            sent = {(r["rule_id"], NotificationType(r["type"])): r["last_sent_at"]
                    for r in await conn.fetch(
                        "SELECT rule_id, type, last_sent_at FROM notifier.rule_cooldowns "
                        "WHERE rule_id = ANY($1::text[]) ORDER BY rule_id, type FOR UPDATE", ids)}
            decisions = decide(events, rules_of, RuleState(below, sent), now)
            fresh = await self._insert(conn, decisions.notifications,
                                       {r.rule_id: r for r in rules}, now)
            if decisions.below:
                await conn.execute(
                    "INSERT INTO notifier.low_balance_state (rule_id, below) "
                    "SELECT * FROM unnest($1::text[], $2::boolean[]) ON CONFLICT (rule_id) "
                    "DO UPDATE SET below = EXCLUDED.below",
                    list(decisions.below), list(decisions.below.values()))
            if decisions.last_sent:
                keys = list(decisions.last_sent)
                await conn.execute(
                    "INSERT INTO notifier.rule_cooldowns (rule_id, type, last_sent_at) "
                    "SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) "
                    "ON CONFLICT (rule_id, type) DO UPDATE SET last_sent_at = "
                    "greatest(notifier.rule_cooldowns.last_sent_at, EXCLUDED.last_sent_at)",
                    [k[0] for k in keys], [k[1].value for k in keys],
                    [decisions.last_sent[k] for k in keys])
            await conn.execute(
                "INSERT INTO notifier.source_cursors (source, sequence) VALUES ($1, $2) "
                "ON CONFLICT (source) DO UPDATE SET sequence = "
                "greatest(notifier.source_cursors.sequence, EXCLUDED.sequence)",
                source, max(e.sequence for e in events))
            return fresh

    async def _insert(self, conn: Any, notifications: Sequence[Notification],
                      rules: dict[str, AlertRule], now: datetime) -> list[Notification]:
        if not notifications:
            return []
        inserted = set(await conn.fetchval(
            "WITH n AS (INSERT INTO notifier.notifications (notification_id, source_event_id, "
            "rule_id, org_id, type, occurred_at, trace_id, title, attributes) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
            "$6::timestamptz[], $7::text[], $8::text[], $9::jsonb[]) "
            "ON CONFLICT DO NOTHING RETURNING notification_id) "
            "SELECT coalesce(array_agg(notification_id), '{}') FROM n",
            [n.notification_id for n in notifications],
            [n.source_event_id for n in notifications], [n.rule_id for n in notifications],
            [n.org_id for n in notifications], [n.type.value for n in notifications],
            [n.occurred_at for n in notifications], [n.trace_id for n in notifications],
            [n.title for n in notifications],
            [json.dumps(dict(n.attributes)) for n in notifications]))
        fresh = [n for n in notifications if n.notification_id in inserted]
        if fresh:
            # STREAM rules are delivered by publishing to Subscribe: nothing left to send.
            streamed = [rules[n.rule_id].channel is Channel.STREAM for n in fresh]
            await conn.execute(
                "INSERT INTO notifier.deliveries (delivery_id, notification_id, rule_id, "
                "org_id, type, channel, target, state, attempts, next_attempt_at, "
                "delivered_at) SELECT k.id, k.notification, k.rule, k.org, k.type, k.channel, "
                "k.target, CASE WHEN k.streamed THEN 'DELIVERED' ELSE 'PENDING' END, "
                "CASE WHEN k.streamed THEN 1 ELSE 0 END, "
                "CASE WHEN k.streamed THEN NULL ELSE $9::timestamptz END, "
                "CASE WHEN k.streamed THEN $9::timestamptz END "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
                "$6::text[], $7::text[], $8::boolean[]) AS k(id, notification, rule, org, type, "
                "channel, target, streamed)",
                [f"dlv_{uuid.uuid4().hex}" for _ in fresh], [n.notification_id for n in fresh],
                [n.rule_id for n in fresh], [n.org_id for n in fresh],
                [n.type.value for n in fresh],
                [rules[n.rule_id].channel.value for n in fresh],
                [_target(rules[n.rule_id], self.sealer) for n in fresh], streamed, now)
        return fresh

    async def claim_due(self, now: datetime, limit: int = 100
                        ) -> list[tuple[Delivery, Notification]]:
        """Deliveries due by `now`, each leased to the caller for LEASE."""
        rows = await self.pool.fetch(
            "WITH due AS (SELECT delivery_id FROM notifier.deliveries "
            "WHERE state IN ('PENDING', 'RETRYING') AND next_attempt_at <= $1 "
            "ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) "
            "UPDATE notifier.deliveries d SET next_attempt_at = $3 FROM due "
            "WHERE d.delivery_id = due.delivery_id RETURNING d.*", now, limit, now + LEASE)
        if not rows:
            return []
        notes = {r["notification_id"]: _notification(r) for r in await self.pool.fetch(
            "SELECT notification_id, source_event_id, rule_id, org_id, type, occurred_at, "
            "trace_id, title, attributes::text AS attributes FROM notifier.notifications "
            "WHERE notification_id = ANY($1::text[])", [r["notification_id"] for r in rows])}
        return [(_delivery(r, self.sealer), notes[r["notification_id"]]) for r in rows]

    async def settle(self, delivery_id: str, now: datetime, error: str = "",
                     retry_at: datetime | None = None) -> None:
        """Records an attempt: delivered (no error), to retry at `retry_at`, or dead."""
        state = (DeliveryState.DELIVERED if not error
                 else DeliveryState.RETRYING if retry_at else DeliveryState.DEAD_LETTERED)
        await self.pool.execute(
            "UPDATE notifier.deliveries SET state = $2, attempts = attempts + 1, "
            "last_error = $3, next_attempt_at = $4, "
            "delivered_at = CASE WHEN $2 = 'DELIVERED' THEN $5::timestamptz END "
            "WHERE delivery_id = $1",
            delivery_id, state, error[:500], retry_at, now)

    async def deliveries(self, org_id: str, rule_id: str, state: str, page_size: int,
                         page_token: str) -> tuple[list[Delivery], str]:
        """One page of the org's deliveries, newest first; (page, next token)."""
        problems = []
        if not org_id:
            problems.append(FieldViolation("org_id", "is required"))
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            problems.append(FieldViolation("page_size", f"must be 0..{MAX_PAGE_SIZE}"))
        after = decode_cursor(page_token, "deliveries") if page_token else None
        if page_token and (after is None or len(after) != 2):
            problems.append(FieldViolation("page_token", "is not a token from this list"))
        if problems:
            raise invalid_fields(problems)
        size = page_size or DEFAULT_PAGE_SIZE
        created = datetime.fromisoformat(str(after[0])) if after else None
        rows = await self.pool.fetch(
            "SELECT * FROM notifier.deliveries WHERE org_id = $1 "
            "AND ($2 = '' OR rule_id = $2) AND ($3 = '' OR state = $3) "
            "AND ($4::timestamptz IS NULL OR (created_at, delivery_id) < ($4, $5)) "
            "ORDER BY created_at DESC, delivery_id DESC LIMIT $6",
            org_id, rule_id, state, created, str(after[1]) if after else "", size + 1)
        page = [_delivery(r, self.sealer) for r in rows[:size]]
        token = (encode_cursor("deliveries", page[-1].created_at.isoformat(),
                               page[-1].delivery_id) if len(rows) > size else "")
        return page, token

    async def replay_dead_letters(self, request_id: str, org_id: str,
                                  delivery_ids: Sequence[str], now: datetime) -> int:
        """Moves the org's dead letters (these, or all) back to PENDING, once per request id."""
        problems = []
        if not request_id:
            problems.append(FieldViolation("request_id", "is required"))
        if not org_id:
            problems.append(FieldViolation("org_id", "is required"))
        if problems:
            raise invalid_fields(problems)
        if len(delivery_ids) > MAX_REPLAY:
            raise TallyError(Reason.BATCH_TOO_LARGE,
                             f"delivery_ids: {len(delivery_ids)}; at most {MAX_REPLAY}",
                             field="delivery_ids")
        key = f"ReplayDeadLetters:{org_id}:{request_id}"
        digest = json.dumps(sorted(delivery_ids))
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await idempotency.claim(conn, CLAIMS, key, digest)
            if claimed.reused:
                raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                                 f"request_id: {request_id!r} was used for another replay",
                                 field="request_id")
            if claimed.replay:
                return int(json.loads(claimed.result or "{}")["replayed"])
            count = len(await conn.fetch(
                "UPDATE notifier.deliveries SET state = 'PENDING', attempts = 0, "
                "next_attempt_at = $3, last_error = '' WHERE org_id = $1 "
                "AND state = 'DEAD_LETTERED' "
                "AND (cardinality($2::text[]) = 0 OR delivery_id = ANY($2::text[])) "
                "RETURNING delivery_id", org_id, list(delivery_ids), now))
            await idempotency.record(conn, CLAIMS, key, json.dumps({"replayed": count}))
            return count
