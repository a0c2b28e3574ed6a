"""Long-lived streams vs graceful shutdown: a stream wrapped in `until_shutdown` ends cleanly
(status OK) as soon as the server begins stopping, instead of holding it for the whole grace
period, while an in-flight unary call still completes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from tally.kit.server import RunningServer, ServiceApp, start_server, until_shutdown

SERVICE = "tally.test.v1.Streams"
GRACE_SECONDS = 10.0
DRAIN_DELAY_S = 0.3
WORK_SECONDS = 0.5
PROMPT_STOP_S = 2.0  # "well under the grace period", with room for a slow CI box


class Streams:
    """A forever watch (server stream), a bidi echo with a goodbye, and a slow unary call."""

    def __init__(self, shutting_down: asyncio.Event) -> None:
        self.shutting_down = shutting_down
        self.open_sources = 0

    async def _ticks(self) -> AsyncIterator[bytes]:
        self.open_sources += 1
        try:
            yield b"tick"
            await asyncio.Event().wait()  # nothing more, ever: only shutdown ends this stream
        finally:
            self.open_sources -= 1

    async def watch(self, request: bytes, context: object) -> AsyncIterator[bytes]:
        async for tick in until_shutdown(self._ticks(), self.shutting_down):
            yield tick

    async def echo(self, requests: AsyncIterator[bytes], context: object
                   ) -> AsyncIterator[bytes]:
        async for message in until_shutdown(requests, self.shutting_down):
            yield b"ack:" + message
        yield b"bye"  # what StreamUsage does here: acknowledge what it took, then end

    async def work(self, request: bytes, context: object) -> bytes:
        await asyncio.sleep(WORK_SECONDS)
        return b"done:" + request

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch),
            "Echo": grpc.stream_stream_rpc_method_handler(self.echo),
            "Work": grpc.unary_unary_rpc_method_handler(self.work),
        }),))


async def serve() -> tuple[RunningServer, Streams]:
    shutting_down = asyncio.Event()
    streams = Streams(shutting_down)
    app = ServiceApp("streams", [SERVICE], streams.register, shutting_down=shutting_down)
    running = await start_server(app, port=0, grace_seconds=GRACE_SECONDS,
                                 drain_delay_seconds=DRAIN_DELAY_S)
    return running, streams


async def test_an_open_watch_stream_ends_cleanly_and_the_server_stops_well_within_grace(
) -> None:
    running, streams = await serve()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = channel.unary_stream(f"/{SERVICE}/Watch")(b"")
        assert await watch.read() == b"tick"
        assert streams.open_sources == 1
        work = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Work")(b"job-1"))
        await asyncio.sleep(0.1)  # the unary call is in flight

        started = time.monotonic()
        stopping = asyncio.create_task(running.stop())
        async with asyncio.timeout(PROMPT_STOP_S):
            assert await watch.read() is grpc.aio.EOF, "the watch ends at shutdown start"
        assert await watch.code() == grpc.StatusCode.OK

        # during the drain delay a new watch is still accepted, and ends at once
        late = channel.unary_stream(f"/{SERVICE}/Watch")(b"")
        async with asyncio.timeout(PROMPT_STOP_S):
            assert await late.read() is grpc.aio.EOF
        assert await late.code() == grpc.StatusCode.OK

        assert await work == b"done:job-1", "an in-flight unary call still completes"
        await stopping
        assert time.monotonic() - started < PROMPT_STOP_S < GRACE_SECONDS
    assert streams.open_sources == 0, "the watch's source ran its finally"


async def test_a_bidi_stream_stops_reading_at_shutdown_and_still_sends_its_last_replies(
) -> None:
    running, _ = await serve()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        chat = channel.stream_stream(f"/{SERVICE}/Echo")()
        await chat.write(b"batch-1")
        assert await chat.read() == b"ack:batch-1"

        started = time.monotonic()
        stopping = asyncio.create_task(running.stop())
        async with asyncio.timeout(PROMPT_STOP_S):
            assert await chat.read() == b"bye"
            assert await chat.read() is grpc.aio.EOF
        assert await chat.code() == grpc.StatusCode.OK
        await stopping
        assert time.monotonic() - started < PROMPT_STOP_S
