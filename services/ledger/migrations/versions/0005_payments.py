"""Payments: orders, the provider events that settle them, refunds, automatic top-up.

- `payment_orders` holds each order's current state; every transition is also appended to
  `payment_order_history` (who, when, why), so the audit trail is never rewritten.
- `provider_events` is keyed by (provider, event_id) and written in the transaction that acts
  on the event: a redelivered webhook finds its row and changes nothing (exactly once).
- At most one automatic top-up is in flight per org: a unique index over PENDING AUTO_TOP_UP
  orders, so even racing workers on several replicas cannot open a second one.
- A refund's credit is reversed first; the money goes back through the provider after the
  commit (no lock is held during a network call), retried until the provider confirms it.
- `auto_top_ups` is an org's configuration plus the counters its rules need (consecutive
  failures, the day a max_per_day refusal was last reported).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from tally.kit.db import run_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.payment_orders (
            payment_order_id     text PRIMARY KEY,
            org_id               text NOT NULL,
            kind                 text NOT NULL,
            state                text NOT NULL,
            amount_minor         bigint NOT NULL CHECK (amount_minor > 0),
            currency             text NOT NULL,
            credits_micros       bigint NOT NULL CHECK (credits_micros > 0),
            bonus_credits_micros bigint NOT NULL CHECK (bonus_credits_micros >= 0),
            package_id           text NOT NULL DEFAULT '',
            price_book_version   bigint NOT NULL DEFAULT 0,
            billing_profile_id   text NOT NULL DEFAULT '',
            provider             text NOT NULL,
            provider_session_id  text NOT NULL DEFAULT '',
            checkout_url         text NOT NULL DEFAULT '',
            failure_reason       text NOT NULL DEFAULT '',
            manual_method        text NOT NULL DEFAULT '',
            reference            text NOT NULL DEFAULT '',
            created_by           text NOT NULL,
            approved_by          text NOT NULL DEFAULT '',
            credit_transfer_id   text NOT NULL DEFAULT '',
            refunded_minor       bigint NOT NULL DEFAULT 0,
            refunded_micros      bigint NOT NULL DEFAULT 0,
            bonus_forfeited_micros bigint NOT NULL DEFAULT 0,
            created_at           timestamptz NOT NULL,
            settled_at           timestamptz,
            CHECK (refunded_micros <= credits_micros),
            CHECK (refunded_minor <= amount_minor)
        );
        CREATE INDEX payment_orders_org ON ledger.payment_orders (org_id, created_at DESC);
        CREATE UNIQUE INDEX payment_orders_one_top_up_in_flight
            ON ledger.payment_orders (org_id) WHERE kind = 'AUTO_TOP_UP' AND state = 'PENDING';
        CREATE INDEX payment_orders_session ON ledger.payment_orders (provider_session_id)
            WHERE provider_session_id <> '';

        CREATE TABLE ledger.payment_order_history (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            payment_order_id text NOT NULL,
            org_id           text NOT NULL,
            state            text NOT NULL,
            actor            text NOT NULL,
            cause            text NOT NULL,
            trace_id         text NOT NULL DEFAULT '',
            at               timestamptz NOT NULL
        );
        CREATE INDEX payment_order_history_order
            ON ledger.payment_order_history (payment_order_id, id);

        CREATE TABLE ledger.provider_events (
            provider         text NOT NULL,
            event_id         text NOT NULL,
            type             text NOT NULL,
            payment_order_id text NOT NULL,
            outcome          text NOT NULL,
            payload_sha256   text NOT NULL,
            received_at      timestamptz NOT NULL,
            PRIMARY KEY (provider, event_id)
        );

        CREATE TABLE ledger.refunds (
            refund_id              text PRIMARY KEY,
            payment_order_id       text NOT NULL,
            org_id                 text NOT NULL,
            reversed_micros        bigint NOT NULL,
            bonus_forfeited_micros bigint NOT NULL,
            provider_refund_minor  bigint NOT NULL,
            -- the money's way back: PENDING until the provider confirms (retried), DONE, or
            -- NONE when there is nothing to return through a provider (manual, zero)
            provider_state         text NOT NULL,
            provider_refund_id     text NOT NULL DEFAULT '',
            provider_attempts      integer NOT NULL DEFAULT 0,
            provider_error         text NOT NULL DEFAULT '',
            transfer_id            text NOT NULL,
            reason                 text NOT NULL,
            actor                  text NOT NULL,
            created_at             timestamptz NOT NULL
        );
        CREATE INDEX refunds_order ON ledger.refunds (payment_order_id);
        CREATE INDEX refunds_provider_pending ON ledger.refunds (created_at)
            WHERE provider_state = 'PENDING';

        CREATE TABLE ledger.auto_top_ups (
            org_id               text PRIMARY KEY,
            enabled              boolean NOT NULL,
            threshold_micros     bigint NOT NULL,
            package_id           text NOT NULL DEFAULT '',
            custom_amount_minor  bigint NOT NULL DEFAULT 0,
            custom_currency      text NOT NULL DEFAULT '',
            max_per_day          integer NOT NULL,
            billing_profile_id   text NOT NULL DEFAULT '',
            payment_method_id    text NOT NULL DEFAULT '',
            updated_at           timestamptz NOT NULL,
            updated_by           text NOT NULL,
            attempts             bigint NOT NULL DEFAULT 0,
            consecutive_failures integer NOT NULL DEFAULT 0,
            -- the org is THROTTLED because its top-ups kept failing; a payment lifts it
            throttling           boolean NOT NULL DEFAULT false,
            -- available credit was below the threshold at the last event seen (LOW_BALANCE
            -- is emitted on the crossing only)
            below_threshold      boolean NOT NULL DEFAULT false,
            limit_reported_on    date
        );

        -- Where the automatic top-up follower is in the outbox (one row per consumer).
        CREATE TABLE ledger.outbox_cursors (
            consumer text PRIMARY KEY,
            sequence bigint NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE ledger.outbox_cursors, ledger.auto_top_ups, ledger.refunds, "
        "ledger.provider_events, ledger.payment_order_history, ledger.payment_orders"
    )
