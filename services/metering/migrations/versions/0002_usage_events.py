"""Usage events (dedup forever), the pending-ledger-batch outbox, rating carries, more roll-ups.

`usage_events` is keyed by (org, event id) forever: the database, not a cache window, decides
what is a duplicate. An event is written with its rated cost and the id of the ledger batch
that carries its debit, in the same transaction as that batch's row in `ledger_batches`; the
receipt columns (transfer id, balance after, arrears) are filled once the ledger confirms. A
batch still unposted at start-up is posted again (the ledger is idempotent on its id).

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
        CREATE TABLE metering.usage_events (
            org_id               text NOT NULL,
            event_id             text NOT NULL,
            occurred_at          timestamptz NOT NULL,
            project_id           text NOT NULL DEFAULT '',
            environment          text NOT NULL DEFAULT '',
            user_id              text NOT NULL DEFAULT '',
            api_key_id           text NOT NULL DEFAULT '',
            labels               jsonb NOT NULL DEFAULT '{}',
            provider             text NOT NULL DEFAULT '',
            model                text NOT NULL DEFAULT '',
            resolved_model       text NOT NULL DEFAULT '',
            operation            text NOT NULL DEFAULT '',
            mode                 text NOT NULL,
            region               text NOT NULL DEFAULT '',
            quantities           jsonb NOT NULL,
            reservation_id       text NOT NULL DEFAULT '',
            evidence             jsonb NOT NULL DEFAULT '{}',
            request_hash         text NOT NULL,
            cost_micros          bigint NOT NULL,
            lines                jsonb NOT NULL,
            price_book_version   bigint NOT NULL,
            ledger_batch_id      text NOT NULL,
            ledger_transfer_id   text,
            balance_after_micros bigint,
            arrears_micros       bigint,
            recorded_at          timestamptz,
            PRIMARY KEY (org_id, event_id)
        );
        CREATE INDEX usage_events_org_time ON metering.usage_events (org_id, occurred_at);
        CREATE INDEX usage_events_batch ON metering.usage_events (ledger_batch_id);

        CREATE TABLE metering.ledger_batches (
            batch_id   text PRIMARY KEY,
            items      jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            posted_at  timestamptz
        );
        CREATE INDEX ledger_batches_pending ON metering.ledger_batches (created_at)
            WHERE posted_at IS NULL;

        -- The sub-micro-credit remainder of rating, per org: charged later, never lost.
        CREATE TABLE metering.rating_carry (
            org_id      text PRIMARY KEY,
            carry_attos numeric NOT NULL
        );

        -- Month-to-date quantity per org, model ('*' = every model) and meter: what allowances
        -- and tiers count against. Kept beside the roll-ups so rating reads a handful of rows,
        -- not a month of daily roll-ups.
        CREATE TABLE metering.period_usage (
            org_id   text NOT NULL,
            month    date NOT NULL,
            model    text NOT NULL,
            meter    text NOT NULL,
            quantity bigint NOT NULL,
            PRIMARY KEY (org_id, month, model, meter)
        );

        CREATE TABLE metering.usage_hourly (
            org_id         text NOT NULL,
            hour           timestamptz NOT NULL,
            project_id     text NOT NULL DEFAULT '',
            environment    text NOT NULL DEFAULT '',
            user_id        text NOT NULL DEFAULT '',
            model          text NOT NULL DEFAULT '',
            operation      text NOT NULL DEFAULT '',
            meter          text NOT NULL,
            quantity       bigint NOT NULL DEFAULT 0,
            credits_micros bigint NOT NULL DEFAULT 0,
            event_count    bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (org_id, hour, project_id, environment, user_id, model, operation, meter)
        );

        CREATE TABLE metering.usage_daily_labels (
            org_id         text NOT NULL,
            day            date NOT NULL,
            label_key      text NOT NULL,
            label_value    text NOT NULL,
            model          text NOT NULL DEFAULT '',
            meter          text NOT NULL,
            quantity       bigint NOT NULL DEFAULT 0,
            credits_micros bigint NOT NULL DEFAULT 0,
            event_count    bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (org_id, day, label_key, label_value, model, meter)
        );
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE metering.usage_daily_labels, metering.usage_hourly, metering.period_usage, "
        "metering.rating_carry, "
        "metering.ledger_batches, metering.usage_events"
    )
