"""API keys' last use, and orgs (with their regions) in the credentials feed.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from tally.kit.db import run_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        ALTER TABLE accounts.api_keys ADD COLUMN last_used_at timestamptz;
        ALTER TABLE accounts.credential_changes DROP CONSTRAINT credential_changes_kind_check;
        ALTER TABLE accounts.credential_changes ADD CONSTRAINT credential_changes_kind_check
            CHECK (kind IN ('key', 'member', 'org'));
        INSERT INTO accounts.credential_changes (kind, org_id, ref)
            SELECT 'org', org_id, org_id FROM accounts.orgs ORDER BY created_at;
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE accounts.api_keys DROP COLUMN last_used_at")
