"""The hash chain covers every stored field of an entry (hash version 2).

Version 1 hashed ids, kind, accounts, org, amount, actor, reason and time only: labels, user,
grant, reservation, reversal, payment order, trace id and the balances after could be
rewritten in the database without VerifyLedger noticing. Entries are now hashed under
version 2 (domain.canonical_entry), which covers them all.

Existing rows are re-chained under version 2, in each org's order, by the domain's own
encoding (never SQL), so from now on every field of every entry is covered. Their version 1
chain is kept beside it (prev_hash_v1, entry_hash_v1) and VerifyLedger checks both, so what
was sealed before this migration is still proven against the hashes it was first written with.
`hash_version` says which encoding a row's prev_hash/entry_hash use; its default stays 1 so a
replica still running the previous release during a rolling upgrade writes rows labelled
honestly (they verify under version 1).

Writes to the ledger wait while this runs (the tables are locked), and the append-only guard
is lifted for this transaction alone.

Revision ID: 0006
Revises: 0005
"""

import json
from typing import Any

from alembic import op

from services.ledger import domain as d
from tally.kit.db import run_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_CHUNK = 5000


def _driver() -> Any:
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    return driver


def _entry(r: Any) -> d.Transfer:
    labels = r["labels"]
    return d.Transfer(
        r["transfer_id"], d.TransferKind(r["kind"]), r["debit_account_id"],
        r["credit_account_id"], r["org_id"], r["amount_micros"], r["actor"], r["reason"],
        r["trace_id"], r["user_id"], json.loads(labels) if isinstance(labels, str) else labels,
        r["grant_id"], r["reservation_id"], r["reverses_transfer_id"], r["payment_order_id"],
        r["created_at"], r["prev_hash"], r["entry_hash"], r["org_posted_after"],
        r["org_held_after"], r["org_arrears_after"], 1)


def upgrade() -> None:
    from sqlalchemy.util import await_only

    run_script(
        """
        LOCK TABLE ledger.accounts, ledger.transfers IN EXCLUSIVE MODE;
        ALTER TABLE ledger.transfers
            ADD COLUMN hash_version  smallint NOT NULL DEFAULT 1,
            ADD COLUMN prev_hash_v1  text,
            ADD COLUMN entry_hash_v1 text;
        ALTER TABLE ledger.transfers DISABLE TRIGGER transfers_append_only;
        """
    )
    driver = _driver()
    heads: dict[str, str] = {}
    after = 0
    while True:
        rows = await_only(driver.fetch(
            "SELECT * FROM ledger.transfers WHERE seq > $1 ORDER BY seq LIMIT $2",
            after, _CHUNK))
        if not rows:
            break
        seqs, prevs, hashes = [], [], []
        for row in rows:
            prev = heads.get(row["org_id"], d.GENESIS_HASH)
            entry_hash = d.chain_hash(prev, d.transfer_entry(_entry(row), 2))
            heads[row["org_id"]] = entry_hash
            seqs.append(row["seq"])
            prevs.append(prev)
            hashes.append(entry_hash)
        await_only(driver.execute(
            "UPDATE ledger.transfers t SET prev_hash_v1 = t.prev_hash, "
            "entry_hash_v1 = t.entry_hash, prev_hash = u.prev, entry_hash = u.hash, "
            "hash_version = 2 "
            "FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(seq, prev, hash) "
            "WHERE t.seq = u.seq", seqs, prevs, hashes))
        after = rows[-1]["seq"]
    orgs = sorted(heads)
    await_only(driver.execute(
        "UPDATE ledger.accounts a SET last_hash = u.hash "
        "FROM unnest($1::text[], $2::text[]) AS u(org, hash) "
        "WHERE a.account_id = 'org:' || u.org", orgs, [heads[o] for o in orgs]))
    run_script("ALTER TABLE ledger.transfers ENABLE TRIGGER transfers_append_only")


def downgrade() -> None:
    run_script(
        """
        LOCK TABLE ledger.accounts, ledger.transfers IN EXCLUSIVE MODE;
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM ledger.transfers
                       WHERE hash_version = 2 AND entry_hash_v1 IS NULL) THEN
                RAISE EXCEPTION 'entries were written under hash version 2 only; '
                                'version 1 cannot verify them';
            END IF;
        END $$;
        ALTER TABLE ledger.transfers DISABLE TRIGGER transfers_append_only;
        UPDATE ledger.transfers SET prev_hash = prev_hash_v1, entry_hash = entry_hash_v1
         WHERE entry_hash_v1 IS NOT NULL;
        UPDATE ledger.accounts a SET last_hash = t.entry_hash
          FROM (SELECT DISTINCT ON (org_id) org_id, entry_hash FROM ledger.transfers
                 ORDER BY org_id, seq DESC) t
         WHERE a.account_id = 'org:' || t.org_id;
        ALTER TABLE ledger.transfers ENABLE TRIGGER transfers_append_only;
        ALTER TABLE ledger.transfers
            DROP COLUMN hash_version, DROP COLUMN prev_hash_v1, DROP COLUMN entry_hash_v1;
        """
    )
