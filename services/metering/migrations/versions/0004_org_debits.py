"""Usage debits per org per batch (the receipts are known before the ledger answers), and
roll-ups off the ack path.

A group commit's ledger batch is one debit per org (`ledger_batches.org_debits`), and the
ledger answers one result per org (`org_results`: the transfers and the org's available credit
before the debit). An event stores where it sits in its org's debit
(`batch_cost_before_micros`: what the org's events before it in the batch cost), so its
receipt (transfer, balance after, arrears) is derived from its batch's org result, and no event
row is updated after the ledger answers. Rows written before this keep their receipt columns.

`rolled_up_at` marks a batch whose events are in the roll-ups: a worker adds them, many
batches per transaction, and marks them in the same one.

Revision ID: 0004_ingest
Revises: 0003
"""

from alembic import op

from tally.kit.db import run_script

revision = "0004_ingest"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        ALTER TABLE metering.usage_events ADD COLUMN batch_cost_before_micros bigint;
        ALTER TABLE metering.ledger_batches ALTER COLUMN items SET DEFAULT '[]';
        ALTER TABLE metering.ledger_batches ADD COLUMN org_debits jsonb;
        ALTER TABLE metering.ledger_batches ADD COLUMN org_results jsonb;
        -- roll-ups follow committed batches off the ack path (services.metering.rollup);
        -- batches recorded before this were rolled up as they were recorded
        ALTER TABLE metering.ledger_batches ADD COLUMN rolled_up_at timestamptz;
        UPDATE metering.ledger_batches SET rolled_up_at = created_at;
        CREATE INDEX ledger_batches_unrolled ON metering.ledger_batches (created_at)
            WHERE rolled_up_at IS NULL;
        -- every group commit rewrites the rating state of its orgs: room on each page lets
        -- PostgreSQL update those rows in place (HOT, no new index entries), and a vacuum
        -- that follows sooner keeps that room
        ALTER TABLE metering.period_usage SET (fillfactor = 50,
            autovacuum_vacuum_scale_factor = 0.02);
        ALTER TABLE metering.rating_carry SET (fillfactor = 50,
            autovacuum_vacuum_scale_factor = 0.02);
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE metering.period_usage RESET (fillfactor, "
               "autovacuum_vacuum_scale_factor)")
    op.execute("ALTER TABLE metering.rating_carry RESET (fillfactor, "
               "autovacuum_vacuum_scale_factor)")
    op.execute("DROP INDEX metering.ledger_batches_unrolled")
    op.execute("ALTER TABLE metering.ledger_batches DROP COLUMN rolled_up_at, "
               "DROP COLUMN org_results, "
               "DROP COLUMN org_debits, ALTER COLUMN items DROP DEFAULT")
    op.execute("ALTER TABLE metering.usage_events DROP COLUMN batch_cost_before_micros")
