"""Authorize's audit record is written in the transaction of its decision: the hold (or the
recorded DENY) and the record commit together, in one commit, so the hot path pays no commit
of its own for the audit and no decision is ever answered without its record. A replay (no
change) is still recorded, by the kit's own write; a refusal by the guard too. And the
Envoy rate-limit check, which changes nothing durable, is counted per interval."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from services.metering.server import MeteringConfig, build_for
from tally.kit import audit, db
from tally.kit.audit import Auditor, AuditOutbox
from tally.kit.auth import CredentialCache, Guard
from tally.kit.server import Principal, start_server
from tally.metering.v1 import metering_pb2 as mpb
from tally.metering.v1 import metering_pb2_grpc
from tests.metering.conftest import start_suite, stop_suite
from tests.metering.test_authorize import ask

from .conftest import Identities, mesh

AUTHORIZE = "/tally.metering.v1.MeteringService/Authorize"


async def _never_ship(batch: object, uses: object) -> None:
    raise ConnectionError("accounts is away: every record stays in the outbox")


async def test_authorize_commits_its_audit_record_in_the_transaction_of_its_decision(
        ids: Identities, db_url: str) -> None:
    suite = await start_suite(db_url)
    guard = ids.guard()
    guard.auditor = Auditor("metering", _never_ship, flush_ms=100,
                            outbox=AuditOutbox(db_url, "metering.audit_outbox"))
    server = await start_server(await build_for(db_url, suite.config, MeteringConfig(
        policy_cache_ms=0)), port=0, authenticator=guard)
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await ids.synced(guard)
        await suite.fund("acme", 100)
        await conn.execute("INSERT INTO metering.spend_policies (org_id, max_context_tokens) "
                           "VALUES ('acme', 8000)")
        metadata = tuple(mesh("metering").items())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            metering = metering_pb2_grpc.MeteringServiceStub(channel)
            allowed = await asyncio.gather(*(metering.Authorize(ask(f"held-{i}"),
                                                                metadata=metadata)
                                             for i in range(8)))
            assert {a.decision for a in allowed} == {mpb.DECISION_ALLOW}
            long = await metering.Authorize(ask("long", context_tokens=9_000),
                                            metadata=metadata)
            assert long.deny_reason == "CONTEXT_TOO_LONG"
            replay = await metering.Authorize(ask("held-0"), metadata=metadata)
            assert replay.reservation_id == allowed[0].reservation_id
            try:
                await metering.Authorize(ask("stranger", org="beta"), metadata=(
                    ("authorization", "Bearer tly_test_unknownkey"),))
                raise AssertionError("an unknown key was answered")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED

            async def outbox() -> list[asyncpg.Record]:
                return await conn.fetch(
                    "SELECT record, xmin::text AS xid FROM metering.audit_outbox ORDER BY seq")

            for _ in range(200):  # refusals' records are written without being awaited
                if len(await outbox()) == 11:
                    break
                await asyncio.sleep(0.02)
        rows = await outbox()
        records = [json.loads(r["record"]) for r in rows]
        # one record per call: 8 ALLOWs, the DENY, the replay and the refusal
        assert sorted((r[6].rsplit("/", 1)[1], r[10]) for r in records) == sorted(
            [("Authorize", "OK")] * 10 + [("Authorize", "UNAUTHENTICATED")]), records
        by_request: dict[str, tuple[list[object], str]] = {}
        for r, row in zip(records, rows, strict=True):  # the first of each: its decision's
            for t in r[7]:
                if t.startswith("request_id=") and r[10] == "OK":
                    by_request.setdefault(t.removeprefix("request_id="), (r, row["xid"]))
        decisions = {r["request_id"]: r["xid"] for r in await conn.fetch(
            "SELECT request_id, xmin::text AS xid FROM metering.authorizations "
            "WHERE org_id = 'acme'")}
        # each decision and its record: the same transaction (xmin), so committed together
        for request_id in [f"held-{i}" for i in range(8)] + ["long"]:
            record, xid = by_request[request_id]
            assert xid == decisions[request_id], (request_id, xid, decisions[request_id])
            assert record[3] == "svc:metering" and record[4] == "mtls", record
        # a replay changes nothing: recorded by the kit's own write, in another transaction
        replays = [(r, row["xid"]) for r, row in zip(records, rows, strict=True)
                   if "request_id=held-0" in r[7]]
        assert len(replays) == 2 and len({xid for _, xid in replays}) == 2, replays
    finally:
        await conn.close()
        await server.stop()
        await stop_suite(suite)
        await guard.stop()


async def test_a_hold_that_fails_leaves_no_audit_record_and_no_answer(
        ids: Identities, db_url: str) -> None:
    """The record rides in the hold's statement: when the statement fails, neither exists."""
    suite = await start_suite(db_url)
    guard = ids.guard()
    guard.auditor = Auditor("metering", _never_ship, flush_ms=100,
                            outbox=AuditOutbox(db_url, "metering.audit_outbox"))
    server = await start_server(await build_for(db_url, suite.config, MeteringConfig(
        policy_cache_ms=0)), port=0, authenticator=guard)
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await ids.synced(guard)
        await suite.fund("acme", 100)
        metadata = tuple(mesh("metering").items())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            metering = metering_pb2_grpc.MeteringServiceStub(channel)
            await metering.Authorize(ask("warm"), metadata=metadata)  # the lease is taken
            # every authorization insert now fails inside the statement
            await conn.execute(
                "CREATE FUNCTION metering.refuse_insert() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$; "
                "CREATE TRIGGER refuse BEFORE INSERT ON metering.authorizations "
                "FOR EACH ROW EXECUTE FUNCTION metering.refuse_insert()")
            try:
                await metering.Authorize(ask("doomed"), metadata=metadata)
                raise AssertionError("a decision was answered that was never recorded")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is not grpc.StatusCode.OK
        outcomes: list[str] = []
        for _ in range(200):  # a failure's record is written without being awaited
            outcomes = [json.loads(r)[10] for (r,) in await conn.fetch(
                "SELECT record FROM metering.audit_outbox WHERE record::text LIKE '%doomed%'")]
            if outcomes:
                break
            await asyncio.sleep(0.02)
        # the failure itself is recorded, never as a decision that was made
        assert outcomes and "OK" not in outcomes, outcomes
        assert await conn.fetchval("SELECT count(*) FROM metering.authorizations "
                                   "WHERE request_id = 'doomed'") == 0
    finally:
        await conn.close()
        await server.stop()
        await stop_suite(suite)
        await guard.stop()


def test_rate_limit_checks_are_summarized_per_interval_and_refusals_kept_one_by_one() -> None:
    shipped: list[tuple[object, ...]] = []

    async def sink(batch: list[tuple[object, ...]], uses: object) -> None:
        shipped.extend(batch)

    guard = Guard(CredentialCache(), auditor=Auditor("metering", sink))
    method = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    request = rls_pb2.RateLimitRequest(domain="tally", descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value="acme")])])
    gateway = Principal("key:k1", verified_by="api_key",
                        org_roles={"acme": frozenset({"gateway"})})

    class Peer:
        def peer(self) -> str:
            return "ipv4:10.0.0.7:4000"

    for _ in range(5):
        assert guard.record(method, gateway, Peer(), request, grpc.StatusCode.OK) is None
    guard.record(method, None, Peer(), request, grpc.StatusCode.UNAUTHENTICATED)
    guard.record(method, None, Peer(), request, grpc.StatusCode.UNAUTHENTICATED)
    assert guard.auditor is not None
    asyncio.run(guard.auditor.flush())
    summary = [r for r in shipped if r[10] == "OK"]
    refused = [r for r in shipped if r[10] == "UNAUTHENTICATED"]
    assert [(r[1], r[3], r[4], r[7]) for r in summary] == [
        ("acme", "key:k1", "api_key", ("org_id=acme", "calls=5"))]
    assert len(refused) == 2  # every refusal, one record each
    shipped.clear()
    asyncio.run(guard.auditor.flush())
    assert shipped == []  # counted once: the next interval starts from zero



async def test_an_idle_outbox_is_read_after_writes_not_every_flush(db_url: str) -> None:
    """The sender reads the outbox after this process wrote to it (and every `sweep_s` for
    what a dead replica left), not on every flush interval of an idle service."""
    drains: list[int] = []

    class Counted(AuditOutbox):
        async def drain(self, sink: Any, uses: Any, limit: int) -> int:
            drains.append(limit)
            return await super().drain(sink, uses, limit)

    shipped: list[Any] = []

    async def sink(batch: Any, uses: Any) -> None:
        shipped.extend(batch)

    auditor = Auditor("metering", sink, outbox=Counted(db_url, "metering.audit_outbox"),
                      sweep_s=3600)
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        await auditor.flush()  # the first flush reads what a dead process left behind
        read = len(drains)
        assert read >= 1
        for _ in range(5):
            await auditor.flush()
        assert len(drains) == read  # idle: the outbox is not read
        record = auditor.pending(AUTHORIZE, None, None, "ipv4:10.0.0.7:4000", None)
        assert record is not None
        audit.begin(record)
        assert audit.pending(db_url) is record
        # a store on another database (a residency region's) must not write it: its outbox
        # there is not the one this sender drains
        assert audit.pending("postgresql://elsewhere/region_b") is None
        audit.begin(None)
        ((record_id, body),) = record.rows()
        await conn.execute("INSERT INTO metering.audit_outbox (record_id, record) "
                           "VALUES ($1, $2::jsonb)", record_id, body)  # as a store does
        record.written()
        await auditor.flush()
        assert len(drains) > read and [r[0] for r in shipped] == [record_id]
        assert await conn.fetchval("SELECT count(*) FROM metering.audit_outbox") == 0
    finally:
        await conn.close()
        assert auditor.outbox is not None
        await auditor.outbox.close()
