"""Audit retention: records past the period are archived, then deleted, and a checkpoint keeps
the chain verifiable — the records kept verify from it, each archive from the one before, and
records appended afterwards continue the chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from services.accounts import audit
from services.accounts.server import archive_to
from services.accounts.store import AuditPgStore
from tally.accounts.v1 import accounts_pb2 as pb
from tally.kit import db

from .conftest import Stub

NOW = datetime.now(UTC)


def record(i: int, at: datetime, org: str = "acme") -> pb.AuditRecord:
    message = pb.AuditRecord(record_id=f"r{i}", org_id=org, principal="svc:ledger",
                             verified_by="mtls", service="ledger",
                             rpc="/tally.ledger.v1.LedgerService/Transfer",
                             target_ids=[f"org_id={org}", f"transfer_id=t{i}"],
                             request_sha256="cd" * 32, peer="ipv4:10.0.0.2:4000",
                             outcome="OK")
    message.time.FromDatetime(at)
    return message


async def test_expired_records_are_archived_then_removed_and_the_chain_still_verifies(
        accounts: Stub, db_url: str, tmp_path: Path) -> None:
    old = [record(i, NOW - timedelta(days=100, minutes=-i)) for i in range(5)]
    recent = [record(i, NOW - timedelta(days=1, minutes=-i)) for i in range(5, 8)]
    await accounts.AppendAudit(pb.AppendAuditRequest(records=old + recent))
    pool = await asyncpg.create_pool(db.asyncpg_url(db_url), min_size=1, max_size=2)
    assert pool is not None
    try:
        store = AuditPgStore(pool)
        removed = await store.expire(NOW - timedelta(days=30), archive_to(tmp_path))
        assert removed == 5
        assert await store.expire(NOW - timedelta(days=30), archive_to(tmp_path)) == 0
        kept = await pool.fetch("SELECT record_id, sequence FROM accounts.audit_log "
                                "WHERE org_id = 'acme' ORDER BY sequence")
        assert [(r["record_id"], r["sequence"]) for r in kept] == [
            ("r5", 6), ("r6", 7), ("r7", 8)]

        # the archive holds the removed records with their hashes, and verifies from genesis
        (archive,) = (tmp_path / "acme").iterdir()
        archived = audit.parse_archive(archive.read_text())
        assert [e.record_id for e in archived] == [f"r{i}" for i in range(5)]
        assert audit.verify(archived).is_intact
        verdict = await accounts.VerifyAudit(pb.VerifyAuditRequest(org_id="acme"))
        assert verdict.is_intact and verdict.records_checked == 3, verdict

        # new records continue after the checkpoint, not from sequence 1
        await accounts.AppendAudit(pb.AppendAuditRequest(records=[record(8, NOW)]))
        assert await pool.fetchval("SELECT max(sequence) FROM accounts.audit_log "
                                   "WHERE org_id = 'acme'") == 9
        assert (await accounts.VerifyAudit(pb.VerifyAuditRequest(org_id="acme"))).is_intact

        # the first record kept must still link to the checkpoint: altering it is named
        await pool.execute("UPDATE accounts.audit_log SET prev_hash = $1 "
                           "WHERE record_id = 'r5'", "0" * 64)
        broken = await accounts.VerifyAudit(pb.VerifyAuditRequest(org_id="acme"))
        assert not broken.is_intact and broken.first_altered_record_id == "r5", broken
    finally:
        await pool.close()


async def test_an_org_whose_every_record_expired_resumes_after_its_checkpoint(
        accounts: Stub, db_url: str, tmp_path: Path) -> None:
    await accounts.AppendAudit(pb.AppendAuditRequest(
        records=[record(i, NOW - timedelta(days=90)) for i in range(3)]))
    pool = await asyncpg.create_pool(db.asyncpg_url(db_url), min_size=1, max_size=2)
    assert pool is not None
    try:
        assert await AuditPgStore(pool).expire(NOW - timedelta(days=30),
                                               archive_to(tmp_path)) == 3
        assert (await accounts.VerifyAudit(pb.VerifyAuditRequest(org_id="acme"))).is_intact
        await accounts.AppendAudit(pb.AppendAuditRequest(records=[record(3, NOW)]))
        row = await pool.fetchrow("SELECT sequence, prev_hash FROM accounts.audit_log "
                                  "WHERE record_id = 'r3'")
        archived = audit.parse_archive(next((tmp_path / "acme").iterdir()).read_text())
        assert (row["sequence"], row["prev_hash"]) == (4, archived[-1].hash)
        verdict = await accounts.VerifyAudit(pb.VerifyAuditRequest(org_id="acme"))
        assert verdict.is_intact and verdict.records_checked == 1
    finally:
        await pool.close()
