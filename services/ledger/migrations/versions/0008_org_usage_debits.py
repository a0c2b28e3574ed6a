"""Usage debits per org per batch: the results of each batch, kept to answer its replays.

A PostUsageBatch of org debits writes no per-event rows (metering's event table is the
per-event record; the ledger's idempotency is the batch id): one row per batch holds what
each org's debit did, in the request's order, as arrays.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

from tally.kit.db import run_script

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.usage_batch_results (
            batch_id              text PRIMARY KEY,
            org_ids               text[] NOT NULL,
            transfer_ids          text[] NOT NULL,
            arrears_transfer_ids  text[] NOT NULL,
            debited_micros        bigint[] NOT NULL,
            arrears_micros        bigint[] NOT NULL,
            available_before_micros bigint[] NOT NULL,
            balance_after_micros  bigint[] NOT NULL,
            created_at            timestamptz NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE ledger.usage_batch_results")
