"""A hold remembers the org's billing state when it was made.

Reserve answers with the org's billing state (metering applies the THROTTLED rate cap from
it); a replay of the Reserve must answer the same state, so it is stored with the hold.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ledger.reservations ADD COLUMN reserved_billing_state text")


def downgrade() -> None:
    op.execute("ALTER TABLE ledger.reservations DROP COLUMN reserved_billing_state")
