"""Audit retention: where each org's chain resumes after its oldest records were archived
and deleted (services/accounts/audit.py).

Revision ID: identity_audit_retention
Revises: identity_audit_outbox
"""

from alembic import op

revision = "identity_audit_retention"
down_revision = "identity_audit_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE accounts.audit_checkpoints (org_id text PRIMARY KEY, "
               "sequence bigint NOT NULL, hash text NOT NULL, archive text NOT NULL, "
               "expired_at timestamptz NOT NULL DEFAULT now())")


def downgrade() -> None:
    op.execute("DROP TABLE accounts.audit_checkpoints")
