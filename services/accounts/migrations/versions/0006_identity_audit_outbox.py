"""The audit outbox: records of audited calls, written before the call answers and shipped
to accounts' AppendAudit by a background sender (tally.kit.audit).

Revision ID: identity_audit_outbox
Revises: 0005
"""

from alembic import op

revision = "identity_audit_outbox"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE accounts.audit_outbox (seq bigserial PRIMARY KEY, "
               "record_id text NOT NULL UNIQUE, record jsonb NOT NULL, "
               "written_at timestamptz NOT NULL DEFAULT now())")


def downgrade() -> None:
    op.execute("DROP TABLE accounts.audit_outbox")
