"""Graceful shutdown: SIGTERM mid-call -> NOT_SERVING, the call completes, the process exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.slow_server import SERVICE

REPO = Path(__file__).resolve().parents[2]
GRACE_SECONDS = 5
DRAIN_DELAY_MS = 300


async def _next_log(process: subprocess.Popen[str], event: str) -> dict[str, object]:
    assert process.stderr is not None
    while True:
        line = await asyncio.to_thread(process.stderr.readline)
        assert line, f"server exited before logging {event!r}"
        record = json.loads(line)
        if record.get("event") == event:
            return dict(record)


async def test_sigterm_mid_call_drains_and_exits_within_grace() -> None:
    env = dict(
        os.environ,
        TALLY_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        TALLY_SHUTDOWN_DRAIN_DELAY_MS=str(DRAIN_DELAY_MS),
    )
    process = subprocess.Popen(  # noqa: ASYNC220 - we read its stderr line by line
        [sys.executable, "-m", "tests.support.slow_server"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        serving = await _next_log(process, "serving")
        address = str(serving["address"])
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            call = channel.unary_unary(f"/{SERVICE}/Work")(b"job-1")
            await _next_log(process, "slow_call_started")
            sent_at = time.monotonic()
            process.send_signal(signal.SIGTERM)

            update = await watch.read()
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await call == b"done:job-1", "the in-flight call completes"
            watch.cancel()

        returncode = await asyncio.to_thread(process.wait, GRACE_SECONDS + 5)
        assert returncode == 0
        assert time.monotonic() - sent_at < GRACE_SECONDS + 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
