"""Alerting commands of the `tally` CLI: `tally alerts create|update|get|list|delete` and
`tally alerts rotate-secret`.

Thresholds are credits ("100", "12.5"), parsed exactly into micro-credits. An update sends only
the options given, as the update mask. Writes carry a request id (random unless --request-id
is given), so re-running a command with the same id is safe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer
from google.protobuf.field_mask_pb2 import FieldMask

from tally.cli import calls
from tally.kit.config import KitConfig
from tally.kit.money import MoneyError, format_credits, parse_credits
from tally.notifier.v1 import notifier_pb2 as pb

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from tally.notifier.v1.notifier_pb2_grpc import NotifierServiceAsyncStub as Notifier

T = TypeVar("T")

TYPES: Final = {
    "low-balance": pb.NOTIFICATION_TYPE_LOW_BALANCE,
    "budget-threshold": pb.NOTIFICATION_TYPE_BUDGET_THRESHOLD,
    "hard-limit-hit": pb.NOTIFICATION_TYPE_HARD_LIMIT_HIT,
    "billing-state-changed": pb.NOTIFICATION_TYPE_BILLING_STATE_CHANGED,
    "payment-succeeded": pb.NOTIFICATION_TYPE_PAYMENT_SUCCEEDED,
    "payment-failed": pb.NOTIFICATION_TYPE_PAYMENT_FAILED,
    "top-up-succeeded": pb.NOTIFICATION_TYPE_TOP_UP_SUCCEEDED,
    "top-up-failed": pb.NOTIFICATION_TYPE_TOP_UP_FAILED,
    "balance-changed": pb.NOTIFICATION_TYPE_BALANCE_CHANGED,
}
CHANNELS: Final = {"webhook": pb.CHANNEL_WEBHOOK, "email": pb.CHANNEL_EMAIL,
                   "stream": pb.CHANNEL_STREAM}
LIST_PAGE_SIZE: Final = 1000

alerts_app = typer.Typer(help="Alert rules: which billing notifications go where, and the "
                              "webhook signing secret.", no_args_is_help=True)


# --- parsing ------------------------------------------------------------------------------


def _choice(text: str, choices: Mapping[str, T], option: str) -> T:
    try:
        return choices[text.lower().replace("_", "-")]
    except KeyError:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}",
                                 param_hint=option) from None


def _threshold(text: str) -> int:
    try:
        return parse_credits(text)
    except MoneyError as exc:
        raise typer.BadParameter(str(exc), param_hint="--low-balance-below") from exc


def rule_fields(*, org: str, rule_id: str = "", types: Sequence[str] | None = None,
                channel: str | None = None, webhook_url: str | None = None,
                email_to: str | None = None, cooldown: int | None = None,
                low_balance_below: str | None = None, enabled: bool | None = None
                ) -> tuple[pb.AlertRule, list[str]]:
    """The rule message for the options given (None = not given) and their field paths."""
    given = {
        "types": None if types is None else [_choice(t, TYPES, "--type") for t in types],
        "channel": None if channel is None else _choice(channel, CHANNELS, "--channel"),
        "webhook_url": webhook_url,
        "email_to": email_to,
        "cooldown_seconds": cooldown,
        "low_balance_threshold_micros": None if low_balance_below is None
        else _threshold(low_balance_below),
        "enabled": enabled,
    }
    chosen: dict[str, Any] = {path: value for path, value in given.items() if value is not None}
    return pb.AlertRule(org_id=org, rule_id=rule_id, **chosen), list(chosen)


# --- printing -----------------------------------------------------------------------------


def _type_names(rule: pb.AlertRule) -> str:
    return ",".join(str(pb.NotificationType.Name(t)).removeprefix("NOTIFICATION_TYPE_").lower()
                    .replace("_", "-") for t in rule.types)


def _target(rule: pb.AlertRule) -> str:
    channel = str(pb.Channel.Name(rule.channel)).removeprefix("CHANNEL_").lower()
    target = rule.webhook_url or rule.email_to
    return f"{channel} {target}" if target else channel


def rule_line(rule: pb.AlertRule) -> str:
    """One rule on one line (for lists)."""
    extra = [] if rule.enabled else ["disabled"]
    if rule.low_balance_threshold_micros:
        extra.append(f"below {format_credits(rule.low_balance_threshold_micros)} credits")
    if rule.cooldown_seconds:
        extra.append(f"cooldown {rule.cooldown_seconds}s")
    return (f"{rule.rule_id}  {_type_names(rule):<32} {_target(rule)}"
            + (f"  ({', '.join(extra)})" if extra else ""))


def show_rule(rule: pb.AlertRule) -> None:
    """Prints a rule."""
    typer.echo(f"alert rule {rule.rule_id}  org {rule.org_id}"
               + ("" if rule.enabled else "  (disabled)"))
    typer.echo(f"  types     {_type_names(rule)}")
    typer.echo(f"  channel   {_target(rule)}")
    if rule.low_balance_threshold_micros:
        typer.echo(f"  fires     below {format_credits(rule.low_balance_threshold_micros)} "
                   "credits")
    typer.echo(f"  cooldown  {rule.cooldown_seconds}s")


# --- calls --------------------------------------------------------------------------------


async def _call(config: KitConfig, rpc: Callable[[Notifier], Awaitable[T]]) -> T:
    return await calls.call(config, "notifier", rpc)


_context = calls.context
_request_id = calls.request_id

async def create_rule(config: KitConfig, rule: pb.AlertRule, request_id: str = ""
                      ) -> pb.AlertRule:
    """Creates an alert rule and prints it."""
    reply = await _call(config, lambda n: n.CreateAlertRule(pb.CreateAlertRuleRequest(
        request_id=_request_id(request_id), context=_context(rule.org_id), rule=rule)))
    show_rule(reply.rule)
    return reply.rule


async def update_rule(config: KitConfig, rule: pb.AlertRule, paths: Sequence[str],
                      request_id: str = "") -> pb.AlertRule:
    """Changes the given fields of a rule and prints it."""
    reply = await _call(config, lambda n: n.UpdateAlertRule(pb.UpdateAlertRuleRequest(
        request_id=_request_id(request_id), context=_context(rule.org_id), rule=rule,
        update_mask=FieldMask(paths=list(paths)))))
    show_rule(reply.rule)
    return reply.rule


async def get_rule(config: KitConfig, org: str, rule_id: str) -> pb.AlertRule:
    """Prints one rule."""
    reply = await _call(config, lambda n: n.GetAlertRule(
        pb.GetAlertRuleRequest(org_id=org, rule_id=rule_id)))
    show_rule(reply.rule)
    return reply.rule


async def list_rules(config: KitConfig, org: str) -> list[pb.AlertRule]:
    """Prints every rule of an org, newest first, one per line."""
    async def every(n: Notifier) -> list[pb.AlertRule]:
        found: list[pb.AlertRule] = []
        token = ""
        while True:
            page = await n.ListAlertRules(pb.ListAlertRulesRequest(
                org_id=org, page_size=LIST_PAGE_SIZE, page_token=token))
            found.extend(page.rules)
            token = page.next_page_token
            if not token:
                return found

    rules = await _call(config, every)
    for rule in rules:
        typer.echo(rule_line(rule))
    typer.echo(f"{len(rules)} alert rule(s)")
    return rules


async def delete_rule(config: KitConfig, org: str, rule_id: str, request_id: str = "") -> None:
    """Deletes a rule."""
    await _call(config, lambda n: n.DeleteAlertRule(pb.DeleteAlertRuleRequest(
        request_id=_request_id(request_id), context=_context(org), org_id=org,
        rule_id=rule_id)))
    typer.echo(f"deleted {rule_id}")


async def rotate_secret(config: KitConfig, org: str, overlap_seconds: int = 0,
                        request_id: str = "") -> pb.RotateWebhookSecretResponse:
    """Rotates the org's webhook signing secret and prints the new one (shown only now)."""
    reply = await _call(config, lambda n: n.RotateWebhookSecret(pb.RotateWebhookSecretRequest(
        request_id=_request_id(request_id), context=_context(org), org_id=org,
        overlap_seconds=overlap_seconds)))
    typer.echo(f"new signing secret {reply.secret_id} of {org} (store it now; it is not "
               "shown again):")
    typer.echo(f"  {reply.secret}")
    if reply.HasField("previous_valid_until"):
        until = reply.previous_valid_until.ToDatetime(tzinfo=UTC)
        typer.echo(f"the previous secret also signs until {until.isoformat(timespec='seconds')}")
    return reply


# --- commands -----------------------------------------------------------------------------

Org = Annotated[str, typer.Option(help="Organization id.")]
RequestId = Annotated[str, typer.Option(help="Idempotency id (default: random).")]
RuleId = Annotated[str, typer.Argument(help="The rule's id (rule_...).")]
Types = Annotated[list[str] | None, typer.Option(
    "--type", help=f"Notification type, repeatable: {', '.join(TYPES)}.")]
ChannelOption = Annotated[str | None, typer.Option(help="webhook, email or stream.")]
WebhookUrl = Annotated[str | None, typer.Option(help="https:// URL (channel webhook).")]
EmailTo = Annotated[str | None, typer.Option(help="Recipient address (channel email).")]
Cooldown = Annotated[int | None, typer.Option(
    help="Seconds to stay quiet after a notification of the same type; 0 = none.")]
LowBalanceBelow = Annotated[str | None, typer.Option(
    help='low-balance: fire when available credit crosses below this, credits, e.g. "100".')]
Enabled = Annotated[bool | None, typer.Option("--enabled/--disabled",
                                              help="Whether the rule is active.")]


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally alerts ...` to the CLI (config is read lazily)."""
    import asyncio

    @alerts_app.command("create")
    def alerts_create(org: Org,
                      channel: Annotated[str, typer.Option(help="webhook, email or stream.")],
                      types: Types = None, webhook_url: WebhookUrl = "", email_to: EmailTo = "",
                      cooldown: Cooldown = 0, low_balance_below: LowBalanceBelow = "0",
                      enabled: Enabled = True, request_id: RequestId = "") -> None:
        """Create an alert rule."""
        rule, _ = rule_fields(org=org, types=types or [], channel=channel,
                              webhook_url=webhook_url, email_to=email_to, cooldown=cooldown,
                              low_balance_below=low_balance_below, enabled=enabled)
        asyncio.run(create_rule(get_config(), rule, request_id))

    @alerts_app.command("update")
    def alerts_update(rule_id: RuleId, org: Org, types: Types = None,
                      channel: ChannelOption = None, webhook_url: WebhookUrl = None,
                      email_to: EmailTo = None, cooldown: Cooldown = None,
                      low_balance_below: LowBalanceBelow = None, enabled: Enabled = None,
                      request_id: RequestId = "") -> None:
        """Change the given fields of a rule (the others keep their values; pass
        --webhook-url "" to clear one when switching channels)."""
        rule, paths = rule_fields(org=org, rule_id=rule_id, types=types, channel=channel,
                                  webhook_url=webhook_url, email_to=email_to, cooldown=cooldown,
                                  low_balance_below=low_balance_below, enabled=enabled)
        if not paths:
            raise typer.BadParameter("give at least one field to change")
        asyncio.run(update_rule(get_config(), rule, paths, request_id))

    @alerts_app.command("get")
    def alerts_get(rule_id: RuleId, org: Org) -> None:
        """Print an alert rule."""
        asyncio.run(get_rule(get_config(), org, rule_id))

    @alerts_app.command("list")
    def alerts_list(org: Org) -> None:
        """Print an org's alert rules, newest first."""
        asyncio.run(list_rules(get_config(), org))

    @alerts_app.command("delete")
    def alerts_delete(rule_id: RuleId, org: Org, request_id: RequestId = "") -> None:
        """Delete an alert rule (its pending deliveries are dropped)."""
        asyncio.run(delete_rule(get_config(), org, rule_id, request_id))

    @alerts_app.command("rotate-secret")
    def alerts_rotate_secret(
        org: Org,
        overlap: Annotated[int, typer.Option(
            help="Seconds the previous secret keeps signing too; 0 = 86400 (24 h).")] = 0,
        request_id: RequestId = "",
    ) -> None:
        """Create a new webhook signing secret for an org and print it once."""
        asyncio.run(rotate_secret(get_config(), org, overlap, request_id))

    parent.add_typer(alerts_app, name="alerts")
