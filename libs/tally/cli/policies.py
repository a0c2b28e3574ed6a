"""Spend-control commands of the `tally` CLI: `budget`, `quota` and `policy`.

`tally budget create|get|list|update|delete`, `tally quota create|get|list|update|delete`,
`tally policy get|set`. Amounts are credits ("12.5"), parsed exactly into micro-credits. An
update sends only the options given, as the update mask. Writes carry a request id (random
unless --request-id is given), so re-running a command with the same id is safe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer
from google.protobuf.field_mask_pb2 import FieldMask

from tally.cli import calls
from tally.kit.config import KitConfig
from tally.kit.money import MoneyError, format_credits, parse_credits
from tally.kit.protoconv import to_timestamp
from tally.metering.v1 import metering_pb2 as pb

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from tally.metering.v1.metering_pb2_grpc import MeteringServiceAsyncStub as Metering

T = TypeVar("T")

BUDGET_SCOPES: Final = {"org": pb.BUDGET_SCOPE_ORG, "project": pb.BUDGET_SCOPE_PROJECT,
                        "label": pb.BUDGET_SCOPE_LABEL}
BUDGET_PERIODS: Final = {"monthly": pb.BUDGET_PERIOD_MONTHLY, "custom": pb.BUDGET_PERIOD_CUSTOM}
BUDGET_ENFORCEMENTS: Final = {"hard": pb.BUDGET_ENFORCEMENT_HARD,
                              "soft-downgrade": pb.BUDGET_ENFORCEMENT_SOFT_DOWNGRADE,
                              "alert-only": pb.BUDGET_ENFORCEMENT_ALERT_ONLY}
QUOTA_SCOPES: Final = {"org": pb.QUOTA_SCOPE_ORG, "project": pb.QUOTA_SCOPE_PROJECT,
                       "environment": pb.QUOTA_SCOPE_ENVIRONMENT,
                       "api-key": pb.QUOTA_SCOPE_API_KEY}
QUOTA_KINDS: Final = {"rps": pb.QUOTA_KIND_REQUESTS_PER_SECOND,
                      "rpd": pb.QUOTA_KIND_REQUESTS_PER_DAY,
                      "tpm": pb.QUOTA_KIND_TOKENS_PER_MINUTE,
                      "long-context-rps": pb.QUOTA_KIND_LONG_CONTEXT_REQUESTS_PER_SECOND}
QUOTA_ENFORCEMENTS: Final = {"hard": pb.QUOTA_ENFORCEMENT_HARD, "soft": pb.QUOTA_ENFORCEMENT_SOFT}
LIST_PAGE_SIZE: Final = 1000

budget_app = typer.Typer(help="Budgets: spending limits per period, with alarms and "
                              "enforcement.", no_args_is_help=True)
quota_app = typer.Typer(help="Quotas: request and token rate limits.", no_args_is_help=True)
policy_app = typer.Typer(help="An org's spend policy: per-request guard rails.",
                         no_args_is_help=True)


# --- parsing ------------------------------------------------------------------------------


def parse_amount(text: str, option: str) -> int:
    """Credits ("12.5") as exact micro-credits; anything else is a bad parameter."""
    try:
        return parse_credits(text)
    except MoneyError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc


def _choice(text: str, choices: Mapping[str, T], option: str) -> T:
    try:
        return choices[text.lower()]
    except KeyError:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}",
                                 param_hint=option) from None


def _name(proto_enum: Any, prefix: str, number: int) -> str:
    return str(proto_enum.Name(number)).removeprefix(prefix) if number else "-"


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def budget_fields(*, org: str, budget_id: str = "", name: str | None = None,
                  limit: str | None = None, scope: str | None = None,
                  scope_value: str | None = None, period: str | None = None,
                  start: datetime | None = None, end: datetime | None = None,
                  alarms: Sequence[int] | None = None, enforcement: str | None = None,
                  downgrade_at: int | None = None) -> tuple[pb.Budget, list[str]]:
    """The budget message for the options given (None = not given) and their field paths."""
    given = {
        "name": name,
        "limit_micros": None if limit is None else parse_amount(limit, "--limit"),
        "scope": None if scope is None else _choice(scope, BUDGET_SCOPES, "--scope"),
        "scope_value": scope_value,
        "period": None if period is None else _choice(period, BUDGET_PERIODS, "--period"),
        "period_start": None if start is None else to_timestamp(_utc(start)),
        "period_end": None if end is None else to_timestamp(_utc(end)),
        "alarm_thresholds_percent": None if alarms is None else list(alarms),
        "enforcement": None if enforcement is None
        else _choice(enforcement, BUDGET_ENFORCEMENTS, "--enforcement"),
        "downgrade_at_percent": downgrade_at,
    }
    chosen: dict[str, Any] = {path: value for path, value in given.items() if value is not None}
    return pb.Budget(org_id=org, budget_id=budget_id, **chosen), list(chosen)


def quota_fields(*, org: str, quota_id: str = "", scope: str | None = None,
                 scope_value: str | None = None, kind: str | None = None,
                 limit: int | None = None, burst: int | None = None,
                 enforcement: str | None = None, long_context_threshold: int | None = None
                 ) -> tuple[pb.Quota, list[str]]:
    """The quota message for the options given (None = not given) and their field paths."""
    given = {
        "scope": None if scope is None else _choice(scope, QUOTA_SCOPES, "--scope"),
        "scope_value": scope_value,
        "kind": None if kind is None else _choice(kind, QUOTA_KINDS, "--kind"),
        "limit": limit,
        "burst": burst,
        "enforcement": None if enforcement is None
        else _choice(enforcement, QUOTA_ENFORCEMENTS, "--enforcement"),
        "long_context_threshold_tokens": long_context_threshold,
    }
    chosen: dict[str, Any] = {path: value for path, value in given.items() if value is not None}
    return pb.Quota(org_id=org, quota_id=quota_id, **chosen), list(chosen)


# --- printing -----------------------------------------------------------------------------


def _day(stamp: Any) -> str:
    return str(stamp.ToDatetime(tzinfo=UTC).date()) if stamp.ByteSize() else "-"


def _covers(scope: str, value: str) -> str:
    return f"{scope} {value}" if value else scope


def _budget_covers(b: pb.Budget) -> str:
    return _covers(_name(pb.BudgetScope, "BUDGET_SCOPE_", b.scope), b.scope_value)


def budget_line(b: pb.Budget) -> str:
    """One budget on one line (for lists)."""
    return (f"{b.budget_id}  {_budget_covers(b):<24} "
            f"{_name(pb.BudgetPeriod, 'BUDGET_PERIOD_', b.period):<8} "
            f"limit {format_credits(b.limit_micros):>12}  "
            f"spent {format_credits(b.spent_micros):>12}  "
            f"reserved {format_credits(b.reserved_micros):>10}  "
            f"{_name(pb.BudgetEnforcement, 'BUDGET_ENFORCEMENT_', b.enforcement):<14} {b.name}")


def show_budget(b: pb.Budget) -> None:
    """Prints a budget with its spend in the current period."""
    enforcement = _name(pb.BudgetEnforcement, "BUDGET_ENFORCEMENT_", b.enforcement)
    if b.enforcement == pb.BUDGET_ENFORCEMENT_SOFT_DOWNGRADE:
        enforcement += f" from {b.downgrade_at_percent}%"
    used = (b.spent_micros * 100) // b.limit_micros if b.limit_micros else 0
    typer.echo(f"budget {b.budget_id}  {b.name!r}  org {b.org_id}")
    typer.echo(f"  covers    {_budget_covers(b)}")
    typer.echo(f"  period    {_name(pb.BudgetPeriod, 'BUDGET_PERIOD_', b.period)} "
               f"{_day(b.period_start)} .. {_day(b.period_end)}")
    typer.echo(f"  limit     {format_credits(b.limit_micros)} credits, {enforcement}")
    typer.echo(f"  spent     {format_credits(b.spent_micros)} ({used}%), reserved "
               f"{format_credits(b.reserved_micros)}")
    typer.echo("  alarms    " + " ".join(f"{p}%" for p in b.alarm_thresholds_percent))


def quota_line(q: pb.Quota) -> str:
    """One quota on one line."""
    kind = _name(pb.QuotaKind, "QUOTA_KIND_", q.kind)
    extra = [f"burst {q.burst}"] if q.burst else []
    if q.long_context_threshold_tokens:
        extra.append(f"from {q.long_context_threshold_tokens} context tokens")
    covers = _covers(_name(pb.QuotaScope, "QUOTA_SCOPE_", q.scope), q.scope_value)
    return (f"{q.quota_id}  {covers:<24} {kind:<32} limit {q.limit:>10}  "
            f"{_name(pb.QuotaEnforcement, 'QUOTA_ENFORCEMENT_', q.enforcement):<4}"
            + (f"  ({', '.join(extra)})" if extra else ""))


def show_policy(p: pb.SpendPolicy) -> None:
    """Prints a spend policy (0 = no limit)."""
    def limit(value: int, unit: str) -> str:
        return f"{value} {unit}" if value else "no limit"

    typer.echo(f"spend policy of {p.org_id}"
               + (f" (set {p.updated_at.ToDatetime(tzinfo=UTC).isoformat(timespec='seconds')}"
                  f" by {p.updated_by})" if p.updated_at.ByteSize() else " (defaults)"))
    typer.echo(f"  max context         {limit(p.max_context_tokens, 'tokens')}")
    typer.echo(f"  max upload          {limit(p.max_upload_bytes, 'bytes')}")
    typer.echo(f"  long context from   {limit(p.long_context_threshold_tokens, 'tokens')}")
    typer.echo(f"  while throttled     {p.throttled_requests_per_second} requests/s")


# --- calls --------------------------------------------------------------------------------


async def _call(config: KitConfig, rpc: Callable[[Metering], Awaitable[T]]) -> T:
    return await calls.call(config, "metering", rpc)


_context = calls.context
_request_id = calls.request_id

async def create_budget(config: KitConfig, budget: pb.Budget, request_id: str = ""
                        ) -> pb.Budget:
    """Creates a budget and prints it."""
    reply = await _call(config, lambda m: m.CreateBudget(pb.CreateBudgetRequest(
        request_id=_request_id(request_id), context=_context(budget.org_id), budget=budget)))
    show_budget(reply.budget)
    return reply.budget


async def update_budget(config: KitConfig, budget: pb.Budget, paths: Sequence[str],
                        request_id: str = "") -> pb.Budget:
    """Changes the given fields of a budget and prints it."""
    reply = await _call(config, lambda m: m.UpdateBudget(pb.UpdateBudgetRequest(
        request_id=_request_id(request_id), context=_context(budget.org_id), budget=budget,
        update_mask=FieldMask(paths=list(paths)))))
    show_budget(reply.budget)
    return reply.budget


async def get_budget(config: KitConfig, org: str, budget_id: str) -> pb.Budget:
    """Prints one budget with its current spend."""
    reply = await _call(config, lambda m: m.GetBudget(
        pb.GetBudgetRequest(org_id=org, budget_id=budget_id)))
    show_budget(reply.budget)
    return reply.budget


async def list_budgets(config: KitConfig, org: str) -> list[pb.Budget]:
    """Prints every budget of an org, oldest first, one per line."""
    async def every(m: Metering) -> list[pb.Budget]:
        found: list[pb.Budget] = []
        token = ""
        while True:
            page = await m.ListBudgets(pb.ListBudgetsRequest(
                org_id=org, page_size=LIST_PAGE_SIZE, page_token=token))
            found.extend(page.budgets)
            token = page.next_page_token
            if not token:
                return found

    budgets = await _call(config, every)
    for b in budgets:
        typer.echo(budget_line(b))
    typer.echo(f"{len(budgets)} budget(s)")
    return budgets


async def delete_budget(config: KitConfig, org: str, budget_id: str, request_id: str = ""
                        ) -> None:
    """Deletes a budget."""
    await _call(config, lambda m: m.DeleteBudget(pb.DeleteBudgetRequest(
        request_id=_request_id(request_id), context=_context(org), org_id=org,
        budget_id=budget_id)))
    typer.echo(f"deleted {budget_id}")


async def create_quota(config: KitConfig, quota: pb.Quota, request_id: str = "") -> pb.Quota:
    """Creates a quota and prints it."""
    reply = await _call(config, lambda m: m.CreateQuota(pb.CreateQuotaRequest(
        request_id=_request_id(request_id), context=_context(quota.org_id), quota=quota)))
    typer.echo(quota_line(reply.quota))
    return reply.quota


async def update_quota(config: KitConfig, quota: pb.Quota, paths: Sequence[str],
                       request_id: str = "") -> pb.Quota:
    """Changes the given fields of a quota and prints it."""
    reply = await _call(config, lambda m: m.UpdateQuota(pb.UpdateQuotaRequest(
        request_id=_request_id(request_id), context=_context(quota.org_id), quota=quota,
        update_mask=FieldMask(paths=list(paths)))))
    typer.echo(quota_line(reply.quota))
    return reply.quota


async def get_quota(config: KitConfig, org: str, quota_id: str) -> pb.Quota:
    """Prints one quota."""
    reply = await _call(config, lambda m: m.GetQuota(
        pb.GetQuotaRequest(org_id=org, quota_id=quota_id)))
    typer.echo(quota_line(reply.quota))
    return reply.quota


async def list_quotas(config: KitConfig, org: str) -> list[pb.Quota]:
    """Prints every quota of an org, oldest first, one per line."""
    async def every(m: Metering) -> list[pb.Quota]:
        found: list[pb.Quota] = []
        token = ""
        while True:
            page = await m.ListQuotas(pb.ListQuotasRequest(
                org_id=org, page_size=LIST_PAGE_SIZE, page_token=token))
            found.extend(page.quotas)
            token = page.next_page_token
            if not token:
                return found

    quotas = await _call(config, every)
    for q in quotas:
        typer.echo(quota_line(q))
    typer.echo(f"{len(quotas)} quota(s)")
    return quotas


async def delete_quota(config: KitConfig, org: str, quota_id: str, request_id: str = ""
                       ) -> None:
    """Deletes a quota."""
    await _call(config, lambda m: m.DeleteQuota(pb.DeleteQuotaRequest(
        request_id=_request_id(request_id), context=_context(org), org_id=org,
        quota_id=quota_id)))
    typer.echo(f"deleted {quota_id}")


async def get_policy(config: KitConfig, org: str) -> pb.SpendPolicy:
    """Prints an org's spend policy (defaults if never set)."""
    reply = await _call(config, lambda m: m.GetSpendPolicy(pb.GetSpendPolicyRequest(org_id=org)))
    show_policy(reply.policy)
    return reply.policy


async def set_policy(config: KitConfig, policy: pb.SpendPolicy, request_id: str = ""
                     ) -> pb.SpendPolicy:
    """Replaces an org's spend policy and prints what is stored."""
    reply = await _call(config, lambda m: m.SetSpendPolicy(pb.SetSpendPolicyRequest(
        request_id=_request_id(request_id), context=_context(policy.org_id), policy=policy)))
    show_policy(reply.policy)
    return reply.policy


# --- commands -----------------------------------------------------------------------------

Org = Annotated[str, typer.Option(help="Organization id.")]
RequestId = Annotated[str, typer.Option(help="Idempotency id (default: random).")]
BudgetId = Annotated[str, typer.Argument(help="The budget's id (bud_...).")]
QuotaId = Annotated[str, typer.Argument(help="The quota's id (quo_...).")]
Name = Annotated[str | None, typer.Option(help="Display name, at most 200 chars.")]
Limit = Annotated[str | None, typer.Option(help='Limit per period in credits, e.g. "250".')]
BudgetScope = Annotated[str | None, typer.Option(help="org, project or label.")]
BudgetScopeValue = Annotated[str | None, typer.Option(
    help='Project id for project, "key=value" for label.')]
Period = Annotated[str | None, typer.Option(help="monthly or custom.")]
Start = Annotated[datetime | None, typer.Option(help="Custom period start (UTC).")]
End = Annotated[datetime | None, typer.Option(help="Custom period end (UTC, exclusive).")]
Alarms = Annotated[list[int] | None, typer.Option(
    "--alarm", help="Alarm threshold in percent, repeatable (default 50, 80, 100).")]
BudgetEnforcement = Annotated[str | None, typer.Option(
    help="hard, soft-downgrade or alert-only.")]
DowngradeAt = Annotated[int | None, typer.Option(
    help="soft-downgrade: percent of the limit from which models are downgraded.")]
QuotaScope = Annotated[str | None, typer.Option(help="org, project, environment or api-key.")]
QuotaScopeValue = Annotated[str | None, typer.Option(
    help='Project id, "<project>/<environment>" or API key id.')]
Kind = Annotated[str | None, typer.Option(help="rps, rpd, tpm or long-context-rps.")]
QuotaLimit = Annotated[int | None, typer.Option(help="Requests or tokens per window.")]
Burst = Annotated[int | None, typer.Option(help="Extra requests allowed in a burst.")]
QuotaEnforcement = Annotated[str | None, typer.Option(help="hard or soft.")]
Threshold = Annotated[int | None, typer.Option(
    help="long-context-rps: context tokens from which a request counts.")]


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds `tally budget|quota|policy ...` to the CLI (config is read lazily)."""
    import asyncio

    @budget_app.command("create")
    def budget_create(org: Org, name: Annotated[str, typer.Option(help="Display name.")],
                      limit: Annotated[str, typer.Option(help='Credits per period, e.g. "250".')],
                      scope: BudgetScope = "org", scope_value: BudgetScopeValue = "",
                      period: Period = "monthly", start: Start = None, end: End = None,
                      alarm: Alarms = None, enforcement: BudgetEnforcement = "hard",
                      downgrade_at: DowngradeAt = 0, request_id: RequestId = "") -> None:
        """Create a budget."""
        budget, _ = budget_fields(org=org, name=name, limit=limit, scope=scope,
                                  scope_value=scope_value, period=period, start=start, end=end,
                                  alarms=alarm or [], enforcement=enforcement,
                                  downgrade_at=downgrade_at)
        asyncio.run(create_budget(get_config(), budget, request_id))

    @budget_app.command("update")
    def budget_update(budget_id: BudgetId, org: Org, name: Name = None, limit: Limit = None,
                      scope: BudgetScope = None, scope_value: BudgetScopeValue = None,
                      period: Period = None, start: Start = None, end: End = None,
                      alarm: Alarms = None, enforcement: BudgetEnforcement = None,
                      downgrade_at: DowngradeAt = None, request_id: RequestId = "") -> None:
        """Change the given fields of a budget (the others keep their values)."""
        budget, paths = budget_fields(
            org=org, budget_id=budget_id, name=name, limit=limit, scope=scope,
            scope_value=scope_value, period=period, start=start, end=end, alarms=alarm,
            enforcement=enforcement, downgrade_at=downgrade_at)
        if not paths:
            raise typer.BadParameter("give at least one field to change")
        asyncio.run(update_budget(get_config(), budget, paths, request_id))

    @budget_app.command("get")
    def budget_get(budget_id: BudgetId, org: Org) -> None:
        """Print a budget with its spend in the current period."""
        asyncio.run(get_budget(get_config(), org, budget_id))

    @budget_app.command("list")
    def budget_list(org: Org) -> None:
        """Print an org's budgets, oldest first."""
        asyncio.run(list_budgets(get_config(), org))

    @budget_app.command("delete")
    def budget_delete(budget_id: BudgetId, org: Org, request_id: RequestId = "") -> None:
        """Delete a budget (Authorize stops applying it)."""
        asyncio.run(delete_budget(get_config(), org, budget_id, request_id))

    @quota_app.command("create")
    def quota_create(org: Org, kind: Annotated[str, typer.Option(
                         help="rps, rpd, tpm or long-context-rps.")],
                     limit: Annotated[int, typer.Option(help="Requests or tokens per window.")],
                     scope: QuotaScope = "org", scope_value: QuotaScopeValue = "",
                     burst: Burst = 0, enforcement: QuotaEnforcement = "hard",
                     long_context_threshold: Threshold = 0, request_id: RequestId = "") -> None:
        """Create a quota."""
        quota, _ = quota_fields(org=org, scope=scope, scope_value=scope_value, kind=kind,
                                limit=limit, burst=burst, enforcement=enforcement,
                                long_context_threshold=long_context_threshold)
        asyncio.run(create_quota(get_config(), quota, request_id))

    @quota_app.command("update")
    def quota_update(quota_id: QuotaId, org: Org, scope: QuotaScope = None,
                     scope_value: QuotaScopeValue = None, kind: Kind = None,
                     limit: QuotaLimit = None, burst: Burst = None,
                     enforcement: QuotaEnforcement = None, long_context_threshold: Threshold = None,
                     request_id: RequestId = "") -> None:
        """Change the given fields of a quota (the others keep their values)."""
        quota, paths = quota_fields(
            org=org, quota_id=quota_id, scope=scope, scope_value=scope_value, kind=kind,
            limit=limit, burst=burst, enforcement=enforcement,
            long_context_threshold=long_context_threshold)
        if not paths:
            raise typer.BadParameter("give at least one field to change")
        asyncio.run(update_quota(get_config(), quota, paths, request_id))

    @quota_app.command("get")
    def quota_get(quota_id: QuotaId, org: Org) -> None:
        """Print a quota."""
        asyncio.run(get_quota(get_config(), org, quota_id))

    @quota_app.command("list")
    def quota_list(org: Org) -> None:
        """Print an org's quotas, oldest first."""
        asyncio.run(list_quotas(get_config(), org))

    @quota_app.command("delete")
    def quota_delete(quota_id: QuotaId, org: Org, request_id: RequestId = "") -> None:
        """Delete a quota."""
        asyncio.run(delete_quota(get_config(), org, quota_id, request_id))

    @policy_app.command("get")
    def policy_get(org: Org) -> None:
        """Print an org's spend policy (defaults if never set)."""
        asyncio.run(get_policy(get_config(), org))

    @policy_app.command("set")
    def policy_set(
        org: Org,
        max_context_tokens: Annotated[int, typer.Option(help="0 = no limit.")] = 0,
        max_upload_bytes: Annotated[int, typer.Option(help="0 = no limit.")] = 0,
        long_context_threshold_tokens: Annotated[int, typer.Option(
            help="Context length from which a request counts as long-context.")] = 0,
        throttled_requests_per_second: Annotated[int, typer.Option(
            help="Requests/s allowed while THROTTLED; 0 = deny all.")] = 0,
        request_id: RequestId = "",
    ) -> None:
        """Replace an org's spend policy (options not given are 0)."""
        asyncio.run(set_policy(get_config(), pb.SpendPolicy(
            org_id=org, max_context_tokens=max_context_tokens,
            max_upload_bytes=max_upload_bytes,
            long_context_threshold_tokens=long_context_threshold_tokens,
            throttled_requests_per_second=throttled_requests_per_second), request_id))

    parent.add_typer(budget_app, name="budget")
    parent.add_typer(quota_app, name="quota")
    parent.add_typer(policy_app, name="policy")
