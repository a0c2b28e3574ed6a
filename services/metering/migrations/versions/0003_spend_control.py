"""Spend control: budgets and what they have spent and hold, quotas, spend policies,
authorizations, budget alarms and metering's outbox.

A budget's `budget_usage` row for the current period is what Authorize locks: spent plus
reserved plus the new estimate must fit the limit, so parallel requests cannot overshoot.
An authorization records the holds it placed on budgets so the usage event that captures it
(or the sweeper, at its ttl) moves them from reserved to spent (or frees them) exactly once.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from tally.kit.db import run_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE metering.budgets (
            budget_id                text PRIMARY KEY,
            org_id                   text NOT NULL,
            name                     text NOT NULL,
            scope                    text NOT NULL,      -- ORG | PROJECT | LABEL
            scope_value              text NOT NULL DEFAULT '',
            period                   text NOT NULL,      -- MONTHLY | CUSTOM
            period_start             timestamptz,        -- CUSTOM only
            period_end               timestamptz,        -- CUSTOM only
            limit_micros             bigint NOT NULL CHECK (limit_micros > 0),
            alarm_thresholds_percent integer[] NOT NULL DEFAULT '{50,80,100}',
            enforcement              text NOT NULL,      -- HARD | SOFT_DOWNGRADE | ALERT_ONLY
            downgrade_at_percent     integer NOT NULL DEFAULT 0,
            created_at               timestamptz NOT NULL DEFAULT now(),
            updated_at               timestamptz NOT NULL DEFAULT now(),
            deleted_at               timestamptz
        );
        CREATE INDEX budgets_of_org ON metering.budgets (org_id, created_at, budget_id)
            WHERE deleted_at IS NULL;

        CREATE TABLE metering.budget_usage (
            budget_id       text NOT NULL,
            period_start    timestamptz NOT NULL,
            spent_micros    bigint NOT NULL DEFAULT 0,
            reserved_micros bigint NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
            PRIMARY KEY (budget_id, period_start)
        );

        -- Each threshold fires once per budget and period, forever (the key says so).
        CREATE TABLE metering.budget_alarms (
            budget_id         text NOT NULL,
            period_start      timestamptz NOT NULL,
            threshold_percent integer NOT NULL,
            spent_micros      bigint NOT NULL,
            fired_at          timestamptz NOT NULL,
            PRIMARY KEY (budget_id, period_start, threshold_percent)
        );

        CREATE TABLE metering.quotas (
            quota_id                      text PRIMARY KEY,
            org_id                        text NOT NULL,
            scope                         text NOT NULL,  -- ORG | PROJECT | ENVIRONMENT | API_KEY
            scope_value                   text NOT NULL DEFAULT '',
            kind                          text NOT NULL,
            limit_value                   bigint NOT NULL CHECK (limit_value > 0),
            burst                         bigint NOT NULL DEFAULT 0 CHECK (burst >= 0),
            enforcement                   text NOT NULL,  -- HARD | SOFT
            long_context_threshold_tokens bigint NOT NULL DEFAULT 0,
            created_at                    timestamptz NOT NULL DEFAULT now(),
            updated_at                    timestamptz NOT NULL DEFAULT now(),
            deleted_at                    timestamptz
        );
        CREATE INDEX quotas_of_org ON metering.quotas (org_id, created_at, quota_id)
            WHERE deleted_at IS NULL;

        CREATE TABLE metering.spend_policies (
            org_id                        text PRIMARY KEY,
            max_context_tokens            bigint NOT NULL DEFAULT 0,
            max_upload_bytes              bigint NOT NULL DEFAULT 0,
            long_context_threshold_tokens bigint NOT NULL DEFAULT 0,
            throttled_requests_per_second bigint NOT NULL DEFAULT 0,
            updated_at                    timestamptz NOT NULL DEFAULT now(),
            updated_by                    text NOT NULL DEFAULT ''
        );

        -- Management writes are idempotent on the client's request id.
        CREATE TABLE metering.admin_requests (
            request_id   text PRIMARY KEY,
            request_hash text NOT NULL,
            result       jsonb NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE metering.authorizations (
            org_id          text NOT NULL,
            request_id      text NOT NULL,
            request_hash    text NOT NULL,
            decision        text NOT NULL,               -- ALLOW | DOWNGRADE | DENY
            reservation_id  text NOT NULL DEFAULT '',
            reserved_micros bigint NOT NULL DEFAULT 0,
            budget_holds    jsonb NOT NULL DEFAULT '[]',  -- [[budget_id, period_start, micros]]
            state           text NOT NULL,               -- HELD | CAPTURED | RELEASED | DENIED
            expires_at      timestamptz,
            response        jsonb NOT NULL,              -- the answer, for exact replays
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (org_id, request_id)
        );
        CREATE UNIQUE INDEX authorizations_by_reservation
            ON metering.authorizations (reservation_id) WHERE reservation_id <> '';
        CREATE INDEX authorizations_held_expiry ON metering.authorizations (expires_at)
            WHERE state = 'HELD';

        -- Budget alarms for the notifier; sealed in commit order like the ledger's outbox.
        CREATE TABLE metering.outbox (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
            sequence    bigint UNIQUE,
            event_id    text NOT NULL UNIQUE,
            org_id      text NOT NULL,
            type        text NOT NULL,
            occurred_at timestamptz NOT NULL,
            trace_id    text NOT NULL DEFAULT '',
            attributes  jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX outbox_unsealed ON metering.outbox (txid, id) WHERE sequence IS NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE metering.outbox, metering.authorizations, metering.admin_requests, "
        "metering.spend_policies, metering.quotas, metering.budget_alarms, "
        "metering.budget_usage, metering.budgets"
    )
