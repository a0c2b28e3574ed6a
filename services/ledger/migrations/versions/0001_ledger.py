"""The ledger: accounts, immutable transfers, grants, reservations, usage receipts, outbox.

Revision ID: 0001
Revises:
"""

from alembic import op

from tally.kit.db import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        -- Balances are signed: a transfer subtracts from its debit account and adds to its
        -- credit account, so the sum over all accounts is always zero.
        CREATE TABLE ledger.accounts (
            account_id     text PRIMARY KEY,
            kind           text NOT NULL,
            org_id         text,
            balance_micros bigint NOT NULL DEFAULT 0,
            held_micros    bigint NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
            billing_state  text NOT NULL DEFAULT 'ACTIVE',
            last_hash      text NOT NULL DEFAULT repeat('0', 64),
            created_at     timestamptz NOT NULL DEFAULT now(),
            -- The last line of defence; the store refuses overdrafts before reaching it.
            CONSTRAINT org_credit_never_overdrawn
                CHECK (kind <> 'ORG_CREDIT' OR balance_micros - held_micros >= 0)
        );
        -- System accounts are sharded (domain.SYSTEM_SHARDS = 16) so that orgs debiting at
        -- the same time do not all wait on one row lock.
        INSERT INTO ledger.accounts (account_id, kind)
        SELECT base || '#' || shard, kind
          FROM (VALUES ('sys:payments_clearing', 'PAYMENTS_CLEARING'),
                       ('sys:revenue', 'REVENUE'),
                       ('sys:bonus_expense', 'BONUS_EXPENSE'),
                       ('sys:promotional_expense', 'PROMOTIONAL_EXPENSE'),
                       ('sys:refunds', 'REFUNDS'),
                       ('sys:adjustments', 'ADJUSTMENTS'),
                       ('sys:expiry', 'EXPIRY')) AS system(base, kind),
               generate_series(0, 15) AS shard;

        -- Claims of client-chosen ids: the first statement of every mutating transaction, so
        -- a concurrent duplicate waits for the first and then sees it (replay, never re-apply).
        CREATE TABLE ledger.idempotency_keys (
            key          text PRIMARY KEY,
            request_hash text NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE ledger.transfers (
            seq                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            transfer_id          text NOT NULL UNIQUE,
            kind                 text NOT NULL,
            debit_account_id     text NOT NULL,
            credit_account_id    text NOT NULL,
            org_id               text NOT NULL,
            amount_micros        bigint NOT NULL CHECK (amount_micros > 0),
            actor                text NOT NULL,
            reason               text NOT NULL DEFAULT '',
            trace_id             text NOT NULL DEFAULT '',
            user_id              text NOT NULL DEFAULT '',
            labels               jsonb NOT NULL DEFAULT '{}',
            grant_id             text NOT NULL DEFAULT '',
            reservation_id       text NOT NULL DEFAULT '',
            reverses_transfer_id text NOT NULL DEFAULT '',
            payment_order_id     text NOT NULL DEFAULT '',
            org_posted_after     bigint NOT NULL,
            org_held_after       bigint NOT NULL,
            org_arrears_after    bigint NOT NULL,
            created_at           timestamptz NOT NULL,
            prev_hash            text NOT NULL,
            entry_hash           text NOT NULL
        );
        CREATE INDEX transfers_org_newest ON ledger.transfers (org_id, seq DESC);
        CREATE UNIQUE INDEX transfers_reversed_once ON ledger.transfers (reverses_transfer_id)
            WHERE reverses_transfer_id <> '';

        -- Entries are never updated or deleted (DESIGN §3): corrections are new transfers.
        CREATE FUNCTION ledger.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'ledger.% is append-only', TG_TABLE_NAME;
        END $$;
        CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON ledger.transfers
            FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

        CREATE TABLE ledger.transfer_batches (
            batch_id     text PRIMARY KEY,
            transfer_ids text[] NOT NULL
        );

        CREATE TABLE ledger.grants (
            grant_id           text PRIMARY KEY,
            org_id             text NOT NULL,
            kind               text NOT NULL,
            priority           int NOT NULL,
            original_micros    bigint NOT NULL CHECK (original_micros > 0),
            remaining_micros   bigint NOT NULL CHECK (remaining_micros >= 0),
            expires_at         timestamptz,
            source_transfer_id text NOT NULL,
            created_at         timestamptz NOT NULL
        );
        CREATE INDEX grants_org_open ON ledger.grants (org_id) WHERE remaining_micros > 0;
        CREATE INDEX grants_expiring ON ledger.grants (expires_at)
            WHERE remaining_micros > 0 AND expires_at IS NOT NULL;

        CREATE TABLE ledger.reservations (
            reservation_id      text PRIMARY KEY,
            org_id              text NOT NULL,
            amount_micros       bigint NOT NULL CHECK (amount_micros > 0),
            state               text NOT NULL,
            expires_at          timestamptz NOT NULL,
            captured_micros     bigint NOT NULL DEFAULT 0,
            arrears_micros      bigint NOT NULL DEFAULT 0,
            capture_transfer_id text NOT NULL DEFAULT '',
            created_at          timestamptz NOT NULL,
            settled_at          timestamptz,
            -- what the original Reserve / Capture / Release answered, for exact replays
            reserved_available_micros bigint NOT NULL,
            settled_posted_micros     bigint,
            settled_held_micros       bigint,
            settled_arrears_micros    bigint
        );
        CREATE INDEX reservations_expiring ON ledger.reservations (expires_at)
            WHERE state = 'HELD';

        -- One receipt per usage event, forever: the event-level idempotency record.
        CREATE TABLE ledger.usage_receipts (
            org_id               text NOT NULL,
            event_id             text NOT NULL,
            batch_id             text NOT NULL,
            transfer_id          text NOT NULL,
            cost_micros          bigint NOT NULL,
            debited_micros       bigint NOT NULL,
            arrears_micros       bigint NOT NULL,
            balance_after_micros bigint NOT NULL,
            PRIMARY KEY (org_id, event_id)
        );

        CREATE TABLE ledger.billing_state_changes (
            request_id     text PRIMARY KEY,
            org_id         text NOT NULL,
            previous_state text NOT NULL,
            state          text NOT NULL,
            cause          text NOT NULL,
            actor          text NOT NULL,
            changed_at     timestamptz NOT NULL
        );

        -- Written in the same transaction as every balance change; relayed at least once.
        -- `sequence` is given by the sealer (store.seal_outbox) only to rows of transactions
        -- older than every transaction still running, in (txid, id) order: so sequences only
        -- ever grow in commit-safe order and a consumer resuming "after N" misses nothing,
        -- without writers taking any shared lock.
        CREATE TABLE ledger.outbox (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
            sequence    bigint UNIQUE,
            event_id    text NOT NULL UNIQUE,
            org_id      text NOT NULL,
            type        text NOT NULL,
            occurred_at timestamptz NOT NULL,
            trace_id    text NOT NULL DEFAULT '',
            available_micros_after bigint NOT NULL,
            arrears_micros bigint NOT NULL,
            billing_state text NOT NULL,
            attributes  jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX outbox_unsealed ON ledger.outbox (txid, id) WHERE sequence IS NULL;
        """
    )


def downgrade() -> None:
    op.execute("DROP SCHEMA ledger CASCADE")
