"""Held credit and billing state as of any instant, for daily snapshots taken at midnight.

Holds change without ledger entries, so the entries alone cannot say what was held at a
cutoff. Reservations already keep when they were made and settled; leases keep only their
current counters, so:

- `lease_holds`: every change of a lease's hold (granted - consumed - returned) as a delta,
  appended by a trigger on `ledger.leases` (the one place lease rows are written), stamped
  with the lease row's `updated_at` (the writing transaction's clock, like entries'
  `created_at`). Held at T = reservations made before T and not settled before T, plus the
  leases' deltas stamped before T. Deltas, not the hold after: a transaction stamped earlier
  can commit later than one stamped after it (the clock is read before the row lock), and a
  sum does not depend on that order, as statements' positions are sums of entries.
- `billing_state_changes.seq`: the order changes were written in, under the org's row lock
  (so the commit order of one org's changes); the state at T is the last one written of
  those stamped before T.
- `usage_batch_results_time`: statements and Reconcile read a month's usage batches.
- `reservations_org_settled`: an org's reservations open at T, without reading its history.

Revision ID: holds_as_of_a_cutoff
Revises: local_provider_events
"""

from alembic import op

from tally.kit.db import run_script

revision = "holds_as_of_a_cutoff"
down_revision = "local_provider_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.lease_holds (
            seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            lease_id     text NOT NULL,
            org_id       text NOT NULL,
            at           timestamptz NOT NULL,
            delta_micros bigint NOT NULL
        );
        CREATE INDEX lease_holds_org_time ON ledger.lease_holds (org_id, at);
        INSERT INTO ledger.lease_holds (lease_id, org_id, at, delta_micros)
            SELECT lease_id, org_id, updated_at,
                   granted_micros - consumed_micros - returned_micros
            FROM ledger.leases ORDER BY updated_at;
        CREATE FUNCTION ledger.lease_hold_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            INSERT INTO ledger.lease_holds (lease_id, org_id, at, delta_micros)
            VALUES (NEW.lease_id, NEW.org_id, NEW.updated_at,
                    NEW.granted_micros - NEW.consumed_micros - NEW.returned_micros
                    - CASE WHEN TG_OP = 'UPDATE' THEN OLD.granted_micros
                           - OLD.consumed_micros - OLD.returned_micros ELSE 0 END);
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER lease_hold_inserted AFTER INSERT ON ledger.leases
            FOR EACH ROW EXECUTE FUNCTION ledger.lease_hold_changed();
        CREATE TRIGGER lease_hold_updated AFTER UPDATE ON ledger.leases
            FOR EACH ROW WHEN (NEW.granted_micros - NEW.consumed_micros - NEW.returned_micros
                               IS DISTINCT FROM
                               OLD.granted_micros - OLD.consumed_micros - OLD.returned_micros)
            EXECUTE FUNCTION ledger.lease_hold_changed();
        ALTER TABLE ledger.billing_state_changes
            ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
        CREATE INDEX billing_state_changes_org_seq
            ON ledger.billing_state_changes (org_id, seq);
        CREATE INDEX usage_batch_results_time ON ledger.usage_batch_results (created_at);
        -- reservations still open at T: settled at or after T (or not yet), made before T
        CREATE INDEX reservations_org_settled ON ledger.reservations
            (org_id, coalesce(settled_at, 'infinity'::timestamptz));
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX ledger.reservations_org_settled")
    op.execute("DROP INDEX ledger.usage_batch_results_time")
    op.execute("DROP INDEX ledger.billing_state_changes_org_seq")
    op.execute("ALTER TABLE ledger.billing_state_changes DROP COLUMN seq")
    op.execute("DROP TRIGGER lease_hold_updated ON ledger.leases")
    op.execute("DROP TRIGGER lease_hold_inserted ON ledger.leases")
    op.execute("DROP FUNCTION ledger.lease_hold_changed()")
    op.execute("DROP TABLE ledger.lease_holds")
