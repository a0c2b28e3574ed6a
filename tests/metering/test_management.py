"""Budgets, quotas and spend policies through the real metering service: what is created is
what reads back (with the current period's spend) and what Authorize enforces; every write is
idempotent on its request id; bad input names every bad field and writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime

import pytest
import typer
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from services.metering.server import MeteringConfig
from tally.cli import policies as policies_cli
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import CREDIT, Suite, start_suite, stop_suite
from tests.metering.test_authorize import ask, sql


@pytest.fixture
async def suite(db_url: str) -> AsyncIterator[Suite]:
    # A policy cache far longer than any test: what these RPCs change must reach Authorize
    # at once all the same (the store tells the cache).
    running = await start_suite(db_url, MeteringConfig(policy_cache_ms=600_000))
    yield running
    await stop_suite(running)

ORG = "acme"


def stamp(at: datetime) -> Timestamp:
    found = Timestamp()
    found.FromDatetime(at)
    return found


def a_budget(org: str = ORG, **fields: object) -> mpb.Budget:
    values: dict[str, object] = dict(
        org_id=org, name="all of acme", scope=mpb.BUDGET_SCOPE_ORG,
        period=mpb.BUDGET_PERIOD_MONTHLY, limit_micros=10 * CREDIT,
        enforcement=mpb.BUDGET_ENFORCEMENT_HARD)
    values.update(fields)
    return mpb.Budget(**values)  # type: ignore[arg-type]


def a_quota(org: str = ORG, **fields: object) -> mpb.Quota:
    values: dict[str, object] = dict(
        org_id=org, scope=mpb.QUOTA_SCOPE_PROJECT, scope_value="search",
        kind=mpb.QUOTA_KIND_REQUESTS_PER_SECOND, limit=50, burst=10,
        enforcement=mpb.QUOTA_ENFORCEMENT_HARD)
    values.update(fields)
    return mpb.Quota(**values)  # type: ignore[arg-type]


def caller(org: str = ORG) -> common_pb2.RequestContext:
    return common_pb2.RequestContext(org_id=org, actor="user:alice")


async def create_budget(suite: Suite, request_id: str, budget: mpb.Budget) -> mpb.Budget:
    reply = await suite.client.metering.CreateBudget(mpb.CreateBudgetRequest(
        request_id=request_id, context=caller(budget.org_id), budget=budget))
    return reply.budget


async def create_quota(suite: Suite, request_id: str, quota: mpb.Quota) -> mpb.Quota:
    reply = await suite.client.metering.CreateQuota(mpb.CreateQuotaRequest(
        request_id=request_id, context=caller(quota.org_id), quota=quota))
    return reply.quota


async def count(suite: Suite, table: str) -> int:
    return int((await sql(suite, f"SELECT count(*) FROM metering.{table}"))[0][0])


async def refused(call: Awaitable[object]) -> TallyError:
    with pytest.raises(TallyError) as caught:
        await call
    return caught.value


def fields_of(error: TallyError) -> set[str]:
    return {v.field for v in error.violations}


def month_start(at: datetime) -> datetime:
    return datetime(at.year, at.month, 1, tzinfo=UTC)


# --- budgets ------------------------------------------------------------------------------


async def test_a_created_budget_reads_back_with_default_alarms_and_the_current_month(
    suite: Suite,
) -> None:
    created = await create_budget(suite, "c-1", a_budget(budget_id="ignored", spent_micros=7))
    assert created.budget_id.startswith("bud_") and created.budget_id != "ignored"
    assert list(created.alarm_thresholds_percent) == [50, 80, 100]
    assert (created.spent_micros, created.reserved_micros) == (0, 0)
    start = created.period_start.ToDatetime(tzinfo=UTC)
    assert start == month_start(datetime.now(UTC))
    assert created.period_end.ToDatetime(tzinfo=UTC) > start
    assert created.created_at.seconds > 0 and created.updated_at.seconds > 0
    got = await suite.client.metering.GetBudget(
        mpb.GetBudgetRequest(org_id=ORG, budget_id=created.budget_id))
    assert got.budget == created
    custom = await create_budget(suite, "c-2", a_budget(
        name="team search, launch week", scope=mpb.BUDGET_SCOPE_LABEL,
        scope_value="team=search", period=mpb.BUDGET_PERIOD_CUSTOM,
        period_start=stamp(datetime(2026, 3, 1, tzinfo=UTC)),
        period_end=stamp(datetime(2026, 3, 8, tzinfo=UTC)), alarm_thresholds_percent=[90, 150],
        enforcement=mpb.BUDGET_ENFORCEMENT_SOFT_DOWNGRADE, downgrade_at_percent=75))
    assert (custom.scope_value, list(custom.alarm_thresholds_percent)) == ("team=search",
                                                                          [90, 150])
    assert custom.period_start.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    assert custom.downgrade_at_percent == 75


async def test_a_budget_replay_returns_the_same_budget_and_another_payload_is_refused(
    suite: Suite,
) -> None:
    first = await create_budget(suite, "c-1", a_budget())
    again = await create_budget(suite, "c-1", a_budget())
    assert again == first
    error = await refused(create_budget(suite, "c-1", a_budget(limit_micros=CREDIT)))
    assert error.reason is Reason.IDEMPOTENCY_KEY_REUSED and error.field == "request_id"
    assert error.code.name == "ALREADY_EXISTS"
    rows = await sql(suite, "SELECT budget_id, limit_micros FROM metering.budgets")
    assert [(r[0], r[1]) for r in rows] == [(first.budget_id, 10 * CREDIT)]
    # the same request id in another org is another request
    other = await create_budget(suite, "c-1", a_budget(org="globex"))
    assert other.budget_id != first.budget_id


async def test_16_parallel_replays_of_one_create_make_one_budget(suite: Suite) -> None:
    created = await asyncio.gather(*(create_budget(suite, "c-1", a_budget())
                                     for _ in range(16)))
    assert len({b.budget_id for b in created}) == 1
    assert (await count(suite, "budgets"), await count(suite, "admin_requests")) == (1, 1)


async def test_a_bad_budget_names_every_bad_field_and_writes_nothing(suite: Suite) -> None:
    error = await refused(create_budget(suite, "", a_budget(
        org="", name="", scope=mpb.BUDGET_SCOPE_LABEL, scope_value="team",
        period=mpb.BUDGET_PERIOD_CUSTOM, period_start=stamp(datetime(2026, 3, 1, tzinfo=UTC)),
        limit_micros=0, alarm_thresholds_percent=[80, 50, 2000],
        enforcement=mpb.BUDGET_ENFORCEMENT_UNSPECIFIED, downgrade_at_percent=5)))
    assert error.reason is Reason.INVALID_ARGUMENT
    assert fields_of(error) == {
        "request_id", "budget.org_id", "budget.name", "budget.scope_value",
        "budget.period_end", "budget.limit_micros", "budget.alarm_thresholds_percent[1]",
        "budget.alarm_thresholds_percent[2]", "budget.enforcement"}
    # a MONTHLY budget's period is output only: a period_start sent back is ignored
    error = await refused(create_budget(suite, "c-2", a_budget(
        scope=mpb.BUDGET_SCOPE_ORG, scope_value="p1",
        period_start=stamp(datetime(2026, 3, 1, tzinfo=UTC)),
        alarm_thresholds_percent=list(range(1, 12)),
        enforcement=mpb.BUDGET_ENFORCEMENT_SOFT_DOWNGRADE)))
    assert fields_of(error) == {"budget.scope_value", "budget.alarm_thresholds_percent",
                                "budget.downgrade_at_percent"}
    error = await refused(create_budget(suite, "c-3", a_budget(
        scope=mpb.BUDGET_SCOPE_UNSPECIFIED, period=mpb.BUDGET_PERIOD_UNSPECIFIED,
        downgrade_at_percent=50, period_start=stamp(datetime(2026, 3, 8, tzinfo=UTC)))))
    assert fields_of(error) == {"budget.scope", "budget.period", "budget.downgrade_at_percent"}
    error = await refused(create_budget(suite, "c-4", a_budget(
        scope=mpb.BUDGET_SCOPE_PROJECT, period=mpb.BUDGET_PERIOD_CUSTOM,
        period_start=stamp(datetime(2026, 3, 8, tzinfo=UTC)),
        period_end=stamp(datetime(2026, 3, 1, tzinfo=UTC)))))
    assert fields_of(error) == {"budget.scope_value", "budget.period_end"}
    assert (await count(suite, "budgets"), await count(suite, "admin_requests")) == (0, 0)


async def test_budgets_list_in_creation_order_page_by_page(suite: Suite) -> None:
    ids = [(await create_budget(suite, f"c-{i}", a_budget(name=f"b{i}"))).budget_id
           for i in range(5)]
    await create_budget(suite, "c-other", a_budget(org="globex"))
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = await suite.client.metering.ListBudgets(
            mpb.ListBudgetsRequest(org_id=ORG, page_size=2, page_token=token))
        seen += [b.budget_id for b in page.budgets]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (ids, 3)
    everything = await suite.client.metering.ListBudgets(mpb.ListBudgetsRequest(org_id=ORG))
    assert [b.budget_id for b in everything.budgets] == ids and not everything.next_page_token
    for request, field in (
            (mpb.ListBudgetsRequest(org_id=ORG, page_size=1001), "page_size"),
            (mpb.ListBudgetsRequest(org_id=ORG, page_size=-1), "page_size"),
            (mpb.ListBudgetsRequest(org_id=ORG, page_token="bm9wZQ=="), "page_token"),
            (mpb.ListBudgetsRequest(org_id=""), "org_id")):
        error = await refused(suite.client.metering.ListBudgets(request))
        assert error.reason is Reason.INVALID_ARGUMENT and fields_of(error) == {field}


async def test_an_update_changes_only_the_masked_fields_or_replaces_all(suite: Suite) -> None:
    created = await create_budget(suite, "c-1", a_budget(alarm_thresholds_percent=[25, 75]))

    async def update(request_id: str, budget: mpb.Budget, *paths: str) -> mpb.Budget:
        reply = await suite.client.metering.UpdateBudget(mpb.UpdateBudgetRequest(
            request_id=request_id, context=caller(), budget=budget,
            update_mask=FieldMask(paths=list(paths))))
        return reply.budget

    # only the limit changes, although the other fields of the message are empty
    sparse = mpb.Budget(budget_id=created.budget_id, org_id=ORG, limit_micros=3 * CREDIT)
    raised = await update("u-1", sparse, "limit_micros")
    assert raised.limit_micros == 3 * CREDIT
    assert (raised.name, list(raised.alarm_thresholds_percent), raised.enforcement) == (
        created.name, [25, 75], mpb.BUDGET_ENFORCEMENT_HARD)
    assert raised.created_at == created.created_at
    assert await update("u-1", sparse, "limit_micros") == raised
    error = await refused(update("u-1", sparse, "name"))
    assert error.reason is Reason.IDEMPOTENCY_KEY_REUSED
    # an empty mask replaces every writable field
    replaced = await update("u-2", a_budget(
        budget_id=created.budget_id, name="project p1", scope=mpb.BUDGET_SCOPE_PROJECT,
        scope_value="p1", limit_micros=CREDIT, enforcement=mpb.BUDGET_ENFORCEMENT_ALERT_ONLY))
    assert (replaced.name, replaced.scope_value, replaced.limit_micros) == ("project p1", "p1",
                                                                           CREDIT)
    assert list(replaced.alarm_thresholds_percent) == [50, 80, 100]
    # bad masks and a merged result that breaks a rule are refused, and change nothing
    for paths, fields in ((("budget_id",), {"update_mask"}), (("nope",), {"update_mask"}),
                          (("spent_micros", "name"), {"update_mask"}),
                          (("enforcement",), {"budget.downgrade_at_percent"}),
                          (("scope",), {"budget.scope_value"})):
        error = await refused(update("u-3", a_budget(
            budget_id=created.budget_id, scope=mpb.BUDGET_SCOPE_ORG,
            enforcement=mpb.BUDGET_ENFORCEMENT_SOFT_DOWNGRADE), *paths))
        assert error.reason is Reason.INVALID_ARGUMENT and fields_of(error) == fields, paths
    got = await suite.client.metering.GetBudget(
        mpb.GetBudgetRequest(org_id=ORG, budget_id=created.budget_id))
    assert got.budget == replaced
    error = await refused(update("u-4", a_budget(budget_id="bud_nope"), "name"))
    assert (error.reason, error.field) == (Reason.NOT_FOUND, "budget.budget_id")
    error = await refused(update("u-5", a_budget(org="globex", budget_id=created.budget_id),
                                 "name"))
    assert error.reason is Reason.NOT_FOUND


async def test_a_deleted_budget_is_gone_and_the_delete_replays(suite: Suite) -> None:
    created = await create_budget(suite, "c-1", a_budget())

    def delete(request_id: str, budget_id: str) -> Awaitable[object]:
        return suite.client.metering.DeleteBudget(mpb.DeleteBudgetRequest(
            request_id=request_id, context=caller(), org_id=ORG, budget_id=budget_id))

    await delete("d-1", created.budget_id)
    await delete("d-1", created.budget_id)  # a replay succeeds again
    for call in (delete("d-2", created.budget_id), delete("d-3", "bud_nope"),
                 suite.client.metering.GetBudget(
                     mpb.GetBudgetRequest(org_id=ORG, budget_id=created.budget_id))):
        error = await refused(call)
        assert (error.reason, error.field) == (Reason.NOT_FOUND, "budget_id")
    error = await refused(delete("d-1", "bud_other"))
    assert error.reason is Reason.IDEMPOTENCY_KEY_REUSED
    listed = await suite.client.metering.ListBudgets(mpb.ListBudgetsRequest(org_id=ORG))
    assert not listed.budgets


async def test_authorize_enforces_a_budget_created_by_rpc_and_get_shows_its_holds(
    suite: Suite,
) -> None:
    await suite.fund(ORG, 100)
    roomy = await create_budget(suite, "c-roomy", a_budget(name="roomy"))
    allowed = await suite.client.metering.Authorize(ask("r-1"))
    assert allowed.decision == mpb.DECISION_ALLOW
    shown = await suite.client.metering.GetBudget(
        mpb.GetBudgetRequest(org_id=ORG, budget_id=roomy.budget_id))
    assert (shown.budget.spent_micros, shown.budget.reserved_micros) == (
        0, allowed.reserved_micros)
    await create_budget(suite, "c-tiny", a_budget(name="tiny", limit_micros=1))
    denied = await suite.client.metering.Authorize(ask("r-2"))
    assert (denied.decision, denied.deny_reason) == (mpb.DECISION_DENY, "BUDGET_EXCEEDED")
    listed = await suite.client.metering.ListBudgets(mpb.ListBudgetsRequest(org_id=ORG))
    assert [b.reserved_micros for b in listed.budgets] == [allowed.reserved_micros, 0]


# --- quotas -------------------------------------------------------------------------------


async def test_quotas_are_created_read_listed_updated_and_deleted(suite: Suite) -> None:
    created = await create_quota(suite, "q-1", a_quota(quota_id="ignored"))
    assert created.quota_id.startswith("quo_")
    assert (created.scope_value, created.limit, created.burst) == ("search", 50, 10)
    assert await create_quota(suite, "q-1", a_quota()) == created
    error = await refused(create_quota(suite, "q-1", a_quota(limit=51)))
    assert error.reason is Reason.IDEMPOTENCY_KEY_REUSED and error.field == "request_id"
    got = await suite.client.metering.GetQuota(
        mpb.GetQuotaRequest(org_id=ORG, quota_id=created.quota_id))
    assert got.quota == created
    long_context = await create_quota(suite, "q-2", a_quota(
        scope=mpb.QUOTA_SCOPE_ENVIRONMENT, scope_value="search/prod",
        kind=mpb.QUOTA_KIND_LONG_CONTEXT_REQUESTS_PER_SECOND, long_context_threshold_tokens=100_000,
        enforcement=mpb.QUOTA_ENFORCEMENT_SOFT))
    first = await suite.client.metering.ListQuotas(
        mpb.ListQuotasRequest(org_id=ORG, page_size=1))
    second = await suite.client.metering.ListQuotas(mpb.ListQuotasRequest(
        org_id=ORG, page_size=1, page_token=first.next_page_token))
    assert [q.quota_id for q in (*first.quotas, *second.quotas)] == [created.quota_id,
                                                                      long_context.quota_id]
    assert not second.next_page_token
    updated = await suite.client.metering.UpdateQuota(mpb.UpdateQuotaRequest(
        request_id="u-1", context=caller(),
        quota=mpb.Quota(quota_id=created.quota_id, org_id=ORG, limit=5, burst=99),
        update_mask=FieldMask(paths=["limit"])))
    assert (updated.quota.limit, updated.quota.burst) == (5, 10)
    error = await refused(suite.client.metering.UpdateQuota(mpb.UpdateQuotaRequest(
        request_id="u-2", context=caller(),
        quota=mpb.Quota(quota_id=created.quota_id, org_id=ORG),
        update_mask=FieldMask(paths=["quota_id"]))))
    assert fields_of(error) == {"update_mask"}
    await suite.client.metering.DeleteQuota(mpb.DeleteQuotaRequest(
        request_id="d-1", context=caller(), org_id=ORG, quota_id=created.quota_id))
    await suite.client.metering.DeleteQuota(mpb.DeleteQuotaRequest(
        request_id="d-1", context=caller(), org_id=ORG, quota_id=created.quota_id))
    for call in (suite.client.metering.GetQuota(
            mpb.GetQuotaRequest(org_id=ORG, quota_id=created.quota_id)),
                 suite.client.metering.DeleteQuota(mpb.DeleteQuotaRequest(
                     request_id="d-2", context=caller(), org_id=ORG,
                     quota_id=created.quota_id))):
        error = await refused(call)
        assert (error.reason, error.field) == (Reason.NOT_FOUND, "quota_id")
    remaining = await suite.client.metering.ListQuotas(mpb.ListQuotasRequest(org_id=ORG))
    assert [q.quota_id for q in remaining.quotas] == [long_context.quota_id]


async def test_authorize_counts_a_quota_created_by_rpc(suite: Suite) -> None:
    await suite.fund(ORG, 100)
    made = await create_quota(suite, "q-1", a_quota(
        scope=mpb.QUOTA_SCOPE_ORG, scope_value="", kind=mpb.QUOTA_KIND_REQUESTS_PER_DAY,
        limit=1, burst=0))
    first = await suite.client.metering.Authorize(ask("r-1"))
    second = await suite.client.metering.Authorize(ask("r-2"))
    assert first.decision == mpb.DECISION_ALLOW
    assert (second.decision, second.deny_reason) == (mpb.DECISION_DENY, "QUOTA_EXCEEDED")
    assert made.quota_id in second.message


async def test_a_bad_quota_names_every_bad_field_and_writes_nothing(suite: Suite) -> None:
    error = await refused(create_quota(suite, "q-1", a_quota(
        scope=mpb.QUOTA_SCOPE_ENVIRONMENT, scope_value="prod",
        kind=mpb.QUOTA_KIND_UNSPECIFIED, limit=0, burst=-1,
        enforcement=mpb.QUOTA_ENFORCEMENT_UNSPECIFIED, long_context_threshold_tokens=-5)))
    assert error.reason is Reason.INVALID_ARGUMENT
    assert fields_of(error) == {"quota.scope_value", "quota.kind", "quota.limit",
                                "quota.burst", "quota.enforcement",
                                "quota.long_context_threshold_tokens"}
    error = await refused(create_quota(suite, "q-2", a_quota(
        scope=mpb.QUOTA_SCOPE_UNSPECIFIED, long_context_threshold_tokens=1000)))
    assert fields_of(error) == {"quota.scope", "quota.long_context_threshold_tokens"}
    assert (await count(suite, "quotas"), await count(suite, "admin_requests")) == (0, 0)


# --- spend policy -------------------------------------------------------------------------


async def test_the_spend_policy_defaults_then_is_replaced_and_enforced(suite: Suite) -> None:
    default = await suite.client.metering.GetSpendPolicy(mpb.GetSpendPolicyRequest(org_id=ORG))
    assert default.policy == mpb.SpendPolicy(org_id=ORG)
    policy = mpb.SpendPolicy(org_id=ORG, max_context_tokens=8_000, max_upload_bytes=1_000_000,
                             long_context_threshold_tokens=32_000,
                             throttled_requests_per_second=2, updated_by="ignored")
    request = mpb.SetSpendPolicyRequest(request_id="p-1", context=caller(), policy=policy)
    stored = (await suite.client.metering.SetSpendPolicy(request)).policy
    assert (stored.max_context_tokens, stored.throttled_requests_per_second) == (8_000, 2)
    assert stored.updated_by == "user:alice" and stored.updated_at.seconds > 0
    assert (await suite.client.metering.SetSpendPolicy(request)).policy == stored
    request.policy.max_context_tokens = 1
    error = await refused(suite.client.metering.SetSpendPolicy(request))
    assert error.reason is Reason.IDEMPOTENCY_KEY_REUSED
    got = await suite.client.metering.GetSpendPolicy(mpb.GetSpendPolicyRequest(org_id=ORG))
    assert got.policy == stored
    await suite.fund(ORG, 100)
    long = await suite.client.metering.Authorize(ask("long", context_tokens=9_000))
    assert (long.decision, long.deny_reason) == (mpb.DECISION_DENY, "CONTEXT_TOO_LONG")
    error = await refused(suite.client.metering.SetSpendPolicy(mpb.SetSpendPolicyRequest(
        request_id="", context=caller(), policy=mpb.SpendPolicy(
            org_id=ORG, max_context_tokens=-1, max_upload_bytes=-1,
            long_context_threshold_tokens=-1, throttled_requests_per_second=-1))))
    assert fields_of(error) == {"request_id", "policy.max_context_tokens",
                                "policy.max_upload_bytes", "policy.long_context_threshold_tokens",
                                "policy.throttled_requests_per_second"}
    error = await refused(suite.client.metering.GetSpendPolicy(mpb.GetSpendPolicyRequest()))
    assert fields_of(error) == {"org_id"}
    assert await count(suite, "spend_policies") == 1


# --- the CLI ------------------------------------------------------------------------------


async def test_tally_budget_quota_and_policy_commands_print_what_they_did(
    suite: Suite, capsys: pytest.CaptureFixture[str],
) -> None:
    config = suite.config
    budget, _ = policies_cli.budget_fields(
        org=ORG, name="team search", limit="12.5", scope="label", scope_value="team=search",
        period="monthly", alarms=[], enforcement="soft-downgrade", downgrade_at=80)
    created = await policies_cli.create_budget(config, budget, "cli-1")
    assert created.limit_micros == 12_500_000
    printed = capsys.readouterr().out
    assert f"budget {created.budget_id}  'team search'  org acme" in printed
    assert "limit     12.5 credits, SOFT_DOWNGRADE from 80%" in printed
    assert "covers    LABEL team=search" in printed and "alarms    50% 80% 100%" in printed
    change, paths = policies_cli.budget_fields(org=ORG, budget_id=created.budget_id,
                                               limit="20.000001")
    assert paths == ["limit_micros"]
    updated = await policies_cli.update_budget(config, change, paths)
    assert (updated.limit_micros, updated.name) == (20_000_001, "team search")
    await policies_cli.list_budgets(config, ORG)
    printed = capsys.readouterr().out
    assert "limit     20.000001 credits, SOFT_DOWNGRADE from 80%" in printed  # the update
    listed = [line for line in printed.splitlines() if line.startswith(created.budget_id)]
    assert len(listed) == 1 and "LABEL team=search" in listed[0]
    assert "20.000001" in listed[0] and printed.endswith("1 budget(s)\n")
    await policies_cli.delete_budget(config, ORG, created.budget_id)
    assert f"deleted {created.budget_id}" in capsys.readouterr().out
    with pytest.raises(typer.Exit):
        await policies_cli.get_budget(config, ORG, created.budget_id)
    assert "NOT_FOUND: budget_id: no budget" in capsys.readouterr().err
    for limit in ("0.0000001", "1e", "ten"):
        with pytest.raises(typer.BadParameter):
            policies_cli.budget_fields(org=ORG, limit=limit)
    with pytest.raises(typer.BadParameter):
        policies_cli.quota_fields(org=ORG, kind="per-fortnight")

    quota, _ = policies_cli.quota_fields(org=ORG, scope="environment", scope_value="search/prod",
                                         kind="tpm", limit=90_000, burst=0, enforcement="soft",
                                         long_context_threshold=0)
    made = await policies_cli.create_quota(config, quota, "cli-q")
    await policies_cli.list_quotas(config, ORG)
    printed = capsys.readouterr().out
    assert f"{made.quota_id}  ENVIRONMENT search/prod" in printed and "1 quota(s)" in printed
    assert "TOKENS_PER_MINUTE" in printed and "limit      90000  SOFT" in printed

    await policies_cli.get_policy(config, ORG)
    assert "spend policy of acme (defaults)" in capsys.readouterr().out
    await policies_cli.set_policy(config, mpb.SpendPolicy(org_id=ORG, max_context_tokens=8_000))
    printed = capsys.readouterr().out
    assert "by user:cli)" in printed and "max context         8000 tokens" in printed
    assert "max upload          no limit" in printed
