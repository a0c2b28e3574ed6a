"""The audit log: every audited call of every service, one hash chain per org.

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
        CREATE TABLE accounts.audit_log (
            org_id          text NOT NULL,      -- '' = the platform chain
            sequence        bigint NOT NULL,
            record_id       text NOT NULL UNIQUE,
            at              timestamptz NOT NULL,
            principal       text NOT NULL,
            verified_by     text NOT NULL,
            service         text NOT NULL,
            rpc             text NOT NULL,
            target_ids      text[] NOT NULL,
            request_sha256  text NOT NULL,
            peer            text NOT NULL,
            outcome         text NOT NULL,
            prev_hash       text NOT NULL,
            hash            text NOT NULL,
            PRIMARY KEY (org_id, sequence)
        );
        CREATE INDEX audit_log_time ON accounts.audit_log (org_id, at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE accounts.audit_log")
