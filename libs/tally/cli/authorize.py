"""`tally authorize`: ask for a spend-control decision by hand and see why it came out so.

It is a real Authorize: an ALLOW or DOWNGRADE holds credit in the ledger until the hold's ttl
(default 300 s) unless a usage event captures it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Annotated

import typer

from tally.common.v1 import common_pb2
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.kit.money import format_credits
from tally.metering.v1 import metering_pb2 as pb
from tally.sdk.client import TallyClient


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """["team=search", ...] -> {"team": "search"}; a pair without "=" is a bad parameter."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        labels[key] = value
    return labels


async def authorize(config: KitConfig, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
    """Asks metering and prints the decision, the hold and the headroom under each limit."""
    async with TallyClient({"metering": config.address_of("metering")},
                           actor="user:cli") as tally:
        try:
            answer = await tally.metering.Authorize(request)
        except TallyError as exc:
            typer.echo(f"{exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from exc
    decision = pb.Decision.Name(answer.decision).removeprefix("DECISION_")
    if answer.decision == pb.DECISION_DENY:
        retry = f"; retry after {answer.retry_after_ms} ms" if answer.retry_after_ms else ""
        typer.echo(f"DENY {answer.deny_reason}: {answer.message}{retry}")
    else:
        typer.echo(f"{decision} on {answer.model}: holding "
                   f"{format_credits(answer.reserved_micros)} credits as "
                   f"{answer.reservation_id or '(nothing to hold)'} "
                   f"(price book v{answer.price_book_version})")
        if answer.message:
            typer.echo(f"  {answer.message}")
    for room in answer.headroom:
        shown = (format_credits(room.remaining) if room.unit == "micros"
                 else f"{room.remaining} {room.unit}")
        typer.echo(f"  {room.scope:<40} remaining {shown}")
    return answer


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally authorize` to the CLI."""

    @parent.command("authorize")
    def authorize_command(
        model: Annotated[str, typer.Argument(help="Model or alias to run.")],
        org: Annotated[str, typer.Option(help="Organization id.")],
        input_tokens: Annotated[int, typer.Option("--input", help="Estimated input tokens.")]
        = 1_000,
        max_output: Annotated[int, typer.Option(help="Max output tokens.")] = 1_000,
        project: Annotated[str, typer.Option(help="Project id.")] = "",
        label: Annotated[list[str] | None, typer.Option(help="key=value, repeatable.")]
        = None,
        context_tokens: Annotated[int, typer.Option(help="Context length, tokens.")] = 0,
        upload_bytes: Annotated[int, typer.Option(help="Upload size, bytes.")] = 0,
        request_id: Annotated[str, typer.Option(help="Idempotency id (default: random).")]
        = "",
    ) -> None:
        """Ask metering whether a request may run, on which model, holding how much."""
        import asyncio

        request = pb.AuthorizeRequest(
            request_id=request_id or f"cli-{uuid.uuid4().hex}",
            context=common_pb2.RequestContext(org_id=org, project_id=project,
                                              labels=parse_labels(label or [])),
            model=model, operation=pb.OPERATION_CHAT, estimated_input_tokens=input_tokens,
            max_output_tokens=max_output, context_tokens=context_tokens,
            upload_bytes=upload_bytes)
        asyncio.run(authorize(get_config(), request))
