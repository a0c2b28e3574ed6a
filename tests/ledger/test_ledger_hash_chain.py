"""The hash chains cover every stored field of an entry (the entry chain, and the state chain
for the billing state after it, known only when its transaction ends); the ledger's older
version 1 chain is re-chained by migration 0006 without losing the proof it carried, and
migration 0013 seals the states of entries written before the state chain."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic import command

from services.ledger import domain as d
from services.ledger.store import LedgerStore
from tally.kit import db
from tally.kit.server import RunningServer
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient

CREDIT = 1_000_000
AUDITED = d.Caller(actor="user:ops", trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                   user_id="u-7", labels={"team": "search", "env": "prod"})

# A stored field, and a value someone with database access might put there instead. Every
# column of ledger.transfers but seq (the order, which the chain's links already fix).
TAMPERED: dict[str, Any] = {
    "transfer_id": "t-forged",
    "kind": "REFUND",
    "debit_account_id": "sys:adjustments#0",
    "credit_account_id": "org:other",
    "org_id": "other",
    "amount_micros": 1,
    "actor": "user:someone-else",
    "reason": "edited",
    "trace_id": "00000000000000000000000000000001",
    "user_id": "u-8",
    "labels": json.dumps({"team": "ads", "env": "prod"}),
    "grant_id": "g-other",
    "reservation_id": "r-other",
    "reverses_transfer_id": "t-other",
    "payment_order_id": "po-other",
    "org_posted_after": 123,
    "org_held_after": 45,
    "org_arrears_after": 6,
    "created_at": datetime(2020, 1, 1, tzinfo=UTC),
    "prev_hash": "f" * 64,
    "entry_hash": "e" * 64,
    "hash_version": 1,
    "org_billing_state_after": "SUSPENDED",
    "state_seal": "d" * 64,
}


@pytest.fixture
async def admin(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection with the append-only guard off: an attacker's view."""
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    await conn.execute("SET session_replication_role = replica")  # triggers off, this session
    yield conn
    await conn.close()


async def test_changing_any_stored_field_of_an_entry_is_named_by_verify_ledger(
    tally: TallyClient, ledger_server: RunningServer, pool: asyncpg.Pool,
    admin: asyncpg.Connection,
) -> None:
    store = LedgerStore(pool)
    for i in range(3):
        await store.transfer(d.TransferCommand(
            f"t-{i}", "acme", d.TransferKind.PROMOTIONAL_GRANT, (i + 1) * CREDIT,
            reason="welcome", grant=d.GrantSpec(d.GrantKind.PROMOTIONAL)), AUDITED)
    middle = await admin.fetchrow("SELECT * FROM ledger.transfers WHERE transfer_id = 't-1'")
    assert json.loads(middle["labels"]) == {"team": "search", "env": "prod"}
    assert middle["trace_id"] and middle["user_id"] == "u-7" and middle["grant_id"]
    assert middle["hash_version"] == d.HASH_VERSION
    assert (await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())).ok
    columns = {r["column_name"] for r in await admin.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'ledger' AND table_name = 'transfers'")}
    assert columns - {"seq", "prev_hash_v1", "entry_hash_v1"} == set(
        TAMPERED), "a stored field of ledger.transfers is not in this test"
    for column, value in TAMPERED.items():
        await admin.execute(f"UPDATE ledger.transfers SET {column} = $1 WHERE seq = $2",
                            value, middle["seq"])
        report = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
        named = value if column == "transfer_id" else "t-1"
        assert (report.ok, report.first_bad_transfer_id) == (False, named), column
        await admin.execute(f"UPDATE ledger.transfers SET {column} = $1 WHERE seq = $2",
                            middle[column], middle["seq"])
        assert (await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())).ok, column


def test_the_version_2_encoding_differs_in_every_field_and_version_1_is_unchanged() -> None:
    fields: dict[str, Any] = dict(
        trace_id="tr", user_id="u", labels={"a": "1"}, grant_id="g", reservation_id="r",
        reverses_transfer_id="x", payment_order_id="po", org_posted_after=1, org_held_after=2,
        org_arrears_after=3)
    stamp = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    head = ("t", "USAGE", "org:a", "sys:revenue#1", "a", 5, "user:x", "why", stamp)
    base = d.canonical_entry(*head, **fields)
    for name, value in fields.items():
        changed = {**fields, name: {"a": "2"} if name == "labels" else
                   (value + 1 if isinstance(value, int) else value + "!")}
        assert d.canonical_entry(*head, **changed) != base, name
    # labels are a mapping: their order is not part of the meaning (jsonb reorders them)
    assert d.canonical_entry(*head, **{**fields, "labels": {"b": "2", "a": "1"}}) == \
        d.canonical_entry(*head, **{**fields, "labels": {"a": "1", "b": "2"}})
    # a separator inside a field cannot make two different entries encode alike
    assert d.canonical_entry("t", "USAGE", "org:a", "s", "a", 5, "x\x1fy", "", stamp, **fields) \
        != d.canonical_entry("t", "USAGE", "org:a", "s", "a", 5, "x", "y", stamp, **fields)
    assert d.canonical_entry(*head, **fields, version=1) == "\x1f".join(
        ["t", "USAGE", "org:a", "sys:revenue#1", "a", "5", "user:x", "why",
         stamp.isoformat()]).encode()


# --- migration 0006 -------------------------------------------------------------------------


@pytest.fixture
async def ledger_at_0005(server_url: str) -> AsyncIterator[str]:
    """A database whose ledger schema is at revision 0005 (hash version 1 only)."""
    name = f"tally_h_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(db.asyncpg_url(server_url))
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    parts = urlsplit(server_url)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    await _migrate(url, "0005")
    yield url
    conn = await asyncpg.connect(db.asyncpg_url(server_url))
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def _migrate(url: str, revision: str) -> None:
    await asyncio.to_thread(db.migrate, "ledger", url, revision)


async def _write_version_1_entries(conn: asyncpg.Connection) -> dict[str, str]:
    """Entries as the previous release wrote them (version 1 hashes); their hashes by id."""
    start = datetime(2026, 3, 1, tzinfo=UTC)
    hashes: dict[str, str] = {}
    heads: dict[str, str] = {}
    balances: dict[str, int] = {}
    for i, org in enumerate(["acme", "beta", "acme", "acme", "beta"]):
        transfer_id, amount = f"old-{i}", (i + 1) * CREDIT
        debit, credit = "sys:promotional_expense#0", f"org:{org}"
        created = start + timedelta(minutes=i)
        balances[org] = balances.get(org, 0) + amount
        prev = heads.get(org, d.GENESIS_HASH)
        entry_hash = d.chain_hash(prev, d.canonical_entry(
            transfer_id, "PROMOTIONAL_GRANT", debit, credit, org, amount, "user:ops", "welcome",
            created, trace_id="", user_id="", labels={}, grant_id="", reservation_id="",
            reverses_transfer_id="", payment_order_id="", org_posted_after=0,
            org_held_after=0, org_arrears_after=0, version=1))
        heads[org] = hashes[transfer_id] = entry_hash
        await conn.execute(
            "INSERT INTO ledger.transfers (transfer_id, kind, debit_account_id, "
            "credit_account_id, org_id, amount_micros, actor, reason, labels, "
            "org_posted_after, org_held_after, org_arrears_after, created_at, prev_hash, "
            "entry_hash) VALUES ($1, 'PROMOTIONAL_GRANT', $2, $3, $4, $5, 'user:ops', "
            "'welcome', $6, $7, 0, 0, $8, $9, $10)",
            transfer_id, debit, credit, org, amount, json.dumps({"team": "search"}),
            balances[org], created, prev, entry_hash)
    for org, balance in balances.items():
        await conn.execute(
            "INSERT INTO ledger.accounts (account_id, kind, org_id, balance_micros, last_hash) "
            "VALUES ($1, 'ORG_CREDIT', $2, $3, $4)", f"org:{org}", org, balance, heads[org])
        await conn.execute("INSERT INTO ledger.accounts (account_id, kind, org_id) "
                           "VALUES ($1, 'ARREARS', $2)", f"arrears:{org}", org)
    await conn.execute("UPDATE ledger.accounts SET balance_micros = $1 "
                       "WHERE account_id = 'sys:promotional_expense#0'", -sum(balances.values()))
    return hashes


async def test_migration_0006_rechains_old_entries_and_keeps_their_version_1_chain(
    ledger_at_0005: str,
) -> None:
    conn = await asyncpg.connect(db.asyncpg_url(ledger_at_0005))
    try:
        v1_hashes = await _write_version_1_entries(conn)
        await _migrate(ledger_at_0005, "head")
        rows = await conn.fetch("SELECT * FROM ledger.transfers ORDER BY seq")
        assert {r["transfer_id"]: r["entry_hash_v1"] for r in rows} == v1_hashes
        assert {r["hash_version"] for r in rows} == {2}
        assert all(r["entry_hash"] != r["entry_hash_v1"] for r in rows)
        pool = await db.create_pool(ledger_at_0005, max_size=2)
        try:
            store = LedgerStore(pool)
            assert (await store.verify()) == d.ChainReport(True, 5)
            # the chain goes on under version 2 from the re-chained head
            await store.transfer(d.TransferCommand(
                "new-0", "acme", d.TransferKind.PROMOTIONAL_GRANT, CREDIT), AUDITED)
            assert (await store.verify()) == d.ChainReport(True, 6)
            await conn.execute("SET session_replication_role = replica")
            # a field version 1 left out is now covered for the old entries too
            await conn.execute("UPDATE ledger.transfers SET labels = '{\"team\": \"ads\"}' "
                               "WHERE transfer_id = 'old-2'")
            report = await store.verify()
            assert (report.ok, report.first_bad_transfer_id) == (False, "old-2")
            await conn.execute("UPDATE ledger.transfers SET labels = '{\"team\": \"search\"}' "
                               "WHERE transfer_id = 'old-2'")
            assert (await store.verify()).ok
            # and the version 1 chain still proves what it sealed
            await conn.execute("UPDATE ledger.transfers SET entry_hash_v1 = $1 "
                               "WHERE transfer_id = 'old-3'", "0" * 64)
            report = await store.verify()
            assert (report.ok, report.first_bad_transfer_id) == (False, "old-3")
        finally:
            await pool.close()
    finally:
        await conn.close()


async def test_migration_0006_can_be_undone_while_no_entry_is_version_2_only(
    ledger_at_0005: str,
) -> None:
    conn = await asyncpg.connect(db.asyncpg_url(ledger_at_0005))
    try:
        v1_hashes = await _write_version_1_entries(conn)
        heads = {r["account_id"]: r["last_hash"] for r in await conn.fetch(
            "SELECT account_id, last_hash FROM ledger.accounts WHERE kind = 'ORG_CREDIT'")}
        await _migrate(ledger_at_0005, "head")
        await asyncio.to_thread(command.downgrade, db._alembic_config("ledger", ledger_at_0005),
                                "0005")
        rows = await conn.fetch("SELECT transfer_id, entry_hash FROM ledger.transfers")
        assert {r["transfer_id"]: r["entry_hash"] for r in rows} == v1_hashes
        assert {r["account_id"]: r["last_hash"] for r in await conn.fetch(
            "SELECT account_id, last_hash FROM ledger.accounts WHERE kind = 'ORG_CREDIT'")
        } == heads
    finally:
        await conn.close()


# --- the state chain: the billing state after an entry ----------------------------------------


async def test_a_billing_state_decided_at_the_end_of_a_usage_transaction_is_sealed(
    pool: asyncpg.Pool, admin: asyncpg.Connection,
) -> None:
    """Usage beyond the credit moves the org to another state at the end of the transaction,
    after its entries are hashed; rewriting that state (or clearing it, or the seal) is named,
    in both usage paths (per-event and per-org debits)."""
    store = LedgerStore(pool)
    await store.transfer(d.TransferCommand(
        "g-0", "acme", d.TransferKind.PROMOTIONAL_GRANT, CREDIT,
        grant=d.GrantSpec(d.GrantKind.PROMOTIONAL)), AUDITED)
    await store.post_usage_batch("b-0", [d.UsageItem("e-0", "acme", 3 * CREDIT)], AUDITED)
    await store.post_usage_batches([d.UsageBatch("b-1", (), AUDITED, org_debits=[
        d.OrgUsageDebit("acme", CREDIT, 1)])])
    rows = await admin.fetch("SELECT * FROM ledger.transfers ORDER BY seq")
    states = [r["org_billing_state_after"] for r in rows]
    assert states[0] == "ACTIVE" and states[-1] != "ACTIVE", states
    assert (await store.verify()) == d.ChainReport(True, len(rows))
    for row in rows[1:]:
        for column, forged in (("org_billing_state_after", "ACTIVE"),
                               ("org_billing_state_after", None),
                               ("state_seal", None), ("state_seal", "0" * 64)):
            await admin.execute(f"UPDATE ledger.transfers SET {column} = $1 WHERE seq = $2",
                                forged, row["seq"])
            report = await store.verify()
            assert (report.ok, report.first_bad_transfer_id) == (False, row["transfer_id"]), (
                column, forged)
            await admin.execute(f"UPDATE ledger.transfers SET {column} = $1 WHERE seq = $2",
                                row[column], row["seq"])
    assert (await store.verify()).ok


async def test_resealing_a_forged_state_still_breaks_the_chain_at_its_head(
    pool: asyncpg.Pool, admin: asyncpg.Connection,
) -> None:
    """Someone who recomputes the forged entry's seal (the function is public) breaks the
    link to the next entry, or the org's stored head for its last entry."""
    store = LedgerStore(pool)
    for i in range(2):
        await store.transfer(d.TransferCommand(
            f"g-{i}", "acme", d.TransferKind.PROMOTIONAL_GRANT, CREDIT,
            grant=d.GrantSpec(d.GrantKind.PROMOTIONAL)), AUDITED)
    first, last = await admin.fetch("SELECT * FROM ledger.transfers ORDER BY seq")
    for row, prev_seal in ((first, d.GENESIS_HASH), (last, first["state_seal"])):
        forged = d.state_seal(prev_seal, row["entry_hash"], "SUSPENDED")
        await admin.execute("UPDATE ledger.transfers SET org_billing_state_after = 'SUSPENDED', "
                            "state_seal = $1 WHERE seq = $2", forged, row["seq"])
        report = await store.verify()
        assert not report.ok
        assert report.first_bad_transfer_id == ("g-1" if row is first else "")
        assert "state chain" in report.detail
        await admin.execute("UPDATE ledger.transfers SET org_billing_state_after = $1, "
                            "state_seal = $2 WHERE seq = $3", row["org_billing_state_after"],
                            row["state_seal"], row["seq"])
    assert (await store.verify()).ok


def test_the_state_seal_differs_in_every_input_and_tells_null_from_empty() -> None:
    base = d.state_seal(d.GENESIS_HASH, "a" * 64, "ACTIVE")
    assert d.state_seal("1" * 64, "a" * 64, "ACTIVE") != base
    assert d.state_seal(d.GENESIS_HASH, "b" * 64, "ACTIVE") != base
    assert d.state_seal(d.GENESIS_HASH, "a" * 64, "SUSPENDED") != base
    assert d.state_seal(d.GENESIS_HASH, "a" * 64, None) != d.state_seal(
        d.GENESIS_HASH, "a" * 64, "")


async def test_migration_0013_seals_the_states_of_entries_written_before_it(
    ledger_at_0005: str,
) -> None:
    conn = await asyncpg.connect(db.asyncpg_url(ledger_at_0005))
    try:
        await _write_version_1_entries(conn)  # no billing state after: NULL
        await _migrate(ledger_at_0005, "identity_audit_outbox")
        pool = await db.create_pool(ledger_at_0005, max_size=2)
        try:
            # the release before the state chain: an entry with a state after, unsealed
            await conn.execute(
                "ALTER TABLE ledger.transfers DISABLE TRIGGER transfers_append_only;"
                "UPDATE ledger.transfers SET org_billing_state_after = 'ACTIVE' "
                "WHERE transfer_id = 'old-4'")
            await _migrate(ledger_at_0005, "head")
            rows = await conn.fetch("SELECT * FROM ledger.transfers ORDER BY seq")
            assert all(r["state_seal"] for r in rows)
            store = LedgerStore(pool)
            assert (await store.verify()) == d.ChainReport(True, 5)
            await store.transfer(d.TransferCommand(
                "new-0", "beta", d.TransferKind.PROMOTIONAL_GRANT, CREDIT), AUDITED)
            assert (await store.verify()) == d.ChainReport(True, 6)
            await conn.execute("SET session_replication_role = replica")
            await conn.execute("UPDATE ledger.transfers SET org_billing_state_after = 'SUSPENDED' "
                               "WHERE transfer_id = 'old-4'")
            report = await store.verify()
            assert (report.ok, report.first_bad_transfer_id) == (False, "old-4")
        finally:
            await pool.close()
    finally:
        await conn.close()
