"""No secret is stored in plaintext: after an API key is issued, an alert rule posts to a chat
webhook whose URL is its credential, and the org's webhook signing secret is rotated, no text
or JSON column of any table in the database holds any of them; `tally keys rotate-kek`
re-wraps every stored one under a new KEK and each still opens."""

from __future__ import annotations

import base64
import os

import asyncpg
import pytest

from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit import db
from tally.kit.secrets import PREFIX, Sealer, parse_keyring, rewrap_all
from tally.notifier.v1 import notifier_pb2 as npb
from tests.notifier.conftest import notifier_server

from .conftest import Identities

SLACK_TOKEN = "xoxbSECRETt0kenOfTheChatWebhook"
HOOK = f"https://hooks.slack.example/services/T0001/B0001/{SLACK_TOKEN}"


def keyring(kek_id: str) -> str:
    return f"{kek_id}:{base64.b64encode(os.urandom(32)).decode()}"


async def plaintext_anywhere(conn: asyncpg.Connection, needles: dict[str, str]
                             ) -> list[str]:
    """`table.column: what` for every text/json column of every table that contains one of
    `needles` (what -> secret)."""
    columns = await conn.fetch(
        "SELECT c.table_schema, c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE t.table_type = 'BASE TABLE' AND c.table_schema NOT IN "
        "('pg_catalog', 'information_schema') AND c.data_type IN "
        "('text', 'character varying', 'jsonb', 'json', 'ARRAY', 'bytea')")
    found = []
    for schema, table, column in columns:
        for what, secret in needles.items():
            hit = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}"."{table}" '
                f'WHERE position($1 in "{column}"::text) > 0', secret)
            if hit:
                found.append(f"{schema}.{table}.{column}: {what}")
    return found


async def test_no_secret_is_stored_in_plaintext_and_every_one_rewraps(
        ids: Identities, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = keyring("k1")
    monkeypatch.setenv("TALLY_KEK", first)
    key = await ids.key("acme", apb.ROLE_GATEWAY)
    async with notifier_server(db_url) as notifier:
        n = notifier.client.notifier
        rule = (await n.CreateAlertRule(npb.CreateAlertRuleRequest(
            request_id="rule-1", rule=npb.AlertRule(
                org_id="acme", types=[npb.NOTIFICATION_TYPE_LOW_BALANCE],
                channel=npb.CHANNEL_WEBHOOK, webhook_url=HOOK, enabled=True,
                low_balance_threshold_micros=1)))).rule
        rotated = await n.RotateWebhookSecret(npb.RotateWebhookSecretRequest(
            request_id="rotate-1", org_id="acme", overlap_seconds=60))
        # what was stored sealed still reads back whole, through the service
        shown = await n.GetAlertRule(npb.GetAlertRuleRequest(org_id="acme",
                                                             rule_id=rule.rule_id))
        assert shown.rule.webhook_url == HOOK
        replayed = await n.CreateAlertRule(npb.CreateAlertRuleRequest(
            request_id="rule-1", rule=npb.AlertRule(
                org_id="acme", types=[npb.NOTIFICATION_TYPE_LOW_BALANCE],
                channel=npb.CHANNEL_WEBHOOK, webhook_url=HOOK, enabled=True,
                low_balance_threshold_micros=1)))
        assert replayed.rule.webhook_url == HOOK

    needles = {"API key": key.secret, "chat webhook token": SLACK_TOKEN,
               "webhook signing secret": rotated.secret}
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        assert await plaintext_anywhere(conn, needles) == []
        stored = await conn.fetchval("SELECT body->>'webhook_url' FROM notifier.alert_rules")
        assert stored.startswith(f"{PREFIX}:k1:")

        # a new KEK first, the old one kept after it until every value is re-wrapped
        both = Sealer(parse_keyring(f"{keyring('k2')},{first}"))
        assert await rewrap_all(conn, both) >= 3
        assert await rewrap_all(conn, both) == 0
        stored = await conn.fetchval("SELECT body->>'webhook_url' FROM notifier.alert_rules")
        assert stored.startswith(f"{PREFIX}:k2:")
        only_new = Sealer({"k2": both.keys["k2"]})
        assert only_new.open(stored) == HOOK
        secrets = [only_new.open(s) for s in await conn.fetchval(
            "SELECT array_agg(secret) FROM notifier.webhook_secrets")]
        assert rotated.secret in secrets
        assert await plaintext_anywhere(conn, needles) == []
    finally:
        await conn.close()
