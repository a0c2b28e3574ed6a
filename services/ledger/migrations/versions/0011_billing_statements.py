"""Monthly statements and daily snapshots: both immutable once written.

- `statements`: an org's statement of a closed month, stored the first time it is computed
  (from the ledger's immutable entries) and never changed, so a finance team downloads the
  same numbers every time. The current month is computed on each request and not stored.
- `daily_snapshots`: an org's position at the end of each UTC day, written by the ledger's
  snapshot job; one row per (org, day), inserted with ON CONFLICT DO NOTHING, so several
  replicas running the job write it once.
- `transfers_org_time`: the statement and snapshot queries read an org's entries of a period.

Revision ID: billing_statements
Revises: 0010
"""

from alembic import op

from tally.kit.db import run_script

revision = "billing_statements"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE INDEX transfers_org_time ON ledger.transfers (org_id, created_at);
        CREATE TABLE ledger.statements (
            org_id        text NOT NULL,
            month         date NOT NULL,
            body          jsonb NOT NULL,
            generated_at  timestamptz NOT NULL,
            PRIMARY KEY (org_id, month)
        );
        CREATE TABLE ledger.daily_snapshots (
            org_id                text NOT NULL,
            day                   date NOT NULL,
            posted_micros         bigint NOT NULL,
            held_micros           bigint NOT NULL,
            arrears_micros        bigint NOT NULL,
            billing_state         text NOT NULL,
            credits_bought_micros bigint NOT NULL,
            usage_micros          bigint NOT NULL,
            net_change_micros     bigint NOT NULL,
            grants_by_expiry      jsonb NOT NULL DEFAULT '{}',
            written_at            timestamptz NOT NULL,
            PRIMARY KEY (org_id, day)
        );
        CREATE FUNCTION ledger.billing_records_immutable() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'ledger.% rows are immutable once written', TG_TABLE_NAME;
            END $$;
        CREATE TRIGGER statements_immutable BEFORE UPDATE OR DELETE ON ledger.statements
            FOR EACH ROW EXECUTE FUNCTION ledger.billing_records_immutable();
        CREATE TRIGGER daily_snapshots_immutable
            BEFORE UPDATE OR DELETE ON ledger.daily_snapshots
            FOR EACH ROW EXECUTE FUNCTION ledger.billing_records_immutable();
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE ledger.daily_snapshots")
    op.execute("DROP TABLE ledger.statements")
    op.execute("DROP FUNCTION ledger.billing_records_immutable()")
    op.execute("DROP INDEX ledger.transfers_org_time")
