"""Cheaper writes for usage batches: balance and grant updates stay on their heap page (HOT
updates), and an outbox row is written into one index fewer.

Every usage batch rewrites the balance of each org it touches and the remaining credit of the
grant it burns, and appends an outbox row per org. An update can skip every index (a heap-only
tuple) only if no indexed value changes and the new version fits on the same page:
- accounts and grants leave half of each page free for the next versions of its rows
  (fillfactor; applies to pages written from now on);
- the grant indexes were partial on `remaining_micros > 0`, so every burn changed an indexed
  value and wrote a new entry into all three indexes. They are now partial on `is_open`, a
  stored column generated from the same condition, which changes only when a grant is
  exhausted.
The outbox's unique `sequence` was a constraint indexing every row, though a row only gets a
sequence when it is sealed; it is now a unique index of the sealed rows alone (NULLs were never
constrained, so what it allows is unchanged).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ledger.accounts SET (fillfactor = 50)")
    op.execute("ALTER TABLE ledger.grants SET (fillfactor = 50)")
    op.execute("ALTER TABLE ledger.grants "
               "ADD COLUMN is_open boolean GENERATED ALWAYS AS (remaining_micros > 0) STORED")
    op.execute("DROP INDEX ledger.grants_org_open")
    op.execute("CREATE INDEX grants_org_open ON ledger.grants (org_id) WHERE is_open")
    op.execute("DROP INDEX ledger.grants_expiring")
    op.execute("CREATE INDEX grants_expiring ON ledger.grants (expires_at) "
               "WHERE is_open AND expires_at IS NOT NULL")
    op.execute("ALTER TABLE ledger.outbox DROP CONSTRAINT outbox_sequence_key")
    op.execute("CREATE UNIQUE INDEX outbox_sequence_key ON ledger.outbox (sequence) "
               "WHERE sequence IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP INDEX ledger.outbox_sequence_key")
    op.execute("ALTER TABLE ledger.outbox ADD CONSTRAINT outbox_sequence_key UNIQUE (sequence)")
    op.execute("DROP INDEX ledger.grants_expiring")
    op.execute("DROP INDEX ledger.grants_org_open")
    op.execute("ALTER TABLE ledger.grants DROP COLUMN is_open")
    op.execute("CREATE INDEX grants_org_open ON ledger.grants (org_id) WHERE remaining_micros > 0")
    op.execute("CREATE INDEX grants_expiring ON ledger.grants (expires_at) "
               "WHERE remaining_micros > 0 AND expires_at IS NOT NULL")
    op.execute("ALTER TABLE ledger.grants RESET (fillfactor)")
    op.execute("ALTER TABLE ledger.accounts RESET (fillfactor)")
