"""PolicyStore: budgets, quotas and spend policies as the management RPCs write and read them.

Every write is idempotent on the client's request id: one transaction claims
`metering.admin_requests` ("<Rpc>:<org>:<request_id>", with a hash of the request's meaning),
does the write and stores its result there. A replay with the same hash returns that stored
result; the same id with another payload is IDEMPOTENCY_KEY_REUSED and writes nothing. A
failed write (bad input, unknown id) rolls the claim back with it, so the id stays free.

Authorize reads the same tables through `SpendStore`; the row -> domain helpers are shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from tally.kit import idempotency
from tally.kit.errors import Reason, TallyError
from tally.kit.paging import encode_time_cursor, time_cursor_page

from .policies import (
    QUOTA_KINDS_COUNTING,
    RECENT_EVENTS_COUNTED,
    Budget,
    BudgetSpec,
    BudgetSpend,
    PricingUse,
    Quota,
    QuotaSpec,
    SpendPolicy,
    apply_mask,
    check_id,
    mask_problems,
    raise_if,
    validate_budget,
    validate_quota,
    validate_spend_policy,
)
from .spend.store import budget_from_row, policy_from_row, quota_from_row

_BUDGET_TIMES: Final = ("period_start", "period_end", "created_at", "updated_at")
_QUOTA_TIMES: Final = ("created_at", "updated_at")

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _to_json(record: Any, **renamed: str) -> str:
    body = dataclasses.asdict(record)
    for old, new in renamed.items():
        body[new] = body.pop(old)
    return json.dumps(body, default=_plain)


def _row_of(raw: str, times: Sequence[str]) -> Mapping[str, Any]:
    """A stored JSON result as a row the *_from_row helpers read."""
    body = json.loads(raw)
    for name in times:
        if body.get(name) is not None:
            body[name] = datetime.fromisoformat(body[name])
    return dict(body)


def _fingerprint(*parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, default=_plain, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _spec_body(spec: BudgetSpec | QuotaSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _not_found(what: str, field: str, wanted: str, org_id: str) -> TallyError:
    return TallyError(Reason.NOT_FOUND, f"{field}: no {what} {wanted!r} in org {org_id!r}",
                      field=field)


_CLAIMS: Final = idempotency.ClaimTable("metering.admin_requests", placeholder="null")


async def _claim(conn: Any, key: str, request_hash: str, request_id: str) -> str | None:
    """None when this transaction owns `key`; the stored result when an earlier call made the
    same request; IDEMPOTENCY_KEY_REUSED when it made another one."""
    claimed = await idempotency.claim(conn, _CLAIMS, key, request_hash)
    if claimed.reused:
        raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                         f"request_id: {request_id!r} was already used for a different "
                         f"{key.split(':', 1)[0]} request", field="request_id",
                         metadata={"request_id": request_id})
    return None if claimed.owned else claimed.result or "null"


async def _record(conn: Any, key: str, result: str) -> None:
    await idempotency.record(conn, _CLAIMS, key, result)


_BUDGET_COLUMNS: Final = (
    "name = $3, scope = $4, scope_value = $5, period = $6, period_start = $7, period_end = $8, "
    "limit_micros = $9, alarm_thresholds_percent = $10, enforcement = $11, "
    "downgrade_at_percent = $12")


def _budget_values(b: Budget) -> tuple[Any, ...]:
    return (b.budget_id, b.org_id, b.name, b.scope.value, b.scope_value, b.period.value,
            b.period_start, b.period_end, b.limit_micros, list(b.alarm_thresholds_percent),
            b.enforcement.value, b.downgrade_at_percent)


_QUOTA_COLUMNS: Final = (
    "scope = $3, scope_value = $4, kind = $5, limit_value = $6, burst = $7, enforcement = $8, "
    "long_context_threshold_tokens = $9")


def _quota_values(q: Quota) -> tuple[Any, ...]:
    return (q.quota_id, q.org_id, q.scope.value, q.scope_value, q.kind.value, q.limit, q.burst,
            q.enforcement.value, q.long_context_threshold_tokens)


class PolicyStore:
    """Postgres persistence of the budget, quota and spend-policy management RPCs."""

    def __init__(self, pool: asyncpg.Pool, *, clock: Clock = _utcnow,
                 on_change: Callable[[str], None] = lambda org_id: None,
                 catch_up_usage: Callable[[], Awaitable[object]] | None = None) -> None:
        self.pool = pool
        self.clock = clock
        self.on_change = on_change
        """Told the org after each committed write (Authorize's policy cache forgets it)."""
        self.catch_up_usage = catch_up_usage
        """Brings the usage roll-ups up to date before `pricing_use` reads them."""

    @contextlib.asynccontextmanager
    async def _writing(self, org_id: str) -> AsyncIterator[Any]:
        """A transaction that changes the org's policies; `on_change` hears of it after."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn
        self.on_change(org_id)

    # -- budgets ---------------------------------------------------------------------------

    async def create_budget(self, request_id: str, org_id: str, spec: BudgetSpec
                            ) -> BudgetSpend:
        """Creates a budget with a new id; a replay returns the budget first created."""
        budget = validate_budget(spec, org_id=org_id,
                                 problems=[check_id("request_id", request_id)])
        key = f"CreateBudget:{org_id}:{request_id}"
        async with self._writing(org_id) as conn:
            stored = await _claim(conn, key, _fingerprint(org_id, _spec_body(spec)), request_id)
            if stored is None:
                row = await conn.fetchrow(
                    "INSERT INTO metering.budgets (budget_id, org_id, name, scope, scope_value, "
                    "period, period_start, period_end, limit_micros, alarm_thresholds_percent, "
                    "enforcement, downgrade_at_percent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
                    "$9, $10, $11, $12) RETURNING *",
                    *_budget_values(dataclasses.replace(
                        budget, budget_id=f"bud_{uuid.uuid4().hex}")))
                budget = budget_from_row(row)
                await _record(conn, key, _to_json(budget))
            else:
                budget = budget_from_row(_row_of(stored, _BUDGET_TIMES))
            return (await self._spend(conn, [budget]))[0]

    async def update_budget(self, request_id: str, org_id: str, budget_id: str,
                            spec: BudgetSpec, paths: Sequence[str]) -> BudgetSpend:
        """Changes the fields in `paths` (none = every writable field); a replay returns the
        budget as this update left it."""
        raise_if([check_id("request_id", request_id), check_id("budget.org_id", org_id),
                  check_id("budget.budget_id", budget_id), *mask_problems(BudgetSpec, paths)])
        key = f"UpdateBudget:{org_id}:{request_id}"
        request_hash = _fingerprint(budget_id, _spec_body(spec), sorted(set(paths)))
        async with self._writing(org_id) as conn:
            stored = await _claim(conn, key, request_hash, request_id)
            if stored is None:
                existing = await conn.fetchrow(
                    "SELECT * FROM metering.budgets WHERE budget_id = $1 AND org_id = $2 "
                    "AND deleted_at IS NULL FOR UPDATE", budget_id, org_id)
                if existing is None:
                    raise _not_found("budget", "budget.budget_id", budget_id, org_id)
                merged = apply_mask(budget_from_row(existing), spec, paths)
                budget = validate_budget(merged, org_id=org_id, budget_id=budget_id)
                row = await conn.fetchrow(
                    f"UPDATE metering.budgets SET {_BUDGET_COLUMNS}, updated_at = now() "
                    "WHERE budget_id = $1 AND org_id = $2 RETURNING *", *_budget_values(budget))
                budget = budget_from_row(row)
                await _record(conn, key, _to_json(budget))
            else:
                budget = budget_from_row(_row_of(stored, _BUDGET_TIMES))
            return (await self._spend(conn, [budget]))[0]

    async def budget(self, org_id: str, budget_id: str) -> BudgetSpend:
        """One live budget with its spend in the current period."""
        raise_if([check_id("org_id", org_id), check_id("budget_id", budget_id)])
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM metering.budgets WHERE budget_id = $1 AND org_id = $2 "
                "AND deleted_at IS NULL", budget_id, org_id)
            if row is None:
                raise _not_found("budget", "budget_id", budget_id, org_id)
            return (await self._spend(conn, [budget_from_row(row)]))[0]

    async def budgets(self, org_id: str, page_size: int, page_token: str
                      ) -> tuple[list[BudgetSpend], str]:
        """A page of the org's live budgets by (created_at, budget_id), with their spend, and
        the token of the next page ("" after the last)."""
        size, after = time_cursor_page(page_size, page_token, "budgets",
                                       also=[check_id("org_id", org_id)])
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM metering.budgets WHERE org_id = $1 AND deleted_at IS NULL "
                "AND ($2::timestamptz IS NULL OR (created_at, budget_id) > ($2, $3)) "
                "ORDER BY created_at, budget_id LIMIT $4",
                org_id, after[0] if after else None, after[1] if after else "", size + 1)
            page = await self._spend(conn, [budget_from_row(r) for r in rows[:size]])
        token = ""
        if len(rows) > size:
            last = page[-1].budget
            assert last.created_at is not None
            token = encode_time_cursor("budgets", last.created_at, last.budget_id)
        return page, token

    async def delete_budget(self, request_id: str, org_id: str, budget_id: str) -> None:
        """Soft-deletes a live budget (Authorize stops applying it); a replay succeeds again."""
        raise_if([check_id("request_id", request_id), check_id("org_id", org_id),
                  check_id("budget_id", budget_id)])
        await self._delete("DeleteBudget", "budget", request_id, org_id, budget_id)

    async def _spend(self, conn: Any, budgets: Sequence[Budget]) -> list[BudgetSpend]:
        now = self.clock()
        periods = [b.period_at(now) for b in budgets]
        rows = await conn.fetch(
            "SELECT u.budget_id, u.spent_micros, u.reserved_micros FROM metering.budget_usage u "
            "JOIN unnest($1::text[], $2::timestamptz[]) AS k(id, start) "
            "ON u.budget_id = k.id AND u.period_start = k.start",
            [b.budget_id for b in budgets], [p[0] for p in periods])
        usage = {r["budget_id"]: (r["spent_micros"], r["reserved_micros"]) for r in rows}
        return [BudgetSpend(b, start, end, *usage.get(b.budget_id, (0, 0)))
                for b, (start, end) in zip(budgets, periods, strict=True)]

    async def _delete(self, rpc: str, what: str, request_id: str, org_id: str,
                      target_id: str) -> None:
        key = f"{rpc}:{org_id}:{request_id}"
        async with self._writing(org_id) as conn:
            if await _claim(conn, key, _fingerprint(target_id), request_id) is not None:
                return
            deleted = await conn.fetchval(
                f"UPDATE metering.{what}s SET deleted_at = now(), updated_at = now() "
                f"WHERE {what}_id = $1 AND org_id = $2 AND deleted_at IS NULL "
                "RETURNING true", target_id, org_id)
            if not deleted:
                raise _not_found(what, f"{what}_id", target_id, org_id)
            await _record(conn, key, "{}")

    # -- quotas ----------------------------------------------------------------------------

    async def create_quota(self, request_id: str, org_id: str, spec: QuotaSpec) -> Quota:
        """Creates a quota with a new id; a replay returns the quota first created."""
        quota = validate_quota(spec, org_id=org_id, problems=[check_id("request_id", request_id)])
        key = f"CreateQuota:{org_id}:{request_id}"
        async with self._writing(org_id) as conn:
            stored = await _claim(conn, key, _fingerprint(org_id, _spec_body(spec)), request_id)
            if stored is not None:
                return quota_from_row(_row_of(stored, _QUOTA_TIMES))
            row = await conn.fetchrow(
                "INSERT INTO metering.quotas (quota_id, org_id, scope, scope_value, kind, "
                "limit_value, burst, enforcement, long_context_threshold_tokens) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
                *_quota_values(dataclasses.replace(quota, quota_id=f"quo_{uuid.uuid4().hex}")))
            quota = quota_from_row(row)
            await _record(conn, key, _to_json(quota, limit="limit_value"))
            return quota

    async def update_quota(self, request_id: str, org_id: str, quota_id: str, spec: QuotaSpec,
                           paths: Sequence[str]) -> Quota:
        """Changes the fields in `paths` (none = every writable field); a replay returns the
        quota as this update left it."""
        raise_if([check_id("request_id", request_id), check_id("quota.org_id", org_id),
                  check_id("quota.quota_id", quota_id), *mask_problems(QuotaSpec, paths)])
        key = f"UpdateQuota:{org_id}:{request_id}"
        request_hash = _fingerprint(quota_id, _spec_body(spec), sorted(set(paths)))
        async with self._writing(org_id) as conn:
            stored = await _claim(conn, key, request_hash, request_id)
            if stored is not None:
                return quota_from_row(_row_of(stored, _QUOTA_TIMES))
            existing = await conn.fetchrow(
                "SELECT * FROM metering.quotas WHERE quota_id = $1 AND org_id = $2 "
                "AND deleted_at IS NULL FOR UPDATE", quota_id, org_id)
            if existing is None:
                raise _not_found("quota", "quota.quota_id", quota_id, org_id)
            merged = apply_mask(quota_from_row(existing), spec, paths)
            quota = validate_quota(merged, org_id=org_id, quota_id=quota_id)
            row = await conn.fetchrow(
                f"UPDATE metering.quotas SET {_QUOTA_COLUMNS}, updated_at = now() "
                "WHERE quota_id = $1 AND org_id = $2 RETURNING *", *_quota_values(quota))
            quota = quota_from_row(row)
            await _record(conn, key, _to_json(quota, limit="limit_value"))
            return quota

    async def quota(self, org_id: str, quota_id: str) -> Quota:
        """One live quota."""
        raise_if([check_id("org_id", org_id), check_id("quota_id", quota_id)])
        row = await self.pool.fetchrow(
            "SELECT * FROM metering.quotas WHERE quota_id = $1 AND org_id = $2 "
            "AND deleted_at IS NULL", quota_id, org_id)
        if row is None:
            raise _not_found("quota", "quota_id", quota_id, org_id)
        return quota_from_row(row)

    async def quotas(self, org_id: str, page_size: int, page_token: str
                     ) -> tuple[list[Quota], str]:
        """A page of the org's live quotas by (created_at, quota_id), and the next token."""
        size, after = time_cursor_page(page_size, page_token, "quotas",
                                       also=[check_id("org_id", org_id)])
        rows = await self.pool.fetch(
            "SELECT * FROM metering.quotas WHERE org_id = $1 AND deleted_at IS NULL "
            "AND ($2::timestamptz IS NULL OR (created_at, quota_id) > ($2, $3)) "
            "ORDER BY created_at, quota_id LIMIT $4",
            org_id, after[0] if after else None, after[1] if after else "", size + 1)
        page = [quota_from_row(r) for r in rows[:size]]
        token = ""
        if len(rows) > size:
            last = page[-1]
            assert last.created_at is not None
            token = encode_time_cursor("quotas", last.created_at, last.quota_id)
        return page, token

    async def delete_quota(self, request_id: str, org_id: str, quota_id: str) -> None:
        """Soft-deletes a live quota (Authorize stops counting it); a replay succeeds again."""
        raise_if([check_id("request_id", request_id), check_id("org_id", org_id),
                  check_id("quota_id", quota_id)])
        await self._delete("DeleteQuota", "quota", request_id, org_id, quota_id)

    # -- spend policy ----------------------------------------------------------------------

    async def set_policy(self, request_id: str, policy: SpendPolicy, actor: str
                         ) -> SpendPolicy:
        """Replaces the org's spend policy; a replay returns the policy this call stored."""
        validate_spend_policy(policy, [check_id("request_id", request_id)])
        key = f"SetSpendPolicy:{policy.org_id}:{request_id}"
        limits = (policy.max_context_tokens, policy.max_upload_bytes,
                  policy.long_context_threshold_tokens, policy.throttled_requests_per_second)
        async with self._writing(policy.org_id) as conn:
            stored = await _claim(conn, key, _fingerprint(policy.org_id, limits), request_id)
            if stored is not None:
                return policy_from_row(policy.org_id, _row_of(stored, ("updated_at",)))
            row = await conn.fetchrow(
                "INSERT INTO metering.spend_policies (org_id, max_context_tokens, "
                "max_upload_bytes, long_context_threshold_tokens, "
                "throttled_requests_per_second, updated_by) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (org_id) DO UPDATE SET "
                "max_context_tokens = EXCLUDED.max_context_tokens, "
                "max_upload_bytes = EXCLUDED.max_upload_bytes, "
                "long_context_threshold_tokens = EXCLUDED.long_context_threshold_tokens, "
                "throttled_requests_per_second = EXCLUDED.throttled_requests_per_second, "
                "updated_by = EXCLUDED.updated_by, updated_at = now() RETURNING *",
                policy.org_id, *limits, actor)
            stored_policy = policy_from_row(policy.org_id, row)
            await _record(conn, key, _to_json(stored_policy))
            return stored_policy

    async def policy(self, org_id: str) -> SpendPolicy:
        """The org's spend policy; no limits (all 0) when never set."""
        raise_if([check_id("org_id", org_id)])
        return policy_from_row(org_id, await self.pool.fetchrow(
            "SELECT * FROM metering.spend_policies WHERE org_id = $1", org_id))

    async def pricing_use(self, models: Sequence[str], meters: Sequence[str], now: datetime,
                          late_window: timedelta) -> list[PricingUse]:
        """What still uses each of `models` and `meters` (meter wire names): recent usage, open
        holds, quotas. Only the items with some use, models first."""
        since = now - late_window
        if self.catch_up_usage is not None:
            await self.catch_up_usage()
        async with self.pool.acquire() as conn:
            # the roll-ups, caught up first (see ingestion.rollup), so the 35 days are cheap to
            # scan: events per day and model (whole days: the window's first day counts whole)
            by_model = {r[0]: r[1] for r in await conn.fetch(
                "SELECT model, least(sum(event_count), $3)::bigint "
                "FROM metering.usage_daily_events WHERE day >= ($2::timestamptz AT TIME ZONE "
                "'UTC')::date AND model = ANY($1::text[]) GROUP BY model",
                list(models), since, RECENT_EVENTS_COUNTED)}
            by_meter = {r[0]: r[1] for r in await conn.fetch(
                "SELECT meter, least(sum(event_count), $3)::bigint FROM metering.usage_hourly "
                "WHERE hour >= date_trunc('hour', $2::timestamptz, 'UTC') "
                "AND meter = ANY($1::text[]) GROUP BY meter",
                list(meters), since, RECENT_EVENTS_COUNTED)}
            holds = {r[0]: r[1] for r in await conn.fetch(
                "SELECT m, count(*) FROM (SELECT coalesce(model, response->>'model') AS m "
                "FROM metering.authorizations WHERE state = 'HELD' AND expires_at > $2) held "
                "WHERE m = ANY($1::text[]) GROUP BY m", list(models), now)}
            kinds = sorted({k.value for m in meters for k in QUOTA_KINDS_COUNTING.get(m, ())})
            quotas: dict[str, list[str]] = {}
            for r in await conn.fetch(
                    "SELECT kind, quota_id FROM metering.quotas WHERE deleted_at IS NULL "
                    "AND kind = ANY($1::text[]) ORDER BY quota_id", kinds):
                quotas.setdefault(r[0], []).append(r[1])
        uses = [PricingUse(f"model {m}", by_model.get(m, 0), holds.get(m, 0)) for m in models]
        for meter in meters:
            counting = [q for k in sorted(QUOTA_KINDS_COUNTING.get(meter, ()))
                        for q in quotas.get(k.value, [])]
            uses.append(PricingUse(f"meter {meter}", by_meter.get(meter, 0),
                                   quota_ids=tuple(counting)))
        return [u for u in uses if u.in_use]
