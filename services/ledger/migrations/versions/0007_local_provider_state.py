"""The local (development) payment provider's checkout sessions, charges and refunds, so that
several ledger replicas running it share them: a checkout opened through one replica can be
paid on another's page, and two replicas acting on one payment wait for each other's row lock.

`body` is the provider's own record of a payment (local_store.LocalPayment as JSON); the
columns beside it are what it is looked up by. Nothing here is money: the ledger learns of a
payment only from the provider's signed webhook, as from any provider.

Revision ID: 0007
Revises: 0006
"""

from tally.kit.db import run_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.local_provider_payments (
            session_id        text PRIMARY KEY,
            payment_intent_id text NOT NULL UNIQUE,
            payment_order_id  text NOT NULL,
            is_checkout       boolean NOT NULL,
            created_at        double precision NOT NULL,
            is_open           boolean NOT NULL,
            body              jsonb NOT NULL,
            UNIQUE (payment_order_id, is_checkout)
        );
        CREATE INDEX local_provider_open_checkouts ON ledger.local_provider_payments
            (created_at) WHERE is_checkout AND is_open;
        CREATE TABLE ledger.local_provider_refunds (
            idempotency_key text PRIMARY KEY,
            session_id      text NOT NULL,
            refund_id       text NOT NULL,
            amount_minor    bigint NOT NULL
        );
        """
    )


def downgrade() -> None:
    run_script(
        """
        DROP TABLE ledger.local_provider_refunds;
        DROP TABLE ledger.local_provider_payments;
        """
    )
