"""Price books: every published version, kept forever.

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
        CREATE TABLE pricing.price_books (
            version        bigint PRIMARY KEY,
            effective_from timestamptz NOT NULL,
            published_at   timestamptz NOT NULL DEFAULT now(),
            published_by   text NOT NULL,
            request_id     text NOT NULL UNIQUE,
            body           jsonb NOT NULL
        );
        CREATE INDEX price_books_effective ON pricing.price_books (effective_from DESC);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE pricing.price_books")
