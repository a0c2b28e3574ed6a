"""A database outage answers UNAVAILABLE (retryable), turns the service NOT_SERVING, and it
serves again when the database is back, without a restart.

The machine's PostgreSQL is shared, so the outage is made by a TCP fault proxy between the
service and it (tests/support/fault_proxy.py): cutting every connection and refusing new ones
is what a restarting or unreachable server looks like to the service.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.ledger.server import build
from services.metering.server import MeteringConfig
from tally.kit.config import load_kit_config
from tally.kit.errors import Reason, from_rpc_error
from tally.kit.readiness import is_outage
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tally.limits import OutagePolicy, RedisLimiter
from tests.metering.conftest import start_suite, stop_suite
from tests.support.fault_proxy import FaultProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE_PERIOD_S = 0.05  # how often the test asks, as a kubelet does (its period scaled down)
PROBES = 400  # a bound on waiting for a state change (20 s), not a timing assertion


async def _until(condition: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(PROBES):
        if await condition():
            return
        await asyncio.sleep(PROBE_PERIOD_S)
    raise AssertionError(f"{condition.__name__} never held")


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[FaultProxy]:
    started = await FaultProxy.for_url(db_url)
    yield started
    await started.close()


@pytest.fixture
async def ledger(db_url: str, proxy: FaultProxy) -> AsyncIterator[RunningServer]:
    config = dataclasses.replace(load_kit_config({}), database_url=proxy.rewrite(db_url),
                                 migrate_on_start=False, db_pool_size=4)
    running = await start_server(await build(config), port=0)
    yield running
    proxy.restore()
    await running.stop()


async def test_database_outage_answers_unavailable_and_readiness_follows_it(
        ledger: RunningServer, proxy: FaultProxy) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger.port}") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        request = ledger_pb2.GetBalanceRequest(org_id="org-outage")

        async def answer() -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.GetBalance(request)
            return failed.value

        # the database answers: the org has no account yet
        assert (await answer()).code() == grpc.StatusCode.NOT_FOUND

        async def status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest())
            return int(reply.status)

        assert await status() == SERVING

        proxy.cut()
        refused = await answer()
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        error = from_rpc_error(refused)
        assert error is not None and error.reason is Reason.UNAVAILABLE
        assert error.retry_after is not None
        assert await status() == NOT_SERVING

        proxy.restore()

        async def serving() -> bool:
            return await status() == SERVING

        await _until(serving)
        assert (await answer()).code() == grpc.StatusCode.NOT_FOUND


async def test_an_outage_without_traffic_is_seen_by_the_health_check(
        ledger: RunningServer, proxy: FaultProxy) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        proxy.cut()

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest())
            return reply.status == NOT_SERVING

        await _until(not_serving)
        proxy.restore()

        async def serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest())
            return reply.status == SERVING

        await _until(serving)


async def test_connection_errors_of_every_kind_count_as_an_outage(db_url: str) -> None:
    proxy = await FaultProxy.for_url(db_url)
    try:
        proxy.cut()
        with pytest.raises(Exception) as refused:
            await asyncpg.connect(proxy.rewrite(db_url), timeout=5)
        assert is_outage(refused.value)
    finally:
        await proxy.close()
    conn = await asyncpg.connect(db_url)
    await conn.close()
    with pytest.raises(asyncpg.InterfaceError) as closed:
        await conn.fetchval("SELECT 1")
    assert is_outage(closed.value)
    for exc in (asyncpg.CannotConnectNowError("starting up"),
                asyncpg.ConnectionDoesNotExistError("gone"),
                asyncpg.TooManyConnectionsError("too many"),
                FileNotFoundError(2, "no such socket"), ConnectionRefusedError(),
                TimeoutError()):
        assert is_outage(exc), exc
    wrapped = RuntimeError("store failed")
    wrapped.__cause__ = asyncpg.ConnectionDoesNotExistError("gone")
    assert is_outage(wrapped)
    # what asyncpg raises on a pooled connection that got the server's shutdown notice idle
    # (seen in the chaos suite's PostgreSQL restart)
    assert is_outage(asyncpg.exceptions.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress"))
    for exc in (ValueError("bad"), asyncpg.UniqueViolationError("dup"),
                asyncpg.InterfaceError("another operation is in progress"),
                asyncpg.exceptions.InternalClientError("unexpected message")):
        assert not is_outage(exc), exc


async def test_metering_is_not_serving_while_redis_is_unreachable_with_hard_quotas(
        db_url: str, redis_url: str) -> None:
    redis_proxy = await FaultProxy.for_url(redis_url)
    limiter = RedisLimiter(redis_proxy.rewrite(redis_url), on_outage=OutagePolicy.DENY)
    suite = await start_suite(db_url, MeteringConfig(policy_cache_ms=0), limiter)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.metering.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def is_(status: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    reply = await health.Check(health_pb2.HealthCheckRequest())
                    return reply.status == status
                return check

            await _until(is_(SERVING))
            redis_proxy.cut()  # a health check's probe (Redis PING) sees it
            await _until(is_(NOT_SERVING))
            redis_proxy.restore()
            await _until(is_(SERVING))
    finally:
        await stop_suite(suite)
        await redis_proxy.close()
