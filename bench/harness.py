"""What the service benchmarks share: their PostgreSQL, a fresh database per run, and the body
of a child process that serves one Tally service (run through :func:`bench.baseline.child_server`).

The server is ``TALLY_DATABASE_URL`` if set, else an embedded PostgreSQL under the benchmark's
own data directory. Each run creates ``<prefix>_<pid>``, migrates the schemas it needs and drops
it at the end whatever happens, so runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.baseline import run_in_loop
from tally.kit import db, infra
from tally.kit.config import KitConfig
from tally.kit.log import configure_logging
from tally.kit.server import ServiceApp, start_server
from tally.kit.telemetry import setup_telemetry, shutdown_telemetry

# Benchmarks measure the services, not credential checks: their servers run in development
# mode unless a benchmark passes its own authenticator (bench/authorize.py --auth does).
os.environ.setdefault("TALLY_AUTH_MODE", "trust")

__all__ = ["CpuMeter", "bench_database", "database_label", "database_server_url",
           "postgres_backends", "serve_in_child"]


# ---------------------------------------------------------------------------- database


def database_server_url(data_dir: Path) -> str:
    """``TALLY_DATABASE_URL``, else an embedded PostgreSQL started under ``data_dir``."""
    return os.environ.get("TALLY_DATABASE_URL") or infra.start_embedded_postgres(
        data_dir, keep_running=False)


def database_label(data_dir: Path) -> str:
    """Which server :func:`database_server_url` picked, for the JSON output."""
    return ("TALLY_DATABASE_URL" if os.environ.get("TALLY_DATABASE_URL")
            else f"embedded ({data_dir})")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(db.asyncpg_url(server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def bench_database(server_url: str, prefix: str, services: Sequence[str]) -> Iterator[str]:
    """A fresh ``<prefix>_<pid>`` database with `services`' schemas migrated; dropped on exit
    whatever happens."""
    name = f"{prefix}_{os.getpid()}"
    run_in_loop(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    run_in_loop(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        url = _with_database(server_url, name)
        for service in services:
            db.migrate(service, url)
        yield url
    finally:
        run_in_loop(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ---------------------------------------------------------------------------- CPU per process

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (0 if it is gone), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


async def postgres_backends(database_url: str) -> list[int]:
    """The pids of the PostgreSQL backends connected to the database of `database_url` now
    (a pooled service keeps its connections, so the same backends serve the whole run)."""
    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        return [r["pid"] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]
    finally:
        await conn.close()


class CpuMeter:
    """CPU seconds used by named groups of processes between `start` and `stop`."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self._started: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids)
                for name, pids in self.groups.items()}

    def start(self) -> None:
        self._started = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        self.used = {name: now[name] - self._started.get(name, 0.0) for name in now}
        return self.used

    def micros_per(self, count: int) -> dict[str, float]:
        """CPU microseconds per item of `count`, per group and in total."""
        per = {name: round(used * 1e6 / count, 1) for name, used in self.used.items()}
        per["total"] = round(sum(self.used.values()) * 1e6 / count, 1)
        return per


# ---------------------------------------------------------------------------- child server


async def _serve_until_told(conn: Connection, build: Callable[[KitConfig], Awaitable[ServiceApp]],
                            config: KitConfig, grace_seconds: float) -> None:
    running = await start_server(await build(config), port=0, grace_seconds=grace_seconds)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Readable on the parent's stop message *or* on EOF when the parent dies.
    loop.add_reader(conn.fileno(), stop.set)
    try:
        conn.send(running.port)
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await running.stop()


def serve_in_child(conn: Connection, name: str,
                   build: Callable[[KitConfig], Awaitable[ServiceApp]], config: KitConfig, *,
                   grace_seconds: float, profile_path: str | None = None) -> None:
    """The body of a :func:`bench.baseline.child_server` target for one Tally service.

    Builds the service with `config`, serves it on the kit server (uvloop when available)
    on a free port, sends the port to the parent and serves until the parent says stop or goes
    away. Logging and telemetry are set up as `run_service` does (so each RPC pays for its
    span as in a deployment); logs go to stderr at warning (stdout carries the benchmark's
    JSON). With `profile_path`, the whole process runs under cProfile and the pstats land there.
    """
    configure_logging(name, "warning")
    setup_telemetry(name)
    # a ledger also serves webhooks and checkout pages over HTTP: any free port will do
    os.environ.setdefault("TALLY_LEDGER_WEBHOOK_PORT", "0")
    os.environ.setdefault("TALLY_LEDGER_CHECKOUT_PORT", "0")
    profiler = cProfile.Profile() if profile_path else None
    try:
        if profiler is not None:
            profiler.enable()
        run_in_loop(_serve_until_told(conn, build, config, grace_seconds))
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
        shutdown_telemetry()
        conn.close()
