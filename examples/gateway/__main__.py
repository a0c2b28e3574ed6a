"""`python -m examples.gateway`: the OpenAI-compatible gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

from tally.kit.config import ConfigError, exit_on_config_error, load_kit_config
from tally.kit.log import configure_logging

from .server import load_settings, running


async def _main() -> None:
    try:
        config, settings = load_kit_config(), load_settings()
    except ConfigError as exc:
        exit_on_config_error(exc)
        return
    configure_logging("gateway", config.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running(config, settings):
        await stop.wait()


asyncio.run(_main())
