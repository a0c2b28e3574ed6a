"""Wires the portal: settings -> the services' client (its own identity, following accounts'
credentials feed) -> the OIDC client -> sessions -> routes -> uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import uvicorn
from starlette.applications import Starlette
from starlette.templating import Jinja2Templates

from tally.kit.config import ConfigError, KitConfig, exit_on_config_error, load, load_kit_config
from tally.kit.log import configure_logging, get_logger
from tally.kit.secrets import sealer_from_env

from .client import PortalClient
from .config import PortalConfig
from .oidc import OidcClient
from .routes import Portal, routes
from .sessions import MemorySessions, RedisSessions, SessionStore

log = get_logger("tally.portal")
HERE: Final = Path(__file__).parent


def build(kit: KitConfig, settings: PortalConfig, port: int) -> Starlette:
    """The portal app; `port` is where it is reached when no public URL is configured."""
    client = PortalClient({s: kit.address_of(s) for s in
                           ("pricing", "metering", "ledger", "notifier", "accounts")})
    oidc = (OidcClient(settings.oidc_issuer, settings.oidc_client_id,
                       settings.oidc_client_secret) if settings.oidc_issuer else None)
    if oidc is None and settings.dev_sign_in:
        log.warning("portal_development_sign_in", detail="TALLY_PORTAL_DEV_SIGN_IN=true: anyone "
                    "can sign in as anyone by name. Never expose this portal to others.")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    sessions: SessionStore = (
        RedisSessions(kit.redis_url, settings.session_ttl_s, sealer_from_env())
        if kit.redis_url and settings.redis_sessions else MemorySessions(settings.session_ttl_s))
    if isinstance(sessions, MemorySessions):
        log.warning("portal_sessions_in_memory", detail="no TALLY_REDIS_URL: sessions live in "
                    "this process only; run one replica, or set TALLY_REDIS_URL")
    portal = Portal(settings, client, sessions, templates, oidc, settings.base_url(port))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await client.start()
        log.info("portal_started", url=portal.base_url, oidc=settings.oidc_issuer or None)
        try:
            yield
        finally:
            await client.stop()
            await sessions.close()
            if oidc is not None:
                await oidc.close()

    app = Starlette(routes=routes(str(HERE / "static")), lifespan=lifespan)
    app.state.portal = portal
    return app


@dataclass
class RunningPortal:
    """A portal serving on a port of this event loop (tests, the benchmark)."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def start_portal(kit: KitConfig, settings: PortalConfig, port: int) -> RunningPortal:
    """Starts the portal on `port` and waits until it serves."""
    app = build(kit, settings, port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the portal stopped while starting")
        await asyncio.sleep(0.01)
    return RunningPortal(server, task, port)


def main() -> None:
    """`python -m services.portal`."""
    try:
        kit = load_kit_config()
        settings = load(PortalConfig)
    except ConfigError as error:
        exit_on_config_error(error)
        return
    configure_logging("portal", kit.log_level)
    app = build(kit, settings, settings.port)
    uvicorn.run(app, host=kit.host, port=settings.port, log_level="warning",
                proxy_headers=True)
