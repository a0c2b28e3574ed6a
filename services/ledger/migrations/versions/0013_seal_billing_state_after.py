"""The billing state after each entry is covered by a hash chain of its own (the state chain).

`org_billing_state_after` is the org's state as the entry's transaction leaves it: the billing
rules run at the end of the transaction, after its entries are hashed, so the entry chain
(hash versions 1 and 2) never covered it, and it could be rewritten without VerifyLedger
noticing. Each entry now also carries `state_seal` = sha256(previous seal || [entry hash,
state after]) (domain.state_seal), computed when the transaction writes (Work's flush), and
each org's accounts keep the last one (`last_seal`), as `last_hash` keeps the entry chain's.

The entry chain itself is unchanged (no re-chaining: entry hashes and their versions stay as
they were, and the version 1 chain kept by 0006 stays verifiable). Existing rows are sealed
here in each org's order by the domain's own function (never SQL), so from now on the state of
every entry is covered.

A replica of the previous release still writing during a rolling upgrade writes entries
without a seal; VerifyLedger reports those (a missing seal is never taken as "nothing to
check", or NULLing one would hide a rewrite). Stop the previous release's ledger replicas
before this migration, as for any change of what the ledger writes.

Writes to the ledger wait while this runs (the tables are locked), and the append-only guard
is lifted for this transaction alone.

Revision ID: seal_billing_state_after
Revises: identity_audit_outbox
"""

from typing import Any

from alembic import op

from services.ledger import domain as d
from tally.kit.db import run_script

revision = "seal_billing_state_after"
down_revision = "identity_audit_outbox"
branch_labels = None
depends_on = None

_CHUNK = 5000


def _driver() -> Any:
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    return driver


def upgrade() -> None:
    from sqlalchemy.util import await_only

    run_script(
        """
        LOCK TABLE ledger.accounts, ledger.transfers IN EXCLUSIVE MODE;
        ALTER TABLE ledger.transfers ADD COLUMN state_seal text;
        ALTER TABLE ledger.accounts ADD COLUMN last_seal text NOT NULL DEFAULT repeat('0', 64);
        ALTER TABLE ledger.transfers DISABLE TRIGGER transfers_append_only;
        """
    )
    driver = _driver()
    heads: dict[str, str] = {}
    after = 0
    while True:
        rows = await_only(driver.fetch(
            "SELECT seq, org_id, entry_hash, org_billing_state_after FROM ledger.transfers "
            "WHERE seq > $1 ORDER BY seq LIMIT $2", after, _CHUNK))
        if not rows:
            break
        seqs, seals = [], []
        for row in rows:
            seal = d.state_seal(heads.get(row["org_id"], d.GENESIS_HASH), row["entry_hash"],
                                row["org_billing_state_after"])
            heads[row["org_id"]] = seal
            seqs.append(row["seq"])
            seals.append(seal)
        await_only(driver.execute(
            "UPDATE ledger.transfers t SET state_seal = u.seal "
            "FROM unnest($1::bigint[], $2::text[]) AS u(seq, seal) WHERE t.seq = u.seq",
            seqs, seals))
        after = rows[-1]["seq"]
    orgs = sorted(heads)
    await_only(driver.execute(
        "UPDATE ledger.accounts a SET last_seal = u.seal "
        "FROM unnest($1::text[], $2::text[]) AS u(org, seal) "
        "WHERE a.account_id = 'org:' || u.org", orgs, [heads[o] for o in orgs]))
    run_script("ALTER TABLE ledger.transfers ENABLE TRIGGER transfers_append_only")


def downgrade() -> None:
    run_script(
        """
        LOCK TABLE ledger.accounts, ledger.transfers IN EXCLUSIVE MODE;
        ALTER TABLE ledger.transfers DROP COLUMN state_seal;
        ALTER TABLE ledger.accounts DROP COLUMN last_seal;
        """
    )
