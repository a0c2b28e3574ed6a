"""Price books: the request fingerprint behind PublishPriceBook's idempotency.

A replay of a publish with the same request_id must return the original book, and the same
request_id with a different payload must fail (IDEMPOTENCY_KEY_REUSED); the body alone cannot
tell the two apart (the server fills in effective_from when the request leaves it unset).

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
        ALTER TABLE pricing.price_books
            ADD COLUMN request_hash text NOT NULL DEFAULT '';
        ALTER TABLE pricing.price_books
            ADD CONSTRAINT price_books_effective_unique UNIQUE (effective_from);
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE pricing.price_books DROP CONSTRAINT price_books_effective_unique")
    op.execute("ALTER TABLE pricing.price_books DROP COLUMN request_hash")
