"""Raw gRPC baseline, measured in the same run as every other benchmark.

Absolute RPC figures mean little on their own: they swing with the machine, the Python
build, the grpcio release and whatever else the box is doing. Every Tally benchmark
therefore prints its own figure beside the figures produced here, on the same machine
in the same run, so the ratio (the overhead Tally adds on top of bare grpc.aio) is
what gets compared over time.

The baseline deliberately uses no generated protobuf stubs: generic method handlers
with identity ``bytes`` (de)serializers, so it measures transport plus grpc.aio
dispatch and nothing else.

The server runs in a child process started with multiprocessing ``spawn``: on a small
(2-core) machine a server sharing the client's event loop would make both sides
compete for one thread and understate what a deployed service sees. ``spawn`` rather
than ``fork`` because grpcio's core threads do not survive a fork.

Run ``python -m bench.baseline [--quick]``; it prints one JSON object to stdout.
Modules that import this one and call :func:`run_baseline` must keep their entry point
under ``if __name__ == "__main__":`` because ``spawn`` re-imports the main module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final, TypedDict, TypeVar

# grpcio ships no type information; the ignore keeps --strict green until the project
# adds types-grpcio to its dev extras, and "unused-ignore" keeps it green afterwards.
import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "BaselineResult",
    "StreamStats",
    "UnaryStats",
    "baseline_server",
    "loop_factory",
    "measure_baseline",
    "measure_stream",
    "measure_unary",
    "nearest_rank",
    "run_baseline",
    "run_in_loop",
]

_T = TypeVar("_T")

SERVICE: Final = "tally.bench.v1.Baseline"
ECHO_METHOD: Final = f"/{SERVICE}/Echo"
INGEST_METHOD: Final = f"/{SERVICE}/Ingest"

UNARY_PAYLOAD_BYTES: Final = 200
EVENTS_PER_MESSAGE: Final = 1000
# ~60 bytes is what one serialized metering event (ids, unit, quantity, timestamp) weighs.
EVENT_BYTES: Final = 60
# Each stream message starts with a 4-byte event count so the server does a (tiny) bit of
# per-message work and the final reply can be checked, without any protobuf parsing.
_COUNT_HEADER_BYTES: Final = 4

# Deadlines keep a wedged server from hanging the benchmark forever.
_UNARY_DEADLINE_S: Final = 30.0
_STREAM_DEADLINE_S: Final = 300.0
_CONNECT_TIMEOUT_S: Final = 10.0
_SERVER_START_TIMEOUT_S: Final = 30.0
_SERVER_STOP_TIMEOUT_S: Final = 5.0


class UnaryStats(TypedDict):
    """Latency/throughput summary of a batch of unary calls."""

    calls: int
    concurrency: int
    qps: float
    p50_ms: float
    p99_ms: float


class StreamStats(TypedDict):
    """Throughput summary of one client stream."""

    messages: int
    events: int
    seconds: float
    events_per_s: float


class BaselineResult(TypedDict):
    """Everything :func:`run_baseline` measures."""

    unary_1: UnaryStats
    unary_64: UnaryStats
    client_stream_1000: StreamStats


# ---------------------------------------------------------------------------- event loop


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return ``uvloop.new_event_loop`` when uvloop is importable, else ``None`` (asyncio's).

    The services run on uvloop in production, so the baseline should too when it can.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_in_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` to completion on a fresh event loop from :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


# ---------------------------------------------------------------------------- statistics


def nearest_rank(sorted_values: Sequence[int], pct: int) -> int:
    """Return the ``pct``-th percentile of ascending ``sorted_values`` (nearest-rank method).

    Rank is ``ceil(pct * n / 100)`` in integer arithmetic, so no interpolation and no
    float rounding: the result is always one of the observed samples.
    """
    if not sorted_values:
        raise ValueError("no samples")
    if not 0 < pct <= 100:
        raise ValueError(f"pct must be in (0, 100], got {pct}")
    rank = -(-pct * len(sorted_values) // 100)  # ceiling division
    return sorted_values[max(rank, 1) - 1]


async def _drive(
    call: Callable[[], Awaitable[object]],
    total: int,
    concurrency: int,
    latencies_ns: list[int] | None,
) -> None:
    """Issue ``total`` calls from ``concurrency`` tasks; record each latency if asked."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        # Bounded: every iteration claims one of the ``total`` slots. The claim needs no
        # lock because nothing awaits between the check and the increment.
        while next_index < total:
            index = next_index
            next_index += 1
            started = time.perf_counter_ns()
            await call()
            if latencies_ns is not None:
                latencies_ns[index] = time.perf_counter_ns() - started

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, total)):
            group.create_task(worker())


async def measure_unary(
    call: Callable[[], Awaitable[object]],
    calls: int,
    concurrency: int,
    warmup: int = 0,
) -> UnaryStats:
    """Time ``calls`` awaits of ``call()`` issued by ``concurrency`` concurrent tasks.

    ``warmup`` untimed calls go first through the same task pool, so connection setup,
    HTTP/2 window growth and first-call code paths stay out of the figures. QPS is
    ``calls`` over wall time; p50/p99 are nearest-rank over per-call latencies taken
    with ``time.perf_counter_ns``.
    """
    if calls <= 0 or concurrency <= 0 or warmup < 0:
        raise ValueError("calls and concurrency must be positive, warmup non-negative")
    if warmup:
        await _drive(call, warmup, concurrency, None)
    latencies_ns = [0] * calls
    started = time.perf_counter_ns()
    await _drive(call, calls, concurrency, latencies_ns)
    elapsed_ns = time.perf_counter_ns() - started
    latencies_ns.sort()
    return {
        "calls": calls,
        "concurrency": concurrency,
        "qps": round(calls * 1e9 / elapsed_ns, 1),
        "p50_ms": round(nearest_rank(latencies_ns, 50) / 1e6, 3),
        "p99_ms": round(nearest_rank(latencies_ns, 99) / 1e6, 3),
    }


async def measure_stream(
    run: Callable[[], Awaitable[object]],
    messages: int,
    events: int,
) -> StreamStats:
    """Time one awaited ``run()`` that moves ``messages`` messages carrying ``events`` events.

    ``run`` should open the stream, send everything and await the final reply, so the
    figure covers the whole round trip including the server's acknowledgement.
    """
    if messages <= 0 or events <= 0:
        raise ValueError("messages and events must be positive")
    started = time.perf_counter_ns()
    await run()
    elapsed_ns = time.perf_counter_ns() - started
    return {
        "messages": messages,
        "events": events,
        "seconds": round(elapsed_ns / 1e9, 4),
        "events_per_s": round(events * 1e9 / elapsed_ns, 1),
    }


# ---------------------------------------------------------------------------- server


def _identity(data: bytes) -> bytes:
    # Explicit identity (rather than None) so each message pays the same Python call a
    # generated stub's SerializeToString/FromString would be invoked through.
    return data


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _ingest(
    request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> bytes:
    events = 0
    async for message in request_iterator:
        events += int.from_bytes(message[:_COUNT_HEADER_BYTES], "big")
    return events.to_bytes(8, "big")


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo, request_deserializer=_identity, response_serializer=_identity
            ),
            "Ingest": grpc.stream_unary_rpc_method_handler(
                _ingest, request_deserializer=_identity, response_serializer=_identity
            ),
        },
    )


async def _serve_async(conn: Connection) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The pipe turns readable on the parent's stop message *or* on EOF when the parent
    # dies, so the child never outlives the benchmark that spawned it.
    loop.add_reader(conn.fileno(), stop.set)
    try:
        conn.send(port)
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await server.stop(grace=1.0)


def _serve(conn: Connection) -> None:
    """Child-process entry point: serve until the parent says stop or goes away."""
    try:
        run_in_loop(_serve_async(conn))
    finally:
        conn.close()


@contextlib.contextmanager
def child_server(name: str, target: Callable[..., None], args: tuple[Any, ...] = (), *,
                 start_timeout_s: float = _SERVER_START_TIMEOUT_S,
                 stop_timeout_s: float = _SERVER_STOP_TIMEOUT_S) -> Iterator[str]:
    """Run a server in a spawned child process; yield its ``host:port`` target.

    `target(conn, *args)` must send its port over `conn` once serving, and stop when the pipe
    turns readable (the parent's stop message, or EOF if the parent died). The child is always
    stopped on exit: politely via the pipe, then SIGTERM, then SIGKILL.
    """
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=target, args=(child_conn, *args), name=f"bench-{name}-server",
                          daemon=True)
    process.start()
    # Drop our copy of the child's end so the child alone holds it (EOF semantics).
    child_conn.close()
    try:
        if not parent_conn.poll(start_timeout_s):
            raise RuntimeError(
                f"{name} server did not report a port within {start_timeout_s}s"
            )
        try:
            port = parent_conn.recv()
        except EOFError as exc:
            raise RuntimeError(
                f"{name} server exited during start-up (exit code {process.exitcode})"
            ) from exc
        if not isinstance(port, int) or port <= 0:
            raise RuntimeError(f"{name} server reported a bad port: {port!r}")
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(OSError):
            parent_conn.send("stop")
        parent_conn.close()
        process.join(stop_timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(stop_timeout_s)
        if process.is_alive():
            process.kill()
            process.join(stop_timeout_s)


@contextlib.contextmanager
def baseline_server() -> Iterator[str]:
    """Run the baseline server in a spawned child process; yield its ``host:port`` target."""
    with child_server("baseline", _serve) as target:
        yield target


# ---------------------------------------------------------------------------- client


def _stream_message(rng: random.Random) -> bytes:
    # Random (incompressible) bytes so nothing along the path gets an unrealistic shortcut.
    header = EVENTS_PER_MESSAGE.to_bytes(_COUNT_HEADER_BYTES, "big")
    return header + rng.randbytes(EVENTS_PER_MESSAGE * EVENT_BYTES)


async def measure_baseline(target: str, quick: bool = False) -> BaselineResult:
    """Measure the three baseline figures against an already running baseline server.

    ``quick`` divides every count by 10 (CI smoke runs; figures are noisier).
    """
    scale = 10 if quick else 1
    rng = random.Random(20240601)  # fixed seed: identical payloads run to run
    payload = rng.randbytes(UNARY_PAYLOAD_BYTES)
    message = _stream_message(rng)

    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), _CONNECT_TIMEOUT_S)
        echo = channel.unary_unary(
            ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        ingest = channel.stream_unary(
            INGEST_METHOD, request_serializer=_identity, response_deserializer=_identity
        )

        # One checked call first: a broken server must fail loudly, not benchmark fast.
        if await echo(payload, timeout=_UNARY_DEADLINE_S) != payload:
            raise RuntimeError("echo returned a different payload")

        async def echo_once() -> None:
            await echo(payload, timeout=_UNARY_DEADLINE_S)

        unary_1 = await measure_unary(echo_once, 3000 // scale, 1, warmup=300 // scale)
        unary_64 = await measure_unary(echo_once, 20000 // scale, 64, warmup=2000 // scale)

        async def requests(count: int) -> AsyncIterator[bytes]:
            for _ in range(count):  # bounded by count
                yield message

        async def one_stream(count: int) -> None:
            reply = await ingest(requests(count), timeout=_STREAM_DEADLINE_S)
            received = int.from_bytes(reply, "big")
            if received != count * EVENTS_PER_MESSAGE:
                raise RuntimeError(f"server counted {received} events, sent {count * 1000}")

        messages = 300 // scale
        # Warm-up with a full-size stream: HTTP/2 BDP probing keeps growing the flow-control
        # windows for a few MB, and a short warm-up left the figure still climbing.
        await one_stream(messages)
        stream = await measure_stream(
            lambda: one_stream(messages), messages, messages * EVENTS_PER_MESSAGE
        )

    return {"unary_1": unary_1, "unary_64": unary_64, "client_stream_1000": stream}


def run_baseline(quick: bool = False) -> BaselineResult:
    """Start the baseline server in a child process, measure, stop it; return the figures.

    Must be called from synchronous code (it runs its own event loop). Async callers use
    :func:`baseline_server` plus :func:`measure_baseline` instead.
    """
    with baseline_server() as target:
        return run_in_loop(measure_baseline(target, quick=quick))


def _machine() -> dict[str, object]:
    uvloop_version: str | None
    try:
        uvloop_version = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = None
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "uvloop": uvloop_version,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: print the baseline figures as one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="counts / 10, for CI smoke")
    args = parser.parse_args(argv)
    result: dict[str, object] = {**run_baseline(quick=args.quick), "machine": _machine()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
