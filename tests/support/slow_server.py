"""A server built with the kit whose one RPC takes a while: the subject of the shutdown test.

Run as `python -m tests.support.slow_server`; it logs `serving` with its address, and
`slow_call_started` when a call is in flight, so the test knows when to send SIGTERM.
"""

from __future__ import annotations

import asyncio

import grpc

from tally.kit.config import KitConfig
from tally.kit.log import get_logger
from tally.kit.server import ServiceApp, run_service

SERVICE = "tally.test.v1.SlowService"
CALL_SECONDS = 1.5  # the work an in-flight call still has to finish after SIGTERM

log = get_logger("slow_server")


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    log.info("slow_call_started")
    await asyncio.sleep(CALL_SECONDS)
    return b"done:" + request


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Work": grpc.unary_unary_rpc_method_handler(_slow)}
    )
    server.add_generic_rpc_handlers((handler,))


async def _build(config: KitConfig) -> ServiceApp:
    return ServiceApp("slow", [SERVICE], _register)


if __name__ == "__main__":
    run_service("slow", _build, port=0)
