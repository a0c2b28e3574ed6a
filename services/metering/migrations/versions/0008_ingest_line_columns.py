"""Usage events carry their receipt lines as arrays, not JSON: the roll-ups read them as columns.

`meters`, `meter_quantities`, `meter_costs`, `line_rates` and `line_per_units` hold an event's
receipt lines, one element per metered quantity, in receipt order (rating's meter order). The
roll-up unnests them instead of unpacking JSON per event, and the ack path writes no JSON for
them. `lines` is NULL on such rows, and so is `quantities` unless the event reported its meters
in another order (the event as reported keeps that order). Rows written before keep their
JSON; those of batches not yet rolled up get the arrays here, as the roll-up reads only them.
`request_hash` is '' on new rows: a replay compares its fingerprint with the stored event's,
computed when needed, so the ack path hashes nothing. (A downgrade restores the JSON columns
but cannot restore those hashes: the code before this would refuse replays of such events as
a reused id.)

Revision ID: 0006_ingest_line_columns
Revises: identity_audit_outbox
"""

from alembic import op

from tally.kit.db import run_script

revision = "0006_ingest_line_columns"
down_revision = "identity_audit_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        ALTER TABLE metering.usage_events
            ADD COLUMN meters text[],
            ADD COLUMN meter_quantities bigint[],
            ADD COLUMN meter_costs bigint[],
            ADD COLUMN line_rates text[],
            ADD COLUMN line_per_units bigint[],
            ALTER COLUMN lines DROP NOT NULL,
            ALTER COLUMN quantities DROP NOT NULL;
        UPDATE metering.usage_events e SET
            meters = ARRAY(SELECT l->>0 FROM jsonb_array_elements(e.lines) WITH ORDINALITY
                           AS x(l, n) ORDER BY n),
            meter_quantities = ARRAY(SELECT (l->>1)::bigint FROM jsonb_array_elements(e.lines)
                                     WITH ORDINALITY AS x(l, n) ORDER BY n),
            meter_costs = ARRAY(SELECT (l->>4)::bigint FROM jsonb_array_elements(e.lines)
                                WITH ORDINALITY AS x(l, n) ORDER BY n),
            line_rates = ARRAY(SELECT l->>2 FROM jsonb_array_elements(e.lines) WITH ORDINALITY
                               AS x(l, n) ORDER BY n),
            line_per_units = ARRAY(SELECT (l->>3)::bigint FROM jsonb_array_elements(e.lines)
                                   WITH ORDINALITY AS x(l, n) ORDER BY n)
        FROM metering.ledger_batches b
        WHERE b.batch_id = e.ledger_batch_id AND b.rolled_up_at IS NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE metering.usage_events SET
            lines = coalesce(lines, (SELECT jsonb_agg(jsonb_build_array(m, q, r, p, c)
                                                      ORDER BY n)
                                     FROM unnest(meters, meter_quantities, line_rates,
                                                 line_per_units, meter_costs)
                                     WITH ORDINALITY AS x(m, q, r, p, c, n))),
            quantities = coalesce(quantities, (SELECT jsonb_agg(jsonb_build_array(m, q)
                                                                ORDER BY n)
                                               FROM unnest(meters, meter_quantities)
                                               WITH ORDINALITY AS x(m, q, n)))
        WHERE meters IS NOT NULL
        """
    )
    op.execute(
        "ALTER TABLE metering.usage_events ALTER COLUMN lines SET NOT NULL, "
        "ALTER COLUMN quantities SET NOT NULL, DROP COLUMN meters, DROP COLUMN meter_quantities, "
        "DROP COLUMN meter_costs, DROP COLUMN line_rates, DROP COLUMN line_per_units")
