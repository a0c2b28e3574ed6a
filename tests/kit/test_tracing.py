"""The kit interceptor's server spans: one per RPC, joined to the caller's trace, current while
the handler runs, with the RPC attributes and a status that tells server faults from refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tally.kit.errors import Reason, TallyError
from tally.kit.server import KitInterceptor, TrustInternalCallers, current_principal

SERVICE = "tally.test.v1.Traced"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN_ID:016x}-01"


async def _handle(request: bytes, context: object) -> bytes:
    if request == b"refuse":
        raise TallyError(Reason.INSUFFICIENT_CREDITS, "amount_micros: not enough credit")
    if request == b"crash":
        raise RuntimeError("boom")
    current = trace.get_current_span().get_span_context()
    principal = current_principal.get()
    assert principal is not None
    return f"{current.trace_id:032x}/{principal.identity}".encode()


@pytest.fixture
async def traced() -> AsyncIterator[tuple[grpc.aio.Channel, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = grpc.aio.server(
        interceptors=[KitInterceptor(TrustInternalCallers(), tracer_provider=provider)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(_handle)}),))
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, exporter
    finally:
        await server.stop(0)


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, spans
    exporter.clear()
    return spans[0]


async def test_a_call_gets_a_server_span_in_the_callers_trace_current_in_the_handler(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
) -> None:
    channel, exporter = traced
    reply = await channel.unary_unary(f"/{SERVICE}/Call")(
        b"ok", metadata=(("traceparent", TRACEPARENT), ("x-tally-actor", "user:ada")))
    assert reply == f"{TRACE_ID:032x}/user:ada".encode(), "span current, principal set"

    span = only_span(exporter)
    assert span.name == f"/{SERVICE}/Call"
    assert span.kind is trace.SpanKind.SERVER
    assert span.context is not None and span.context.trace_id == TRACE_ID
    assert span.parent is not None and span.parent.span_id == PARENT_SPAN_ID
    attributes = dict(span.attributes or {})
    assert {k: attributes[k] for k in ("rpc.system", "rpc.service", "rpc.method",
                                       "rpc.grpc.status_code", "net.peer.ip")} == {
        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Call",
        "rpc.grpc.status_code": grpc.StatusCode.OK.value[0], "net.peer.ip": "127.0.0.1"}
    assert span.status.status_code is trace.StatusCode.UNSET


async def test_a_call_without_trace_headers_starts_a_new_trace(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
) -> None:
    channel, exporter = traced
    await channel.unary_unary(f"/{SERVICE}/Call")(b"ok")
    span = only_span(exporter)
    assert span.parent is None
    assert span.context is not None and span.context.trace_id != TRACE_ID


async def test_a_refusal_is_not_a_server_error_but_a_crash_is_with_its_exception(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
) -> None:
    channel, exporter = traced
    call = channel.unary_unary(f"/{SERVICE}/Call")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(b"refuse")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    span = only_span(exporter)
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0])
    assert span.status.status_code is trace.StatusCode.UNSET

    with pytest.raises(grpc.aio.AioRpcError) as crashed:
        await call(b"crash")
    assert crashed.value.code() == grpc.StatusCode.INTERNAL
    span = only_span(exporter)
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == (
        grpc.StatusCode.INTERNAL.value[0])
    assert span.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


async def test_health_probes_are_not_traced(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
) -> None:
    channel, exporter = traced
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert exporter.get_finished_spans() == ()


_UNEXPORTED_PROCESS = f"""
from opentelemetry import propagate, trace
from tally.kit.telemetry import current_trace_id, setup_telemetry

setup_telemetry("probe")
tracer = trace.get_tracer("probe")
with tracer.start_as_current_span("root") as root:
    assert not root.is_recording(), "nothing exports it: not recorded"
    assert len(current_trace_id()) == 32, "but it has a trace id for the logs"
    carrier = {{}}
    propagate.inject(carrier)
    assert int(carrier["traceparent"][-2:], 16) & 1 == 0, "propagated as not sampled"
sampled = propagate.extract({{"traceparent": "{TRACEPARENT}"}})
with tracer.start_as_current_span("child", context=sampled) as child:
    assert child.is_recording(), "a caller's sampled trace stays sampled"
print("ok")
"""


def test_without_an_exporter_own_traces_are_not_recorded_but_keep_their_ids() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER")}
    done = subprocess.run([sys.executable, "-c", _UNEXPORTED_PROCESS], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


_CLIENT_SPANS_PROCESS = """
import asyncio, os
import asyncpg
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from tally.kit import db
from tally.kit.telemetry import setup_telemetry

exporter = InMemorySpanExporter()
provider = setup_telemetry("test", exporter=exporter)

async def main():
    with trace.get_tracer("test").start_as_current_span("rpc") as rpc:
        conn = await asyncpg.connect(db.asyncpg_url(os.environ["DB_URL"]))
        await conn.fetchval("SELECT 1")
        await conn.close()
        client = Redis.from_url(os.environ["REDIS_URL"])
        await client.ping()
        await client.aclose()
    provider.force_flush()
    spans = exporter.get_finished_spans()
    rpc_id = rpc.get_span_context().span_id
    children = [s for s in spans if s.parent is not None and s.parent.span_id == rpc_id]
    systems = {s.attributes.get("db.system") for s in children}
    assert {"postgresql", "redis"} <= systems, [(s.name, dict(s.attributes)) for s in spans]
    assert all(s.context.trace_id == rpc.get_span_context().trace_id for s in children)
    print("ok")

asyncio.run(main())
"""


def test_database_and_redis_calls_get_client_spans_under_the_rpc(
        db_url: str, redis_url: str) -> None:
    env = {**os.environ, "DB_URL": db_url, "REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, "-c", _CLIENT_SPANS_PROCESS], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


_INSTRUMENTED_PROCESS = f"""
import os
import asyncpg
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tally.kit.telemetry import setup_telemetry

exported = os.environ["EXPORTED"] == "1"
setup_telemetry("probe", exporter=InMemorySpanExporter() if exported else None)
assert hasattr(asyncpg.Connection.fetch, "__wrapped__") == exported
tracer = trace.get_tracer("probe")
with tracer.start_as_current_span("root") as root:
    assert not root.is_recording(), "ratio 0: a trace started here is not recorded"
sampled = propagate.extract({{"traceparent": "{TRACEPARENT}"}})
with tracer.start_as_current_span("child", context=sampled) as child:
    assert child.is_recording(), "the parent's decision stands"
print("ok")
"""


@pytest.mark.parametrize("exported", [True, False])
def test_clients_are_instrumented_only_with_an_exporter_and_sampled_by_the_parent(
        exported: bool) -> None:
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER")},
           "EXPORTED": "1" if exported else "0", "OTEL_TRACES_SAMPLER_ARG": "0"}
    done = subprocess.run([sys.executable, "-c", _INSTRUMENTED_PROCESS], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
