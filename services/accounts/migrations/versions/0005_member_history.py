"""Membership history, for the monthly seat report.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from tally.kit.db import run_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE accounts.member_events (
            id        bigserial PRIMARY KEY,
            org_id    text NOT NULL,
            subject   text NOT NULL,
            role      text,                -- NULL: the membership ended
            at        timestamptz NOT NULL
        );
        CREATE INDEX member_events_org ON accounts.member_events (org_id, at, id);
        INSERT INTO accounts.member_events (org_id, subject, role, at)
            SELECT org_id, subject, role, created_at FROM accounts.members;
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE accounts.member_events")
