"""Orgs that require single sign-on for their people.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE accounts.orgs ADD COLUMN sso_required boolean NOT NULL "
               "DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE accounts.orgs DROP COLUMN sso_required")
