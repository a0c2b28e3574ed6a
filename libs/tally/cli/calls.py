"""How CLI commands call a service: one client per command, refusals printed with their
reason (and each bad field) and exit status 1, request ids made up when not given.

Calls carry an actor for the audit trail: `user:cli` unless a command takes `--actor`
(or TALLY_ACTOR), as the four-eyes payment commands do; and the credential in TALLY_API_KEY
(an API key or OIDC token), which is who the services verify."""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import typer

from tally.common.v1 import common_pb2
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.sdk.client import TallyClient

T = TypeVar("T")

DEFAULT_ACTOR: Final = "user:cli"
"""Who the CLI acts as when no --actor is given."""


async def call(config: KitConfig, service: str, rpc: Callable[[Any], Awaitable[T]], *,
               actor: str = DEFAULT_ACTOR) -> T:
    """Runs `rpc` on `service`'s stub as `actor`; a refusal prints its reason and message,
    exit 1."""
    async with TallyClient({service: config.address_of(service)}, actor=actor,
                           credential=os.environ.get("TALLY_API_KEY") or None) as tally:
        try:
            return await rpc(getattr(tally, service))
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc


def context(org: str) -> common_pb2.RequestContext:
    """The caller's context for an org."""
    return common_pb2.RequestContext(org_id=org)


def request_id(given: str) -> str:
    """The request id given, or a fresh one (a retried command is then a new request)."""
    return given or f"cli-{uuid.uuid4().hex}"
