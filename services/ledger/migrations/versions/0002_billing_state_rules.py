"""Billing states follow the money unless an operator pins them.

`billing_state_pinned` is set when an operator sets THROTTLED or READ_ONLY by hand (an overdue
invoice, fraud review): the automatic rules (arrears -> READ_ONLY, prepaid balance exhausted ->
THROTTLED, otherwise ACTIVE) leave a pinned org alone until an operator sets it ACTIVE again.
Since states now move with balances, the state right after a transfer or a settled reservation
is stored with it, so a replay answers exactly what the original call did.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ledger.accounts "
               "ADD COLUMN billing_state_pinned boolean NOT NULL DEFAULT false")
    op.execute("ALTER TABLE ledger.transfers ADD COLUMN org_billing_state_after text")
    op.execute("ALTER TABLE ledger.reservations ADD COLUMN settled_billing_state text")


def downgrade() -> None:
    op.execute("ALTER TABLE ledger.reservations DROP COLUMN settled_billing_state")
    op.execute("ALTER TABLE ledger.transfers DROP COLUMN org_billing_state_after")
    op.execute("ALTER TABLE ledger.accounts DROP COLUMN billing_state_pinned")
