"""Runs the four services as separate processes on this machine (`tally up` / `down` / `status`).

State lives under the data directory (`.tally/` by default): `run/<service>.pid`,
`logs/<service>.log`, and `run/embedded-postgres` when we started the embedded database (so
`down` stops only what `up` started).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.kit import db, infra
from tally.kit.config import KitConfig

SERVICES: Final = db.SERVICES
_STARTUP_TIMEOUT_S: Final = 60.0
PORTAL: Final = "portal"
"""The web portal (services/portal): an HTTP process started after the gRPC services."""


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One service's health as seen from outside."""

    service: str
    address: str
    state: str  # SERVING, NOT_SERVING, UNKNOWN, DOWN
    pid: int | None


def _run_dir(config: KitConfig) -> Path:
    path = config.data_dir / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log_dir(config: KitConfig) -> Path:
    path = config.data_dir / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        # a service this process started (trace-demo runs up and down itself) is reaped
        # here, or it would linger as a zombie that kill(0) still finds
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


async def health_state(address: str, timeout_s: float = 1.0) -> str:
    """The overall health (SERVING, NOT_SERVING, ...) of the server at `address`, or DOWN."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def database_url_for_suite(config: KitConfig) -> str:
    """The configured database, or the embedded one (started and left running)."""
    if config.database_url:
        return config.database_url
    url = infra.start_embedded_postgres(config.data_dir, keep_running=True)
    (_run_dir(config) / "embedded-postgres").write_text(url)
    return url


def migrate_all(url: str) -> None:
    """Upgrades every service's schema."""
    for service in SERVICES:
        db.migrate(service, url)


def metrics_port_of(base_port: int, service: str) -> int:
    """With TALLY_METRICS_PORT=<base> set, `tally up` gives each service its own /metrics
    port: base, base+1, ... in SERVICES order (one port for four processes: three crashed)."""
    return base_port + SERVICES.index(service) if base_port else 0


GATEWAY: Final = "gateway"
"""The OpenAI-compatible gateway example (examples/gateway), started by `up --with-gateway`."""


def gateway_port() -> int:
    """Where the gateway listens (TALLY_GATEWAY_PORT, as the gateway reads it)."""
    return int(os.environ.get("TALLY_GATEWAY_PORT") or 8090)


def gateway_running(config: KitConfig) -> bool:
    """Whether `up --with-gateway` started a gateway that is still running."""
    return _read_pid(_run_dir(config) / f"{GATEWAY}.pid") is not None


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_gateway(config: KitConfig) -> int:
    """Starts the gateway (a process like the services) and waits until it accepts
    connections; its pid."""
    return _start_edge(config, GATEWAY, [sys.executable, "-m", "examples.gateway"],
                       dict(os.environ, TALLY_METRICS_PORT="0"),
                       lambda: _listening(config.host, gateway_port()))


def _start_edge(config: KitConfig, name: str, argv: list[str], env: dict[str, str],
                ready: Callable[[], bool]) -> int:
    """Starts `name`, a process in front of the services (the gateway, the portal) that has
    no gRPC health service, unless its pid file names a live one, and waits until `ready()`;
    its pid. Its output goes to logs/<name>.log, whose tail a start that fails shows."""
    pid_file = _run_dir(config) / f"{name}.pid"
    running = _read_pid(pid_file)
    if running is not None:
        return running
    log_path = _log_dir(config) / f"{name}.log"
    process = subprocess.Popen(argv, env=env, stdout=log_path.open("ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                               f"{log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready within {_STARTUP_TIMEOUT_S}s (see {log_path})")
        time.sleep(0.1)
    return process.pid


def up(config: KitConfig) -> list[ServiceStatus]:
    """Starts every service that is not running and waits until each reports SERVING."""
    url = database_url_for_suite(config)
    migrate_all(url)
    # `tally up` is the local development suite: unless TALLY_AUTH_MODE says otherwise its
    # services trust their callers (each says so loudly in its log); a deployment sets
    # nothing and so enforces credentials.
    env = dict(os.environ, TALLY_DATABASE_URL=url, TALLY_MIGRATE_ON_START="false",
               TALLY_AUTH_MODE=os.environ.get("TALLY_AUTH_MODE", "trust"))
    started: dict[str, subprocess.Popen[bytes]] = {}
    for service in SERVICES:
        pid_file = _run_dir(config) / f"{service}.pid"
        if _read_pid(pid_file) is not None:
            continue
        log_file = (_log_dir(config) / f"{service}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            env={**env, "TALLY_METRICS_PORT": str(metrics_port_of(config.metrics_port,
                                                                  service))},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives this command; `tally down` stops it
        )
        pid_file.write_text(str(process.pid))
        started[service] = process
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    pending = set(SERVICES)
    while pending and time.monotonic() < deadline:
        for service in sorted(pending):
            child = started.get(service)
            if child is not None and child.poll() is not None:
                log_tail = (_log_dir(config) / f"{service}.log").read_text()[-2000:]
                raise RuntimeError(f"{service} exited with {child.returncode}:\n{log_tail}")
            if asyncio.run(health_state(config.address_of(service))) == "SERVING":
                pending.discard(service)
        if pending:
            time.sleep(0.1)
    if pending:
        late = ", ".join(sorted(pending))
        raise RuntimeError(f"not SERVING within {_STARTUP_TIMEOUT_S}s: {late}")
    _start_portal(config, env)
    return status(config)


def portal_url(config: KitConfig) -> str:
    """Where `tally up`'s portal answers."""
    from services.portal.config import PortalConfig
    from tally.kit.config import load

    return load(PortalConfig).base_url(load(PortalConfig).port)


def _portal_state(url: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/signed-out", timeout=1.0) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except (OSError, urllib.error.URLError):
        return "DOWN"


def _start_portal(config: KitConfig, env: dict[str, str]) -> None:
    """Starts the portal (development sign-in unless an OIDC provider is configured) and
    waits until it answers."""
    portal_env = dict(env)
    if not os.environ.get("TALLY_PORTAL_OIDC_ISSUER"):
        portal_env.setdefault("TALLY_PORTAL_DEV_SIGN_IN", "true")
    url = portal_url(config)
    _start_edge(config, PORTAL, [sys.executable, "-m", f"services.{PORTAL}"], portal_env,
                lambda: _portal_state(url) == "SERVING")


def status(config: KitConfig) -> list[ServiceStatus]:
    """Each service's health and pid."""
    found = []
    for service in SERVICES:
        address = config.address_of(service)
        state = asyncio.run(health_state(address))
        pid = _read_pid(_run_dir(config) / f"{service}.pid")
        found.append(ServiceStatus(service, address, state, pid))
    url = portal_url(config)
    found.append(ServiceStatus(PORTAL, url, _portal_state(url),
                               _read_pid(_run_dir(config) / f"{PORTAL}.pid")))
    gateway = _read_pid(_run_dir(config) / f"{GATEWAY}.pid")
    if gateway is not None:  # only `up --with-gateway` starts it
        listening = _listening(config.host, gateway_port())
        found.append(ServiceStatus(GATEWAY, f"http://{config.host}:{gateway_port()}",
                                   "SERVING" if listening else "DOWN", gateway))
    return found


def down(config: KitConfig, timeout_s: float = 30.0) -> list[str]:
    """Stops the services `up` started (SIGTERM, then SIGKILL after `timeout_s`)."""
    stopped = []
    # the edges first: they call the services
    for service in (GATEWAY, PORTAL, *SERVICES):
        pid_file = _run_dir(config) / f"{service}.pid"
        pid = _read_pid(pid_file)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _read_pid(pid_file) is not None:
                time.sleep(0.05)
            if _read_pid(pid_file) is not None:
                os.kill(pid, signal.SIGKILL)
            stopped.append(service)
        pid_file.unlink(missing_ok=True)
    marker = _run_dir(config) / "embedded-postgres"
    if marker.exists():
        infra.stop_embedded_postgres(config.data_dir)
        marker.unlink()
        stopped.append("embedded-postgres")
    return stopped
