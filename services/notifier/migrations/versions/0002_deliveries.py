"""What the notifier reads, decides and sends.

- `admin_requests`: rule and secret writes are idempotent on the client's request id.
- `webhook_secrets`: each org's signing secrets; the newest signs, an older one stays valid
  for verification until `retired_at` (the rotation overlap).
- `source_cursors`: how far each outbox (ledger, metering) has been read; advanced in the
  transaction that records what the events caused, so a restart neither skips nor repeats.
- `low_balance_state`: per rule, whether the org is already below the rule's threshold, so a
  balance hovering around it alerts on each crossing, not on every change.
- `rule_cooldowns`: when each rule last notified per type; inside the cooldown nothing new.
- `notifications`: one per source event and rule (the id is derived from both: replays of an
  event cannot make a second).
- `deliveries`: one per notification, with its state, attempts and next attempt time; dead
  letters stay here until replayed.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from tally.kit.db import run_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE notifier.admin_requests (
            request_id   text PRIMARY KEY,
            request_hash text NOT NULL,
            result       jsonb NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE notifier.webhook_secrets (
            org_id      text NOT NULL,
            secret_id   text NOT NULL,
            secret      text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            retired_at  timestamptz,
            PRIMARY KEY (org_id, secret_id)
        );

        CREATE TABLE notifier.source_cursors (
            source   text PRIMARY KEY,
            sequence bigint NOT NULL
        );

        CREATE TABLE notifier.low_balance_state (
            rule_id text PRIMARY KEY,
            below   boolean NOT NULL
        );

        CREATE TABLE notifier.rule_cooldowns (
            rule_id      text NOT NULL,
            type         text NOT NULL,
            last_sent_at timestamptz NOT NULL,
            PRIMARY KEY (rule_id, type)
        );

        CREATE TABLE notifier.notifications (
            notification_id text PRIMARY KEY,
            source_event_id text NOT NULL,
            rule_id         text NOT NULL,
            org_id          text NOT NULL,
            type            text NOT NULL,
            occurred_at     timestamptz NOT NULL,
            trace_id        text NOT NULL DEFAULT '',
            title           text NOT NULL,
            attributes      jsonb NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX notifications_of_org ON notifier.notifications (org_id, created_at);

        CREATE TABLE notifier.deliveries (
            delivery_id     text PRIMARY KEY,
            notification_id text NOT NULL UNIQUE,
            rule_id         text NOT NULL,
            org_id          text NOT NULL,
            type            text NOT NULL,
            channel         text NOT NULL,
            target          text NOT NULL DEFAULT '',
            state           text NOT NULL,   -- PENDING | RETRYING | DELIVERED | DEAD_LETTERED
            attempts        integer NOT NULL DEFAULT 0,
            last_error      text NOT NULL DEFAULT '',
            next_attempt_at timestamptz,
            delivered_at    timestamptz,
            created_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX deliveries_due ON notifier.deliveries (next_attempt_at)
            WHERE state IN ('PENDING', 'RETRYING');
        CREATE INDEX deliveries_of_org
            ON notifier.deliveries (org_id, created_at DESC, delivery_id DESC);
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE notifier.deliveries, notifier.notifications, notifier.rule_cooldowns, "
        "notifier.low_balance_state, notifier.source_cursors, notifier.webhook_secrets, "
        "notifier.admin_requests"
    )
