"""SIGTERM to a metering process under load: readiness turns NOT_SERVING first, in-flight
calls complete, the usage stream is asked to reconnect, the process exits within its grace
period, and every event it acknowledged is recorded and debited."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.kit import db
from tally.kit.infra import free_port
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient
from tests.metering.conftest import start_suite, stop_suite
from tests.metering.test_ingestion import ACCEPTED, usage

REPO = Path(__file__).resolve().parents[2]
GRACE_SECONDS = 5
DRAIN_DELAY_MS = 300
SERVICE = "tally.metering.v1.MeteringService"


async def _serving(address: str) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                           timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "metering never became SERVING"
            await asyncio.sleep(0.05)


async def test_sigterm_under_load_drains_without_losing_an_acknowledged_event(
        db_url: str) -> None:
    suite = await start_suite(db_url)
    await suite.fund("acme", 10_000)
    port = free_port()
    env = dict(os.environ, TALLY_DATABASE_URL=db_url, TALLY_MIGRATE_ON_START="false",
               TALLY_METERING_PORT=str(port), TALLY_PRICING_PORT=str(suite.config.pricing_port),
               TALLY_LEDGER_PORT=str(suite.config.ledger_port),
               TALLY_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
               TALLY_SHUTDOWN_DRAIN_DELAY_MS=str(DRAIN_DELAY_MS), TALLY_LOG_LEVEL="warning")
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, then only signalled
        [sys.executable, "-m", "services.metering"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    client = TallyClient({"metering": address}, actor="service:test")
    acknowledged: set[str] = set()
    stream_acks = 0
    reconnect_asked = asyncio.Event()
    acked_enough = asyncio.Event()
    stopping = asyncio.Event()
    try:
        await _serving(address)

        async def batches() -> AsyncIterator[mpb.StreamUsageRequest]:
            n = 0
            while not reconnect_asked.is_set():
                n += 1
                yield mpb.StreamUsageRequest(batch_id=str(n), events=[
                    usage(f"s-{n}-{i}") for i in range(20)])
                await asyncio.sleep(0)

        async def streamer() -> None:
            nonlocal stream_acks
            async for reply in client.metering.StreamUsage(batches()):
                if reply.reconnect:
                    reconnect_asked.set()
                    return
                acknowledged.update(r.event_id for r in reply.results if r.status == ACCEPTED)
                stream_acks += 1
                if stream_acks >= 5:
                    acked_enough.set()

        async def caller(k: int) -> None:
            n = 0
            while not stopping.is_set():
                n += 1
                try:
                    reply = await client.metering.RecordUsage(mpb.RecordUsageRequest(
                        events=[usage(f"u-{k}-{n}")]))
                except Exception:  # refused after the drain began: nothing acknowledged
                    return
                acknowledged.update(r.event_id for r in reply.results if r.status == ACCEPTED)

        async def health_watch(states: list[int]) -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=SERVICE))
                try:
                    async for update in watch:
                        states.append(update.status)
                except grpc.aio.AioRpcError:
                    return  # the server went away

        states: list[int] = []
        watcher = asyncio.ensure_future(health_watch(states))
        load = [asyncio.ensure_future(streamer()),
                *(asyncio.ensure_future(caller(k)) for k in range(8))]
        await asyncio.wait_for(acked_enough.wait(), 30)
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, GRACE_SECONDS + 10)
        elapsed = time.monotonic() - sent_at
        stopping.set()
        await asyncio.gather(*load, return_exceptions=True)
        await asyncio.wait_for(watcher, 5)

        assert returncode == 0
        assert elapsed < DRAIN_DELAY_MS / 1000 + GRACE_SECONDS + 2
        assert states[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in states, states
        assert reconnect_asked.is_set(), "the usage stream was asked to reconnect"
        assert len(acknowledged) >= 100
        conn = await asyncpg.connect(db.asyncpg_url(db_url))
        try:
            recorded = {r["event_id"] for r in await conn.fetch(
                "SELECT event_id FROM metering.usage_events WHERE org_id = 'acme'")}
            # an event is debited once the ledger has its batch's transfer for the org
            debited = {r["event_id"] for r in await conn.fetch(
                "SELECT e.event_id FROM metering.usage_events e WHERE e.org_id = 'acme' "
                "AND EXISTS (SELECT 1 FROM ledger.transfers t "
                "WHERE t.transfer_id = 'usage:' || e.ledger_batch_id || ':acme')")}
        finally:
            await conn.close()
        assert acknowledged <= recorded, "an acknowledged event was lost"
        assert acknowledged <= debited, "an acknowledged event was not debited"
    finally:
        await client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        await stop_suite(suite)
