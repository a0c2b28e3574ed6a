"""Shutdown under load: every call a client sent either completes or is refused UNAVAILABLE
(which clients retry), never CANCELLED — including calls gRPC had accepted but not yet handed
to a handler when the server began to stop — and each refusal is counted."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from tally.kit import metrics
from tally.kit.server import ServiceApp, start_server

SERVICE = "tally.test.v1.BusyService"
CALLERS = 8


async def _work(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    await asyncio.sleep(0.002)
    return request


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Work": grpc.unary_unary_rpc_method_handler(_work)}),))


@pytest.mark.parametrize("drain_delay_s", [0.0, 0.2])
async def test_calls_sent_while_stopping_complete_or_get_unavailable_never_cancelled(
        drain_delay_s: float) -> None:
    running = await start_server(ServiceApp("busy", [SERVICE], _register), port=0,
                                 grace_seconds=5, drain_delay_seconds=drain_delay_s)
    outcomes: Counter[str] = Counter()
    started = asyncio.Event()
    labels = {"service": SERVICE, "method": "Work"}
    refused_before = metrics.sample("tally_rpc_refused_shutting_down_total", labels)

    async def caller(channel: grpc.aio.Channel) -> None:
        work = channel.unary_unary(f"/{SERVICE}/Work")
        while True:
            try:
                await work(b"x", timeout=10)
                outcomes["OK"] += 1
                if outcomes["OK"] >= 50:
                    started.set()
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                if exc.code() != grpc.StatusCode.CANCELLED:
                    return  # refused: a client would retry elsewhere

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") for _ in range(CALLERS)]
    callers = [asyncio.create_task(caller(c)) for c in channels]
    await started.wait()
    await running.stop()
    await asyncio.gather(*callers)
    for channel in channels:
        await channel.close()
    assert outcomes["CANCELLED"] == 0, outcomes
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    refused = metrics.sample("tally_rpc_refused_shutting_down_total", labels)
    # every refusal the server made is counted, and the client saw each as UNAVAILABLE
    assert 0 < refused - refused_before <= outcomes["UNAVAILABLE"]
