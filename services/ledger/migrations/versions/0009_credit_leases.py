"""Credit leases: a holder's (metering's) hold on a slice of an org's available credit.

A lease's hold is granted - consumed - returned, and it is part of the org account's
held_micros, so available = posted - held stays exact. All four counters only grow: the
holder compares them with its own (see services/ledger/leases.py). Also: inserts into the
outbox NOTIFY `ledger_outbox`, so its sealer waits instead of polling.

Revision ID: 0006_leases
Revises: 0008
"""

from alembic import op

from tally.kit.db import run_script

revision = "0006_leases"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.leases (
            lease_id         text PRIMARY KEY,
            org_id           text NOT NULL,
            holder           text NOT NULL,
            granted_micros   bigint NOT NULL DEFAULT 0,
            charged_micros   bigint NOT NULL DEFAULT 0,
            consumed_micros  bigint NOT NULL DEFAULT 0,
            returned_micros  bigint NOT NULL DEFAULT 0,
            in_flight_micros bigint NOT NULL DEFAULT 0,
            state            text NOT NULL,               -- OPEN | ENDED
            expires_at       timestamptz NOT NULL,
            created_at       timestamptz NOT NULL,
            updated_at       timestamptz NOT NULL,
            CHECK (granted_micros - consumed_micros - returned_micros >= 0)
        );
        CREATE INDEX leases_open_by_org ON ledger.leases (org_id) WHERE state = 'OPEN';
        CREATE INDEX leases_open_expiry ON ledger.leases (expires_at) WHERE state = 'OPEN';

        -- The outbox sealer waits for this instead of polling (kit.background.run_when_notified).
        CREATE FUNCTION ledger.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM pg_notify('ledger_outbox', '');
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER outbox_notify AFTER INSERT ON ledger.outbox
            FOR EACH STATEMENT EXECUTE FUNCTION ledger.outbox_notify();
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER outbox_notify ON ledger.outbox")
    op.execute("DROP FUNCTION ledger.outbox_notify")
    op.execute("DROP TABLE ledger.leases")
