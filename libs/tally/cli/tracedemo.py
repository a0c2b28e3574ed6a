"""`tally trace-demo`: one metered request, followed across the whole suite in one trace.

It starts an OTLP receiver in this process (the official opentelemetry-proto service), brings
the four services up on their own ports and data directory with OTLP export pointed at it,
runs one request inside a root span — Authorize (price book, the new org's first credit
lease: ledger ExtendLease) -> StreamUsage (group commit -> ledger PostUsageBatch -> outbox) ->
notifier (the alert the debit causes) —
then prints the span tree of that trace and stops the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tally.cli import suite
from tally.common.v1 import common_pb2 as cpb
from tally.kit.config import KitConfig
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.sdk.client import TallyClient

CREDIT = 1_000_000
ROOT = "demo.metered_request"
WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Span:
    """One received span."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    database: str = ""
    """db.system of a client span to a database (collapsed when printed)."""
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)
    """The span's tally.* attributes, as text."""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.arrived = asyncio.Event()

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "?")
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    database = next((a.value.string_value for a in s.attributes
                                     if a.key == "db.system"), "")
                    domain = {a.key: str(getattr(a.value, a.value.WhichOneof("value") or
                                                 "string_value"))
                              for a in s.attributes if a.key.startswith("tally.")}
                    self.spans.append(Span(s.trace_id.hex(), s.span_id.hex(),
                                           s.parent_span_id.hex(), s.name, service,
                                           s.start_time_unix_nano, database, domain))
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def of(self, trace_id: str) -> list[Span]:
        """The spans of one trace received so far."""
        return [s for s in self.spans if s.trace_id == trace_id]


def tree(spans: list[Span]) -> list[tuple[int, Span]]:
    """(depth, span) in tree order; spans whose parent was not received (the notifier's,
    which continue the trace from an outbox event) hang under the root."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    roots = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.parent_id and span.parent_id in ids:
            children.setdefault(span.parent_id, []).append(span)
        else:
            roots.append(span)
    root = next((s for s in roots if s.name == ROOT), roots[0] if roots else None)
    if root is None:
        return []
    for orphan in roots:
        if orphan is not root:
            children.setdefault(root.span_id, []).append(orphan)
    out: list[tuple[int, Span]] = []

    def walk(span: Span, depth: int) -> None:
        out.append((depth, span))
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
            walk(child, depth + 1)

    walk(root, 0)
    return out


def render(spans: list[Span]) -> str:
    """The tree as text, one span per line (service: name); the database calls made under one
    span are folded into one line per database with their count."""
    lines: list[list[Any]] = []  # [text, count]; count is None for a span's own line
    folded: dict[tuple[int, str], list[Any]] = {}
    for depth, span in tree(spans):
        if not span.database:
            folded = {k: v for k, v in folded.items() if k[0] < depth}
            lines.append([f"{'  ' * depth}{span.service}: {span.name}", None])
        elif (depth, span.database) in folded:
            folded[(depth, span.database)][1] += 1
        else:
            line = [f"{'  ' * depth}{span.service}: {span.database} statements x", 1]
            folded[(depth, span.database)] = line
            lines.append(line)
    return "\n".join(text if count is None else f"{text}{count}" for text, count in lines)


class _ToReceiver(SpanExporter):
    """The demo's own spans, straight into the receiver (no network hop to ourselves)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def export(self, spans: Any) -> SpanExportResult:
        for s in spans:
            context = s.get_span_context()
            self.receiver.spans.append(Span(
                format(context.trace_id, "032x"), format(context.span_id, "016x"),
                format(s.parent.span_id, "016x") if s.parent else "", s.name, "tally-demo",
                s.start_time or 0))
        return SpanExportResult.SUCCESS


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def _serve_receiver(receiver: Receiver, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        receiver, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def _request(config: KitConfig, provider: TracerProvider) -> str:
    """Runs the metered request under the root span; returns its trace id."""
    org = f"trace-{uuid.uuid4().hex[:8]}"
    tracer = provider.get_tracer("tally.trace-demo")
    async with TallyClient.from_config(config, actor="user:trace-demo") as tally:
        await tally.ledger.Transfer(lpb.TransferRequest(
            transfer_id=f"fund-{org}", org_id=org, kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=10 * CREDIT, reason="trace demo"))
        await tally.notifier.CreateAlertRule(npb.CreateAlertRuleRequest(
            request_id=f"rule-{org}", rule=npb.AlertRule(
                org_id=org, types=[npb.NOTIFICATION_TYPE_LOW_BALANCE],
                channel=npb.CHANNEL_STREAM, low_balance_threshold_micros=10 * CREDIT,
                enabled=True)))
        with tracer.start_as_current_span(ROOT) as root:
            asked = await tally.metering.Authorize(mpb.AuthorizeRequest(
                request_id=f"trace-{org}", context=cpb.RequestContext(org_id=org),
                model="claude-sonnet", operation=mpb.OPERATION_CHAT,
                estimated_input_tokens=3_000, max_output_tokens=1_000))
            event = mpb.UsageEvent(
                event_id=f"trace-usage-{org}", model=asked.model,
                operation=mpb.OPERATION_CHAT, reservation_id=asked.reservation_id,
                context=cpb.RequestContext(org_id=org),
                quantities=[cpb.MeterQuantity(meter=cpb.METER_INPUT_TOKENS, quantity=2_800),
                            cpb.MeterQuantity(meter=cpb.METER_OUTPUT_TOKENS, quantity=640)])
            event.occurred_at.GetCurrentTime()

            async def one_batch() -> AsyncIterator[mpb.StreamUsageRequest]:
                yield mpb.StreamUsageRequest(batch_id="1", events=[event])

            [_ async for _ in tally.metering.StreamUsage(one_batch())]
            return format(root.get_span_context().trace_id, "032x")


_EXPECTED = {("tally-demo", ROOT), ("tally-metering", "metering.group_commit"),
             ("tally-ledger", "/tally.ledger.v1.LedgerService/ExtendLease"),
             ("tally-ledger", "/tally.ledger.v1.LedgerService/PostUsageBatch"),
             ("tally-notifier", "notifier.notification")}


def _complete(spans: list[Span]) -> bool:
    """Every expected span is in, and every span but the root has its parent in — the
    notifier's too, whose parent is the span that wrote the outbox event (its traceparent):
    each service exports on its own schedule, so a parent can arrive after its children."""
    if not _EXPECTED <= {(s.service, s.name) for s in spans}:
        return False
    ids = {s.span_id for s in spans}
    return all(s.parent_id in ids for s in spans if s.name != ROOT)


async def run(base: KitConfig, data_dir: Path) -> tuple[str, list[Span]]:
    """Brings a traced suite up, runs the request, waits for its spans; returns (trace id,
    spans). The suite is stopped whatever happens."""
    receiver = Receiver()
    otlp_port = free_port()
    server = await _serve_receiver(receiver, otlp_port)
    ports = {f"TALLY_{s.upper()}_PORT": str(free_port()) for s in suite.SERVICES}
    # the ledger's HTTP ports too, so a `tally up` suite on the default ports can keep running
    http_ports = {"TALLY_LEDGER_WEBHOOK_PORT": str(free_port()),
                  "TALLY_LEDGER_CHECKOUT_PORT": str(free_port())}
    env = {**ports, **http_ports, "TALLY_DATA_DIR": str(data_dir),
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "TALLY_NOTIFIER_POLL_MS": "50"}
    port = {s: int(ports[f"TALLY_{s.upper()}_PORT"]) for s in suite.SERVICES}
    config = dataclasses.replace(
        base, data_dir=data_dir, pricing_port=port["pricing"], metering_port=port["metering"],
        ledger_port=port["ledger"], notifier_port=port["notifier"],
        accounts_port=port["accounts"])
    provider = TracerProvider(resource=Resource.create({"service.name": "tally-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(_ToReceiver(receiver)))
    try:
        with _environment(env):
            await asyncio.to_thread(suite.up, config)
        try:
            trace_id = await _request(config, provider)
            deadline = time.monotonic() + WAIT_S
            while not _complete(receiver.of(trace_id)) and time.monotonic() < deadline:
                receiver.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(receiver.arrived.wait(), deadline - time.monotonic())
            return trace_id, receiver.of(trace_id)
        finally:
            await asyncio.to_thread(suite.down, config)
    finally:
        provider.shutdown()
        await server.stop(0)


def main(base: KitConfig) -> bool:
    """The CLI entry: runs, prints the tree; False if the trace did not reach the notifier."""
    trace_id, spans = asyncio.run(run(base, base.data_dir / "trace-demo"))
    print(f"trace {trace_id}: {len(spans)} spans")
    print(render(spans))
    return _complete(spans)
