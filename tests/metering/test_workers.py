"""Several metering processes at once — two replicas in process and a service of two worker
processes on one port (SO_REUSEPORT) — ingesting the same orgs charge exactly what one
metering charges: per-org state (rating carry, month-to-date tier usage) stays correct."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tally.cli.suite import health_state
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient
from tests.metering.conftest import Suite
from tests.metering.test_durability import REPO, _until
from tests.metering.test_ingestion import usage

ACCEPTED = mpb.EVENT_STATUS_ACCEPTED
DUPLICATE = mpb.EVENT_STATUS_DUPLICATE
ORGS = 3


def events_of(prefix: str) -> list[mpb.UsageEvent]:
    """The same usage for every prefix: 3 orgs, models priced per token (sub-micro amounts,
    so the rating carry matters), sizes that vary."""
    rng = random.Random(5)
    return [usage(f"ev-{i}", org=f"{prefix}-{i % ORGS}",
                  model=("gpt-4.1-mini", "gpt-4.1", "claude-sonnet")[i % 3],
                  input_tokens=rng.randint(1, 3000), output_tokens=rng.randint(0, 700))
            for i in range(900)]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (from /proc)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    sockets = {f"socket:[{i}]" for i in inodes}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) in sockets:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


async def charged_per_org(suite: Suite, prefix: str) -> dict[str, int]:
    debited = {}
    for k in range(ORGS):
        org = f"{prefix}-{k}"
        reply = await suite.client.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))
        debited[org.removeprefix(prefix)] = 1_000 * 1_000_000 - reply.balance.posted_micros
    return debited


async def test_two_workers_and_two_replicas_at_once_charge_what_one_metering_charges(
    suite: Suite, redis_url: str,
) -> None:
    for prefix in ("solo", "multi"):
        for k in range(ORGS):
            await suite.fund(f"{prefix}-{k}", 1_000)
    # one metering, one event after another: the reference
    for start in range(0, 900, 100):
        reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
            events=events_of("solo")[start:start + 100]))
        assert {r.status for r in reply.results} == {ACCEPTED}

    replica, replica_client = await suite.start_metering_replica()
    port = free_port()
    env = dict(os.environ, TALLY_DATABASE_URL=suite.db_url, TALLY_MIGRATE_ON_START="false",
               TALLY_PRICING_PORT=str(suite.config.pricing_port),
               TALLY_LEDGER_PORT=str(suite.config.ledger_port), TALLY_METERING_PORT=str(port),
               TALLY_METERING_WORKERS="2", TALLY_METERING_LIMITER="redis",
               TALLY_REDIS_URL=redis_url)
    service = subprocess.Popen(  # noqa: ASYNC220 - started once, then awaited over gRPC
        [sys.executable, "-m", "services.metering"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 4 connections to the two-worker service, so both of its processes take some
    to_workers = [TallyClient({"metering": f"127.0.0.1:{port}"}, actor="service:test")
                  for _ in range(4)]
    try:
        async def serving() -> bool:
            return await health_state(f"127.0.0.1:{port}", 0.5) == "SERVING"

        await _until(serving, "the two-worker metering came up")
        (worker,) = _children(service.pid)

        async def both_listening() -> bool:
            return _listens_on(service.pid, port) and _listens_on(worker, port)

        # the service is two processes serving the one port
        await _until(both_listening, "both metering workers listen on the port")
        # every event goes to every entry point, each in its own order, all at once
        receipts: dict[str, set[int]] = defaultdict(set)
        statuses: dict[str, list[int]] = defaultdict(list)

        async def stream(client: TallyClient, seed: int) -> None:
            mine = events_of("multi")
            random.Random(seed).shuffle(mine)

            async def batches():  # type: ignore[no-untyped-def]
                for start in range(0, len(mine), 50):
                    yield mpb.StreamUsageRequest(batch_id=str(start),
                                                 events=mine[start:start + 50])

            async for ack in client.metering.StreamUsage(batches()):
                for result in ack.results:
                    statuses[result.event_id].append(result.status)
                    receipts[result.event_id].add(result.receipt.cost_micros)

        await asyncio.gather(stream(suite.client, 1), stream(replica_client, 2),
                             *(stream(client, 3 + i) for i, client in enumerate(to_workers)))
        assert _listens_on(worker, port)  # still serving after the streams
    finally:
        for client in to_workers:
            await client.close()
        await replica_client.close()
        await replica.stop()
        service.terminate()
        service.wait(timeout=30)
    # each event accepted once and answered with one cost wherever it went
    assert len(statuses) == 900
    assert all(sorted(s).count(ACCEPTED) == 1 and set(s) <= {ACCEPTED, DUPLICATE}
               for s in statuses.values())
    assert all(len(costs) == 1 for costs in receipts.values())
    solo, multi = await charged_per_org(suite, "solo"), await charged_per_org(suite, "multi")
    assert multi == solo
    acked = defaultdict(int)
    for event_id, costs in receipts.items():
        acked[f"-{int(event_id.removeprefix('ev-')) % ORGS}"] += next(iter(costs))
    assert dict(acked) == multi
