"""The audit log: calls recorded by the kit and chained per org in accounts; tampering with
any field of a record is named by VerifyAudit; exports by time range."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as apb
from tally.common.v1 import common_pb2
from tally.kit.audit import Auditor, grpc_sink
from tally.ledger.v1 import ledger_pb2 as pb
from tally.ledger.v1 import ledger_pb2_grpc
from tests.ledger.payments_support import open_shop

from .conftest import Identities, bearer, mesh

CREDIT = 1_000_000
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def record(i: int, org: str = "acme", at: datetime | None = None) -> apb.AuditRecord:
    message = apb.AuditRecord(record_id=f"r{i}", org_id=org, principal=f"key:k{i}",
                              verified_by="api_key", service="ledger",
                              rpc="/tally.ledger.v1.LedgerService/Purchase",
                              target_ids=[f"org_id={org}", f"payment_order_id=po-{i}"],
                              request_sha256="ab" * 32, peer="ipv4:10.0.0.1:5000",
                              outcome="OK")
    message.time.FromDatetime(at or T0 + timedelta(minutes=i))
    return message


async def test_audited_calls_land_in_their_orgs_chain_with_who_what_and_outcome(
        ids: Identities, db_url: str) -> None:
    guard = ids.guard()
    channel = grpc.aio.insecure_channel(ids.address)
    guard.auditor = Auditor("ledger", grpc_sink(channel), flush_ms=10)
    key = await ids.key("acme", apb.ROLE_VIEWER)
    try:
        async with open_shop(db_url, authenticator=guard) as shop:
            await ids.synced(guard)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{shop.ledger.port}") as ch:
                ledger = ledger_pb2_grpc.LedgerServiceStub(ch)
                await ledger.RecordManualPayment(pb.RecordManualPaymentRequest(
                    payment_order_id="bank-1", org_id="acme", amount_minor=500_000,
                    currency="USD", credits_micros=500_000 * CREDIT, reference="SEPA",
                    method=pb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER,
                    context=common_pb2.RequestContext(org_id="acme")),
                    metadata=tuple(mesh("finance-a").items()))
                with pytest.raises(grpc.aio.AioRpcError):  # a viewer may not grant credit
                    await ledger.Transfer(pb.TransferRequest(
                        transfer_id="t1", org_id="acme", amount_micros=CREDIT,
                        kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT),
                        metadata=tuple(bearer(key.secret).items()))
                with pytest.raises(grpc.aio.AioRpcError):  # no credentials at all
                    await ledger.Adjust(pb.AdjustRequest(adjustment_id="a1", org_id="acme"))
                with contextlib.suppress(grpc.aio.AioRpcError):  # a read: not audited
                    await ledger.GetBalance(pb.GetBalanceRequest(org_id="acme"),
                                            metadata=tuple(bearer(key.secret).items()))
    finally:
        await channel.close()
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT * FROM accounts.audit_log WHERE org_id = 'acme' "
                                "ORDER BY sequence")
    finally:
        await conn.close()
    assert [(r["rpc"].rsplit("/", 1)[1], r["principal"], r["verified_by"], r["outcome"])
            for r in rows] == [
        ("RecordManualPayment", "svc:finance-a", "mtls", "OK"),
        ("Transfer", f"key:{key.key.key_id}", "api_key", "PERMISSION_DENIED"),
        ("Adjust", "anonymous", "none", "UNAUTHENTICATED"),
    ]
    assert "payment_order_id=bank-1" in rows[0]["target_ids"]
    assert all(r["peer"].startswith("ipv") and len(r["request_sha256"]) == 64 for r in rows)
    verdict = await ids.accounts.VerifyAudit(apb.VerifyAuditRequest(org_id="acme"))
    assert verdict.is_intact and verdict.records_checked == 3


async def test_appending_a_batch_twice_records_it_once(ids: Identities) -> None:
    batch = apb.AppendAuditRequest(records=[record(i) for i in range(1, 4)])
    assert (await ids.accounts.AppendAudit(batch)).appended == 3
    assert (await ids.accounts.AppendAudit(batch)).appended == 0
    verdict = await ids.accounts.VerifyAudit(apb.VerifyAuditRequest(org_id="acme"))
    assert (verdict.is_intact, verdict.records_checked) == (True, 3)


TAMPERS = {
    "at": "at = at + interval '1 second'",
    "principal": "principal = 'key:someone-else'",
    "verified_by": "verified_by = 'oidc'",
    "service": "service = 'pricing'",
    "rpc": "rpc = '/tally.ledger.v1.LedgerService/Refund'",
    "target_ids": "target_ids = array['org_id=acme']",
    "request_sha256": "request_sha256 = repeat('cd', 32)",
    "peer": "peer = 'ipv4:10.9.9.9:1'",
    "outcome": "outcome = 'PERMISSION_DENIED'",
    "record_id": "record_id = 'forged'",
    "prev_hash": "prev_hash = repeat('0', 64)",
    "hash": "hash = repeat('f', 64)",
}


async def test_tampering_with_any_field_of_a_record_is_named_by_verify(ids: Identities,
                                                                       db_url: str) -> None:
    await ids.accounts.AppendAudit(apb.AppendAuditRequest(
        records=[record(i) for i in range(1, 6)]))
    conn = await asyncpg.connect(db_url)
    try:
        original = await conn.fetchrow("SELECT * FROM accounts.audit_log "
                                       "WHERE org_id = 'acme' AND sequence = 3")
        for column, change in TAMPERS.items():
            await conn.execute(f"UPDATE accounts.audit_log SET {change} "
                               "WHERE org_id = 'acme' AND sequence = 3")
            verdict = await ids.accounts.VerifyAudit(apb.VerifyAuditRequest(org_id="acme"))
            assert not verdict.is_intact, column
            assert verdict.first_altered_sequence == 3, (column, verdict)
            await conn.execute(
                f"UPDATE accounts.audit_log SET {column} = $1 "
                "WHERE org_id = 'acme' AND sequence = 3", original[column])
            assert (await ids.accounts.VerifyAudit(
                apb.VerifyAuditRequest(org_id="acme"))).is_intact, column
        await conn.execute("DELETE FROM accounts.audit_log WHERE org_id = 'acme' "
                           "AND sequence = 3")
        verdict = await ids.accounts.VerifyAudit(apb.VerifyAuditRequest(org_id="acme"))
        assert (verdict.is_intact, verdict.first_altered_sequence) == (False, 4)
        assert "removed" in verdict.problem
    finally:
        await conn.close()


async def test_an_export_holds_exactly_the_time_range_as_csv_or_json_lines(
        ids: Identities) -> None:
    await ids.accounts.AppendAudit(apb.AppendAuditRequest(
        records=[record(i) for i in range(1, 11)] + [record(99, org="beta")]))
    request = apb.ExportAuditRequest(org_id="acme", format=apb.AUDIT_EXPORT_FORMAT_JSON_LINES)
    request.start_time.FromDatetime(T0 + timedelta(minutes=3))
    request.end_time.FromDatetime(T0 + timedelta(minutes=7))
    lines = b"".join([c.chunk async for c in ids.accounts.ExportAudit(request)])
    exported = [json.loads(line) for line in lines.decode().splitlines()]
    assert [e["record_id"] for e in exported] == ["r3", "r4", "r5", "r6"]
    assert exported[0]["target_ids"] == ["org_id=acme", "payment_order_id=po-3"]
    request.format = apb.AUDIT_EXPORT_FORMAT_CSV
    text = b"".join([c.chunk async for c in ids.accounts.ExportAudit(request)]).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["record_id"] for r in rows] == ["r3", "r4", "r5", "r6"]
    assert rows[0]["principal"] == "key:k3" and len(rows[0]["hash"]) == 64
