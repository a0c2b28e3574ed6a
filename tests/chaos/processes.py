"""The five services as real processes (the way `tally up` and a cluster run them), so a test
can SIGKILL one and start it again on the same port; metering reaches the ledger through a
fault proxy and keeps its quotas in a Redis (Valkey) server of its own that the test stops and
starts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tally.cli.suite import health_state
from tally.kit import db, infra
from tally.kit.db import SERVICES
from tally.kit.infra import EmbeddedRedis
from tally.sdk.client import TallyClient
from tests.support.fault_proxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
_START_TIMEOUT_S = 60.0


@dataclass
class ProcessSuite:
    """Five service processes on fixed ports (a restarted one comes back where clients look)."""

    db_url: str
    data_dir: Path
    ports: dict[str, int]
    checkout_port: int
    webhook_port: int
    ledger_proxy: FaultProxy
    redis_port: int
    redis: EmbeddedRedis | None = None
    postgres: OwnPostgres | None = None
    """The suite's own PostgreSQL, when the test stops and starts it."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    client: TallyClient | None = None

    @classmethod
    async def start(cls, db_url: str, data_dir: Path, *, postgres: OwnPostgres | None = None
                    ) -> ProcessSuite:
        # A child process binds these after we pick them (it cannot report a port 0 back),
        # so they are picked together, right before the children start.
        ports = {service: infra.free_port() for service in SERVICES}
        suite = cls(db_url, data_dir, ports, infra.free_port(), infra.free_port(),
                    await FaultProxy.start("127.0.0.1", ports["ledger"]), infra.free_port(),
                    postgres=postgres)
        suite.start_redis()
        for service in SERVICES:
            suite.spawn(service)
        for service in SERVICES:
            await suite.wait_serving(service)
        suite.client = TallyClient({s: f"127.0.0.1:{p}" for s, p in ports.items()},
                                   actor="service:chaos")
        return suite

    def start_redis(self) -> None:
        self.redis = infra.start_embedded_redis(self.data_dir / f"redis-{time.monotonic_ns()}",
                                                port=self.redis_port)

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def env(self, service: str) -> dict[str, str]:
        env = dict(os.environ, TALLY_DATABASE_URL=self.db_url, TALLY_MIGRATE_ON_START="false",
                   TALLY_AUTH_MODE="trust", TALLY_METRICS_PORT="0",
                   TALLY_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                   TALLY_METERING_LIMITER="redis", TALLY_METERING_POLICY_CACHE_MS="0",
                   TALLY_LEDGER_CHECKOUT_PORT=str(self.checkout_port),
                   TALLY_LEDGER_WEBHOOK_PORT=str(self.webhook_port),
                   TALLY_LOG_LEVEL="warning")
        env.update({f"TALLY_{s.upper()}_PORT": str(p) for s, p in self.ports.items()})
        if service == "metering":  # the link the test cuts and slows
            env["TALLY_LEDGER_ADDRESS"] = f"127.0.0.1:{self.ledger_proxy.port}"
        return env

    def log_path(self, service: str) -> Path:
        return self.data_dir / f"{service}.log"

    def spawn(self, service: str) -> None:
        with self.log_path(service).open("ab") as log:
            self.processes[service] = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"], cwd=REPO, env=self.env(service),
                stdout=log, stderr=subprocess.STDOUT)

    async def wait_serving(self, service: str) -> float:
        """Waits until `service` reports SERVING; returns how long that took."""
        began = time.monotonic()
        while time.monotonic() - began < _START_TIMEOUT_S:
            process = self.processes[service]
            if process.poll() is not None:
                tail = self.log_path(service).read_text()[-3000:]
                raise AssertionError(f"{service} exited with {process.returncode}:\n{tail}")
            if await health_state(f"127.0.0.1:{self.ports[service]}", 0.5) == "SERVING":
                return time.monotonic() - began
            await asyncio.sleep(0.05)
        raise AssertionError(f"{service} not SERVING within {_START_TIMEOUT_S}s")

    async def kill_and_restart(self, service: str) -> float:
        """SIGKILLs `service`, starts it again on its port; returns the seconds until it was
        SERVING again."""
        began = time.monotonic()
        process = self.processes[service]
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
        self.spawn(service)
        await self.wait_serving(service)
        return time.monotonic() - began

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 30)
        await self.ledger_proxy.close()
        self.stop_redis()


@dataclass
class OwnPostgres:
    """An embedded PostgreSQL server of the suite's own, so the test can really stop and start
    it without touching the server every other test shares; its `tally` database is migrated
    for the five services."""

    data_dir: Path
    url: str = ""

    @property
    def pgdata(self) -> Path:
        return (self.data_dir / "postgres").resolve()

    async def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        admin_url = await self._start_server()
        conn = await asyncpg.connect(db.asyncpg_url(admin_url))
        try:
            await conn.execute("CREATE DATABASE tally")
        finally:
            await conn.close()
        self.url = admin_url.replace("/postgres?", "/tally?", 1)
        for service in SERVICES:
            await db.migrate_async(service, self.url)
        return self.url

    async def down_for(self, seconds: float) -> None:
        """Stops the server (fast: every session is cut) and starts it again `seconds` later,
        listening where it did."""
        await self.stop()
        await asyncio.sleep(seconds)
        await self._start_server()

    async def _start_server(self) -> str:
        """Starts the server from a fresh interpreter (forking this one, gRPC's threads
        running, to run initdb/pg_ctl as the embedded server's user crashed the test process
        with SIGSEGV); returns its URL."""
        starter = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys, pathlib; from tally.kit import infra; "
            "print(infra.start_embedded_postgres(pathlib.Path(sys.argv[1]), "
            "keep_running=True))", str(self.data_dir),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = await starter.communicate()
        if starter.returncode != 0:
            raise AssertionError(f"PostgreSQL did not start: {stderr.decode()[-2000:]}")
        return stdout.decode().strip().splitlines()[-1]

    async def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster, no fork), waited for."""
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        except ProcessLookupError:  # a pid file left by a server that is gone
            return
        for _ in range(600):
            if not pid_file.exists():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("PostgreSQL did not stop within 30 s")
