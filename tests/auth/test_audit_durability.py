"""An audited call answers only once its record is durable in the service's own database: a
ledger killed with SIGKILL before shipping anything to accounts loses no record — the
restarted process ships every one, and the org's chain verifies; a call whose record cannot
be written does not answer OK."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc

from tally.accounts.v1 import accounts_pb2 as apb
from tally.cli.suite import health_state
from tally.common.v1 import common_pb2
from tally.kit import db
from tally.kit.audit import Auditor, AuditOutbox, grpc_sink
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.ledger.v1 import ledger_pb2_grpc
from tally.pricing.v1 import pricing_pb2 as ppb
from tests.pricing.conftest import catalog_draft, pricing_server

from .conftest import Identities, mesh

REPO = Path(__file__).resolve().parents[2]
CREDIT = 1_000_000
GRANTS = 40


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(1500):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


async def fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(db.asyncpg_url(url))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def start_ledger(db_url: str, accounts: str, port: int, flush_ms: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TALLY_DATABASE_URL=db_url, TALLY_MIGRATE_ON_START="false",
               TALLY_LEDGER_PORT=str(port), TALLY_ACCOUNTS_ADDRESS=accounts,
               TALLY_AUTH_MODE="enforce", TALLY_AUTH_SERVICES="finance-a=finance",
               TALLY_AUTH_MESH_IDENTITY="true", TALLY_AUDIT_FLUSH_MS=str(flush_ms))
    return subprocess.Popen([sys.executable, "-m", "services.ledger"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_sigkill_after_the_answers_loses_no_audit_record(ids: Identities,
                                                                db_url: str) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"

    async def serving() -> bool:
        return await health_state(address, 0.5) == "SERVING"

    async def audited_grants() -> set[str]:
        conn = await asyncpg.connect(db.asyncpg_url(db_url))
        try:
            rows = await conn.fetch("SELECT target_ids FROM accounts.audit_log "
                                    "WHERE org_id = 'acme' AND rpc LIKE '%/Transfer'")
        finally:
            await conn.close()
        return {t for row in rows for t in row["target_ids"] if t.startswith("transfer_id=")}

    # a sender that would not ship for ten minutes: whatever accounts gets, it gets from the
    # outbox the restarted process finds
    process = start_ledger(db_url, ids.address, port, flush_ms=600_000)
    try:
        await until(serving, "the ledger serves")
        async with grpc.aio.insecure_channel(address) as channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
            await asyncio.gather(*(ledger.Transfer(lpb.TransferRequest(
                transfer_id=f"grant-{i}", org_id="acme", amount_micros=CREDIT,
                kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, reason="durability"),
                metadata=tuple(mesh("finance-a").items())) for i in range(GRANTS)))
        assert await fetchval(db_url, "SELECT count(*) FROM ledger.audit_outbox") == GRANTS
        assert await audited_grants() == set()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    process = start_ledger(db_url, ids.address, port, flush_ms=20)
    try:
        await until(serving, "the restarted ledger serves")
        expected = {f"transfer_id=grant-{i}" for i in range(GRANTS)}

        async def all_shipped() -> bool:
            return await audited_grants() == expected

        await until(all_shipped, "every answered grant is in accounts' audit chain")

        async def outbox_empty() -> bool:  # deleted once accounts acknowledged
            return await fetchval(db_url, "SELECT count(*) FROM ledger.audit_outbox") == 0

        await until(outbox_empty, "the shipped records leave the outbox")
        verified = await ids.accounts.VerifyAudit(apb.VerifyAuditRequest(org_id="acme"))
        assert verified.is_intact and verified.records_checked >= GRANTS, verified
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


async def test_a_call_whose_record_cannot_be_written_does_not_answer_ok(
        ids: Identities, db_url: str) -> None:
    guard = ids.guard()
    channel = grpc.aio.insecure_channel(ids.address)
    # an outbox table that does not exist: every write of a record fails
    guard.auditor = Auditor("pricing", grpc_sink(channel),
                            outbox=AuditOutbox(db_url, "pricing.no_such_outbox"))
    try:
        async with pricing_server(db_url, authenticator=guard) as (_, stub):
            await ids.synced(guard)
            try:
                await stub.PublishPriceBook(ppb.PublishPriceBookRequest(
                    request_id="publish-1", draft=catalog_draft(),
                    context=common_pb2.RequestContext(actor="ops")),
                    metadata=tuple(mesh("ops").items()))
                raise AssertionError("answered OK without its audit record")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                assert "audit trail could not be written" in (exc.details() or "")
    finally:
        await channel.close()
