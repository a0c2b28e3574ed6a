"""Alert rules per organization.

`body` holds the rule's settings as JSON (see services/notifier/store.py for the shape):
{"types": ["low_balance", ...], "channel": "webhook", "webhook_url": "...", "email_to": "...",
 "cooldown_seconds": 0, "low_balance_threshold_micros": 0, "enabled": true}.
Deleting a rule sets `deleted_at`; rows are never removed.

Revision ID: 0001
Revises:
"""

from alembic import op

from tally.kit.db import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE notifier.alert_rules (
            rule_id      text PRIMARY KEY,
            org_id       text NOT NULL,
            request_id   text NOT NULL UNIQUE,
            body         jsonb NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            updated_at   timestamptz NOT NULL DEFAULT now(),
            deleted_at   timestamptz
        );
        CREATE INDEX alert_rules_org ON notifier.alert_rules (org_id, created_at DESC, rule_id DESC)
            WHERE deleted_at IS NULL;
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE notifier.alert_rules")
