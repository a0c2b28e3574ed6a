"""Every RPC of every service, fuzzed from the proto descriptors: no request, however wrong,
gets INTERNAL or UNKNOWN; the services stay SERVING; a refused call writes no row.

The RPC list comes from the generated descriptors, so a new RPC is fuzzed without anyone
adding it here. CI runs a fixed seed and a bounded count (TALLY_FUZZ_CALLS per RPC);
`make fuzz` runs a random seed, printed for replay, for a time budget (TALLY_FUZZ_SECONDS):

    TALLY_FUZZ_SEED=1234 TALLY_FUZZ_CALLS=200 .venv/bin/python -m pytest tests/fuzz -s
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import EncodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.accounts.server import build as build_accounts
from services.ledger.server import build as build_ledger
from services.metering.server import build as build_metering
from services.notifier.server import build as build_notifier
from services.pricing.server import build as build_pricing
from tally.accounts.v1 import accounts_pb2
from tally.kit.config import load_kit_config
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import billing_pb2, ledger_pb2
from tally.metering.v1 import metering_pb2
from tally.notifier.v1 import notifier_pb2
from tally.pricing.v1 import pricing_pb2
from tests.fuzz.generate import Generator, spoiled

SERVICE_MODULES = {"pricing": (pricing_pb2,), "metering": (metering_pb2, rls_pb2),
                   "ledger": (ledger_pb2, billing_pb2), "notifier": (notifier_pb2,),
                   "accounts": (accounts_pb2,)}
"""Each service and the contract files it serves (the ledger serves BillingService too,
metering Envoy's RateLimitService)."""
FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CI_SEED = 20261207
UNARY_TIMEOUT_S = 20.0
STREAM_TIMEOUT_S = 0.5  # a watch with nothing to send ends on this deadline
STREAM_CALL_SHARE = 0.3  # server streams wait out their deadline: fewer of them


def _seed() -> int:
    raw = os.environ.get("TALLY_FUZZ_SEED", "")
    if raw == "random":
        return random.SystemRandom().randrange(2**31)
    return int(raw) if raw else CI_SEED


@dataclass
class Rpc:
    service: str  # pricing, metering, ledger, notifier
    method: d.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_class(self) -> type:
        return message_factory.GetMessageClass(self.method.input_type)


@dataclass
class Finding:
    rpc: str
    case: int
    problem: str


@dataclass
class Tally:
    codes: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    seconds: Counter[str] = field(default_factory=Counter)


def every_rpc() -> list[Rpc]:
    """Each RPC of each service in the contracts, from the descriptors."""
    found = []
    for service, modules in SERVICE_MODULES.items():
        for module in modules:
            for described in module.DESCRIPTOR.services_by_name.values():
                found.extend(Rpc(service, m) for m in described.methods)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def suite(db_url: str) -> AsyncIterator[dict[str, RunningServer]]:
    """All four services on their own ports, each knowing where the others are."""
    ports = {name: _free_port() for name in SERVICE_MODULES}
    config = dataclasses.replace(
        load_kit_config({}), database_url=db_url, migrate_on_start=False,
        **{f"{name}_port": port for name, port in ports.items()})
    running: dict[str, RunningServer] = {}
    try:
        for name, build in (("accounts", build_accounts), ("pricing", build_pricing),
                            ("ledger", build_ledger), ("metering", build_metering),
                            ("notifier", build_notifier)):
            running[name] = await start_server(await build(config), port=ports[name],
                                               grace_seconds=0.5)
        yield running
    finally:
        for name in ("notifier", "metering", "pricing", "ledger", "accounts"):
            if name in running:
                await running[name].stop()


class RowCounts:
    """Row counts of every table of a service's schema, in one query."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queries: dict[str, str] = {}

    async def of(self, schema: str) -> dict[str, int]:
        query = self.queries.get(schema)
        if query is None:
            tables = await self.conn.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')"
                " AND c.relname <> 'alembic_version' AND NOT c.relispartition", schema)
            parts = [f"'{t['relname']}', (SELECT count(*) FROM \"{schema}\".\"{t['relname']}\")"
                     for t in tables]
            query = self.queries[schema] = f"SELECT json_build_object({', '.join(parts)})"
        counts: dict[str, int] = json.loads(await self.conn.fetchval(query))
        return counts


async def _call(channel: grpc.aio.Channel, rpc: Rpc, payloads: list[bytes]
                ) -> tuple[grpc.StatusCode, str]:
    method = rpc.method
    if not method.client_streaming and not method.server_streaming:
        unary = channel.unary_unary(rpc.path)
        try:
            await unary(payloads[0], timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""
    if not method.client_streaming:
        stream = channel.unary_stream(rpc.path)(payloads[0], timeout=STREAM_TIMEOUT_S)
        try:
            async for _ in stream:
                stream.cancel()  # one message is enough: it was answered
                return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return await stream.code(), await stream.details() or ""
    bidi = channel.stream_stream(rpc.path)(iter(payloads), timeout=UNARY_TIMEOUT_S)
    try:
        async for _ in bidi:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return await bidi.code(), await bidi.details() or ""


def _payloads(rpc: Rpc, generator: Generator, rng: random.Random) -> list[bytes]:
    count = rng.choice([1, 1, 2, 3]) if rpc.method.client_streaming else 1
    out = []
    for _ in range(count):
        message = generator.message(rpc.request_class)
        try:
            payload = message.SerializeToString()
        except EncodeError:  # past protobuf's 2 GB: make a light one instead
            payload = Generator(rng, heavy=False).message(rpc.request_class).SerializeToString()
        if rng.random() < 0.12:
            payload = spoiled(payload, rpc.method.input_type, rng)
        out.append(payload)
    return out


async def _fuzz_one(rpc: Rpc, channel: grpc.aio.Channel, rows: RowCounts, rng: random.Random,
                    case: int, tally: Tally) -> None:
    generator = Generator(rng, edge_rate=rng.choice([0.02, 0.05, 0.15, 0.5, 1.0]))
    payloads = _payloads(rpc, generator, rng)
    codes = tally.codes.setdefault(rpc.path, Counter())
    for attempt in range(2):
        before = await rows.of(rpc.service)
        code, details = await _call(channel, rpc, payloads)
        if attempt == 0:
            codes[code.name] += 1
        if code in FORBIDDEN or "metadata size exceeds" in details:
            tally.findings.append(Finding(rpc.path, case, f"{code.name}: {details[:200]}"))
            return
        if code is grpc.StatusCode.OK or rpc.method.server_streaming:
            return  # accepted (a stream's rows are its own), nothing more to check
        after = await rows.of(rpc.service)
        changed = {t: (before[t], after.get(t)) for t in before if before[t] != after.get(t)}
        if not changed:
            return
        # A background loop (an expiry, a sealed outbox) may have written meanwhile: only a
        # refusal that writes again when replayed is the call's own doing.
        if attempt == 1:
            tally.findings.append(Finding(rpc.path, case,
                                          f"refused {code.name} but wrote rows {changed}"))


async def test_every_rpc_survives_random_and_boundary_requests(
        suite: dict[str, RunningServer], db_url: str) -> None:
    seed = _seed()
    calls = int(os.environ.get("TALLY_FUZZ_CALLS", "12"))
    budget_s = float(os.environ.get("TALLY_FUZZ_SECONDS", "0"))
    print(f"\nfuzz seed {seed} (replay: TALLY_FUZZ_SEED={seed}), {calls} calls per RPC"
          + (f", budget {budget_s:.0f}s" if budget_s else ""))
    rpcs = every_rpc()
    assert len(rpcs) >= 50, "the descriptors list fewer RPCs than the contracts have"
    tally = Tally()
    conn = await asyncpg.connect(db_url)
    channels = {name: grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}", options=[("grpc.max_receive_message_length", -1)])
        for name, running in suite.items()}
    started = time.monotonic()
    try:
        rows = RowCounts(conn)
        round_ = 0
        while True:
            for rpc in rpcs:
                rng = random.Random(f"{seed}:{round_}:{rpc.path}")
                share = STREAM_CALL_SHARE if rpc.method.server_streaming else 1.0
                began = time.monotonic()
                for case in range(max(1, int(calls * share))):
                    await _fuzz_one(rpc, channels[rpc.service], rows, rng, case, tally)
                tally.seconds[rpc.path] += time.monotonic() - began
                await _assert_serving(channels, rpc, tally)
            round_ += 1
            if not budget_s or time.monotonic() - started > budget_s:
                break
    finally:
        await conn.close()
        for channel in channels.values():
            await channel.close()
    _print_table(tally)
    problems = "\n".join(f"{f.rpc} case {f.case}: {f.problem}" for f in tally.findings[:60])
    assert not tally.findings, (
        f"{len(tally.findings)} findings (seed {seed}):\n{problems}")


async def _assert_serving(channels: dict[str, grpc.aio.Channel], rpc: Rpc, tally: Tally) -> None:
    for name, channel in channels.items():
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            tally.findings.append(Finding(rpc.path, -1, f"{name} is not SERVING after it"))


def _print_table(tally: Tally) -> None:
    print(f"{'rpc':<58} {'calls':>6} {'s':>6}  codes")
    for path, codes in sorted(tally.codes.items()):
        summary = ", ".join(f"{code} {n}" for code, n in codes.most_common())
        print(f"{path:<58} {sum(codes.values()):>6} {tally.seconds[path]:>6.1f}  {summary}")
