"""Wiring and running the gateway: settings from TALLY_GATEWAY_*, the credentials feed from
accounts, the Tally client, the usage reporter, the upstream (the fake one in-process unless
TALLY_GATEWAY_UPSTREAM_URL names a real one), uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from tally.kit.auth import CredentialCache
from tally.kit.channels import peer_channel
from tally.kit.config import (
    KitConfig,
    load,
    parse_choice,
    parse_port,
    parse_positive_int,
    setting,
)
from tally.kit.log import get_logger
from tally.sdk.client import TallyClient

from . import upstream as fake
from .app import Gateway, GatewaySettings, build_app
from .usage import RecordUsageReporter, StreamUsageReporter, UsageReporter

log = get_logger("gateway")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """TALLY_GATEWAY_* settings."""

    port: int = setting("TALLY_GATEWAY_PORT", parse_port, "a port 0-65535", default=8090)
    upstream_url: str = setting(
        "TALLY_GATEWAY_UPSTREAM_URL", str,
        "an OpenAI-compatible base URL (empty: the fake model, in-process)", default="")
    upstream_port: int = setting(
        "TALLY_GATEWAY_UPSTREAM_PORT", parse_port, "a port 0-65535 (the fake model's)",
        default=8091)
    upstream_api_key: str = setting(
        "TALLY_GATEWAY_UPSTREAM_API_KEY", str, "the upstream's API key", default="",
        secret=True)
    usage: str = setting(
        "TALLY_GATEWAY_USAGE", parse_choice("record", "stream"),
        "record (one RecordUsage per request) or stream (one StreamUsage per process)",
        default="record")
    max_output_tokens: int = setting(
        "TALLY_GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS", parse_positive_int,
        "tokens > 0 reserved for a request that sets no max_tokens", default=1024)


@dataclass
class RunningGateway:
    """A gateway serving on `port` (and the fake upstream on `upstream_port`, if started)."""

    port: int
    upstream_url: str
    gateway: Gateway

    @property
    def url(self) -> str:
        """The OpenAI base URL of the gateway."""
        return f"http://127.0.0.1:{self.port}/v1"


async def _serve(app: Any, host: str, port: int) -> tuple[uvicorn.Server, asyncio.Task[None],
                                                          int]:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start (a port in use)
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound


@contextlib.asynccontextmanager
async def running(config: KitConfig, settings: GatewayConfig,
                  credentials_ready_s: float = 10.0) -> AsyncIterator[RunningGateway]:
    """The gateway (and the fake upstream) serving until the block ends."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    stop = asyncio.Event()
    accounts = peer_channel(config.address_of("accounts"))
    credentials = CredentialCache()
    follower = asyncio.create_task(credentials.follow(accounts, stop))
    tally = TallyClient.from_config(config, actor="service:gateway")
    reporter: UsageReporter = (StreamUsageReporter(tally) if settings.usage == "stream"
                               else RecordUsageReporter(tally))
    try:
        upstream_url = settings.upstream_url
        if not upstream_url:
            server, task, port = await _serve(fake.build(), config.host, settings.upstream_port)
            servers.append((server, task))
            upstream_url = f"http://{config.host}:{port}"
        try:
            await asyncio.wait_for(credentials.ready.wait(), credentials_ready_s)
        except TimeoutError:
            log.error("credentials_not_loaded", accounts=config.address_of("accounts"))
        async with httpx.AsyncClient(base_url=upstream_url, timeout=60.0) as client:
            gateway = Gateway(tally, credentials, reporter, client, GatewaySettings(
                upstream_url=upstream_url, upstream_api_key=settings.upstream_api_key,
                default_max_output_tokens=settings.max_output_tokens))
            server, task, port = await _serve(build_app(gateway), config.host, settings.port)
            servers.append((server, task))
            log.info("gateway_serving", port=port, upstream=upstream_url, usage=settings.usage)
            yield RunningGateway(port, upstream_url, gateway)
            for server, task in reversed(servers):
                server.should_exit = True
                await task
            servers.clear()
    finally:
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        stop.set()
        await follower
        await reporter.close()
        await tally.close()
        await accounts.close()


def load_settings() -> GatewayConfig:
    """GatewayConfig from the environment (raises ConfigError)."""
    return load(GatewayConfig)
