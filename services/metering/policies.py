"""Spend-control policies, in plain Python: budgets, quotas and an org's spend policy.

What they are and which requests they apply to. Authorize (`spend/domain.py`) enforces them; the
management RPCs create and change them: a client's `BudgetSpec` / `QuotaSpec` (the writable
fields, enums possibly missing) becomes a `Budget` / `Quota` only through `validate_budget` /
`validate_quota`, which name every bad field by its proto path. No grpc, no SQL.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeVar

from tally.kit import errors
from tally.kit.errors import FieldViolation, invalid_fields
from tally.kit.money import INT64_MAX

DEFAULT_ALARM_THRESHOLDS: Final = (50, 80, 100)
MAX_ID_LENGTH: Final = 128
MAX_NAME_LENGTH: Final = 200
MAX_SCOPE_VALUE_LENGTH: Final = 320
"""Longest scope value: a label "key=value" (key <= 63, value <= 256 chars)."""
MAX_ALARM_THRESHOLDS: Final = 10
MAX_ALARM_THRESHOLD_PERCENT: Final = 1000


class BudgetScope(enum.StrEnum):
    """What a budget covers."""

    ORG = "ORG"
    PROJECT = "PROJECT"
    LABEL = "LABEL"


class BudgetPeriod(enum.StrEnum):
    """A calendar month (UTC) or a fixed window."""

    MONTHLY = "MONTHLY"
    CUSTOM = "CUSTOM"


class BudgetEnforcement(enum.StrEnum):
    """What reaching the limit does."""

    HARD = "HARD"
    SOFT_DOWNGRADE = "SOFT_DOWNGRADE"
    ALERT_ONLY = "ALERT_ONLY"


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending limit over a period, with alarms and an enforcement policy."""

    budget_id: str
    org_id: str
    name: str
    scope: BudgetScope
    scope_value: str
    period: BudgetPeriod
    limit_micros: int
    enforcement: BudgetEnforcement
    alarm_thresholds_percent: tuple[int, ...] = DEFAULT_ALARM_THRESHOLDS
    downgrade_at_percent: int = 0
    period_start: datetime | None = None
    """CUSTOM only: start of the window."""
    period_end: datetime | None = None
    """CUSTOM only: end of the window (exclusive)."""
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def applies_to(self, project_id: str, labels: Mapping[str, str]) -> bool:
        """True when a request of this project with these labels counts against the budget."""
        if self.scope is BudgetScope.ORG:
            return True
        if self.scope is BudgetScope.PROJECT:
            return project_id == self.scope_value
        key, _, value = self.scope_value.partition("=")
        return labels.get(key) == value

    def window(self, at: datetime) -> tuple[datetime, datetime] | None:
        """The period containing `at` as [start, end), or None when `at` is outside a CUSTOM
        window (the budget does not apply then)."""
        if self.period is BudgetPeriod.CUSTOM:
            assert self.period_start is not None and self.period_end is not None
            if self.period_start <= at < self.period_end:
                return self.period_start, self.period_end
            return None
        moment = at.astimezone(UTC)
        start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        end = (datetime(moment.year + 1, 1, 1, tzinfo=UTC) if moment.month == 12
               else datetime(moment.year, moment.month + 1, 1, tzinfo=UTC))
        return start, end

    def period_at(self, at: datetime) -> tuple[datetime, datetime]:
        """The period a report at `at` shows: the month containing it, or a CUSTOM budget's one
        window (also before it opens and after it closes)."""
        window = self.window(at)
        if window is None:
            assert self.period_start is not None and self.period_end is not None
            return self.period_start, self.period_end
        return window


@dataclass(frozen=True, slots=True)
class BudgetSpend:
    """A budget with what it has spent and holds in the period shown (`Budget.period_at`)."""

    budget: Budget
    period_start: datetime
    period_end: datetime
    spent_micros: int = 0
    reserved_micros: int = 0


class QuotaScope(enum.StrEnum):
    """What a quota covers."""

    ORG = "ORG"
    PROJECT = "PROJECT"
    ENVIRONMENT = "ENVIRONMENT"
    API_KEY = "API_KEY"


class QuotaKind(enum.StrEnum):
    """What a quota counts."""

    REQUESTS_PER_SECOND = "REQUESTS_PER_SECOND"
    REQUESTS_PER_DAY = "REQUESTS_PER_DAY"
    TOKENS_PER_MINUTE = "TOKENS_PER_MINUTE"
    LONG_CONTEXT_REQUESTS_PER_SECOND = "LONG_CONTEXT_REQUESTS_PER_SECOND"


class QuotaEnforcement(enum.StrEnum):
    """HARD denies; SOFT counts and reports only."""

    HARD = "HARD"
    SOFT = "SOFT"


@dataclass(frozen=True, slots=True)
class Quota:
    """A rate or volume limit checked by Authorize."""

    quota_id: str
    org_id: str
    scope: QuotaScope
    scope_value: str
    kind: QuotaKind
    limit: int
    enforcement: QuotaEnforcement
    burst: int = 0
    long_context_threshold_tokens: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def applies_to(self, project_id: str, environment: str, api_key_id: str) -> bool:
        """True when a request from this project/environment/key is counted by the quota."""
        if self.scope is QuotaScope.ORG:
            return True
        if self.scope is QuotaScope.PROJECT:
            return project_id == self.scope_value
        if self.scope is QuotaScope.ENVIRONMENT:
            return f"{project_id}/{environment}" == self.scope_value
        return api_key_id == self.scope_value


@dataclass(frozen=True, slots=True)
class SpendPolicy:
    """Per-org guard rails checked before pricing; 0 = no limit."""

    org_id: str
    max_context_tokens: int = 0
    max_upload_bytes: int = 0
    long_context_threshold_tokens: int = 0
    throttled_requests_per_second: int = 0
    updated_at: datetime | None = None
    updated_by: str = ""


# --- management: specs, validation, update masks --------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """The writable fields of a budget as a client sent them; None = enum left UNSPECIFIED."""

    name: str
    scope: BudgetScope | None
    scope_value: str
    period: BudgetPeriod | None
    period_start: datetime | None
    period_end: datetime | None
    limit_micros: int
    alarm_thresholds_percent: tuple[int, ...]
    enforcement: BudgetEnforcement | None
    downgrade_at_percent: int


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """The writable fields of a quota as a client sent them; None = enum left UNSPECIFIED."""

    scope: QuotaScope | None
    scope_value: str
    kind: QuotaKind | None
    limit: int
    burst: int
    enforcement: QuotaEnforcement | None
    long_context_threshold_tokens: int


OUTPUT_ONLY: Final[Mapping[type, frozenset[str]]] = {
    BudgetSpec: frozenset({"budget_id", "org_id", "spent_micros", "reserved_micros",
                           "created_at", "updated_at"}),
    QuotaSpec: frozenset({"quota_id", "org_id", "created_at", "updated_at"}),
}
"""Fields of the proto resource an update mask may not name (ids name the resource)."""


class _Problems(list[FieldViolation]):
    def add(self, field: str, description: str) -> None:
        self.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self:
            raise invalid_fields(self)


def check_id(field: str, value: str) -> FieldViolation | None:
    """An id: 1..128 printable characters."""
    return errors.check_id(field, value, MAX_ID_LENGTH)


raise_if = errors.raise_if


def _check_amount(problems: _Problems, field: str, value: int, *, positive: bool) -> None:
    if positive and value <= 0:
        problems.add(field, "must be > 0")
    elif value < 0:
        problems.add(field, "must be >= 0")
    elif value > INT64_MAX:
        problems.add(field, f"must be <= {INT64_MAX}")


def _check_scope_value(problems: _Problems, field: str, scope: enum.Enum, value: str) -> None:
    if scope.name == "ORG":
        if value:
            problems.add(field, "must be empty for ORG scope")
        return
    if not value:
        problems.add(field, f"is required for {scope.name} scope")
    elif len(value) > MAX_SCOPE_VALUE_LENGTH:
        problems.add(field, f"must be at most {MAX_SCOPE_VALUE_LENGTH} characters")
    elif scope.name == "LABEL":
        key, sep, label = value.partition("=")
        if not (key and sep and label):
            problems.add(field, 'must be "key=value" for LABEL scope, e.g. "team=search"')
    elif scope.name == "ENVIRONMENT":
        project, sep, environment = value.partition("/")
        if not (project and sep and environment):
            problems.add(field, 'must be "<project_id>/<environment>" for ENVIRONMENT scope')


def validate_budget(spec: BudgetSpec, *, org_id: str, budget_id: str = "",
                    problems: Iterable[FieldViolation | None] = ()) -> Budget:
    """The budget `spec` describes, or INVALID_ARGUMENT naming every bad field (`budget.*`)
    together with `problems` found elsewhere in the request. Empty alarm thresholds become
    the defaults (50/80/100)."""
    found = _Problems(p for p in problems if p is not None)
    if (bad_org := check_id("budget.org_id", org_id)) is not None:
        found.append(bad_org)
    if not 0 < len(spec.name) <= MAX_NAME_LENGTH:
        found.add("budget.name", f"must be 1..{MAX_NAME_LENGTH} characters")
    if spec.scope is None:
        found.add("budget.scope", "is required (ORG, PROJECT or LABEL)")
    else:
        _check_scope_value(found, "budget.scope_value", spec.scope, spec.scope_value)
    if spec.period is None:
        found.add("budget.period", "is required (MONTHLY or CUSTOM)")
    elif spec.period is BudgetPeriod.CUSTOM:
        if spec.period_start is None:
            found.add("budget.period_start", "is required for a CUSTOM period")
        if spec.period_end is None:
            found.add("budget.period_end", "is required for a CUSTOM period")
        if (spec.period_start is not None and spec.period_end is not None
                and spec.period_start >= spec.period_end):
            found.add("budget.period_end", "must be after period_start")
    _check_amount(found, "budget.limit_micros", spec.limit_micros, positive=True)
    thresholds = spec.alarm_thresholds_percent
    if len(thresholds) > MAX_ALARM_THRESHOLDS:
        found.add("budget.alarm_thresholds_percent", f"at most {MAX_ALARM_THRESHOLDS} entries")
    for i, percent in enumerate(thresholds):
        if not 1 <= percent <= MAX_ALARM_THRESHOLD_PERCENT:
            found.add(f"budget.alarm_thresholds_percent[{i}]",
                      f"must be 1..{MAX_ALARM_THRESHOLD_PERCENT}")
        elif i and percent <= thresholds[i - 1]:
            found.add(f"budget.alarm_thresholds_percent[{i}]",
                      "must be greater than the one before (ascending, no repeats)")
    if spec.enforcement is None:
        found.add("budget.enforcement", "is required (HARD, SOFT_DOWNGRADE or ALERT_ONLY)")
    elif spec.enforcement is BudgetEnforcement.SOFT_DOWNGRADE:
        if not 1 <= spec.downgrade_at_percent <= 100:
            found.add("budget.downgrade_at_percent", "must be 1..100 for SOFT_DOWNGRADE")
    elif spec.downgrade_at_percent != 0:
        found.add("budget.downgrade_at_percent", "must be 0 unless enforcement is "
                  "SOFT_DOWNGRADE")
    found.raise_if_any()
    assert spec.scope and spec.period and spec.enforcement
    return Budget(budget_id=budget_id, org_id=org_id, name=spec.name, scope=spec.scope,
                  scope_value=spec.scope_value, period=spec.period,
                  limit_micros=spec.limit_micros, enforcement=spec.enforcement,
                  alarm_thresholds_percent=thresholds or DEFAULT_ALARM_THRESHOLDS,
                  downgrade_at_percent=spec.downgrade_at_percent,
                  # output only for MONTHLY (the current month), so a fetched budget can be
                  # sent back as it is
                  period_start=spec.period_start if spec.period is BudgetPeriod.CUSTOM else None,
                  period_end=spec.period_end if spec.period is BudgetPeriod.CUSTOM else None)


def validate_quota(spec: QuotaSpec, *, org_id: str, quota_id: str = "",
                   problems: Iterable[FieldViolation | None] = ()) -> Quota:
    """The quota `spec` describes, or INVALID_ARGUMENT naming every bad field (`quota.*`)
    together with `problems` found elsewhere in the request."""
    found = _Problems(p for p in problems if p is not None)
    if (bad_org := check_id("quota.org_id", org_id)) is not None:
        found.append(bad_org)
    if spec.scope is None:
        found.add("quota.scope", "is required (ORG, PROJECT, ENVIRONMENT or API_KEY)")
    else:
        _check_scope_value(found, "quota.scope_value", spec.scope, spec.scope_value)
    if spec.kind is None:
        found.add("quota.kind", "is required")
    _check_amount(found, "quota.limit", spec.limit, positive=True)
    _check_amount(found, "quota.burst", spec.burst, positive=False)
    _check_amount(found, "quota.long_context_threshold_tokens",
                  spec.long_context_threshold_tokens, positive=False)
    if (spec.long_context_threshold_tokens and spec.kind is not None
            and spec.kind is not QuotaKind.LONG_CONTEXT_REQUESTS_PER_SECOND):
        found.add("quota.long_context_threshold_tokens",
                  "must be 0 unless kind is LONG_CONTEXT_REQUESTS_PER_SECOND")
    if spec.enforcement is None:
        found.add("quota.enforcement", "is required (HARD or SOFT)")
    found.raise_if_any()
    assert spec.scope and spec.kind and spec.enforcement
    return Quota(quota_id=quota_id, org_id=org_id, scope=spec.scope,
                 scope_value=spec.scope_value, kind=spec.kind, limit=spec.limit,
                 enforcement=spec.enforcement, burst=spec.burst,
                 long_context_threshold_tokens=spec.long_context_threshold_tokens)


_SPEND_POLICY_LIMITS: Final = ("max_context_tokens", "max_upload_bytes",
                               "long_context_threshold_tokens", "throttled_requests_per_second")


def validate_spend_policy(policy: SpendPolicy,
                          problems: Iterable[FieldViolation | None] = ()) -> None:
    """INVALID_ARGUMENT naming every bad field (`policy.*`: an org id, limits >= 0) together
    with `problems` found elsewhere in the request."""
    found = _Problems(p for p in problems if p is not None)
    if (bad_org := check_id("policy.org_id", policy.org_id)) is not None:
        found.append(bad_org)
    for name in _SPEND_POLICY_LIMITS:
        _check_amount(found, f"policy.{name}", getattr(policy, name), positive=False)
    found.raise_if_any()


S = TypeVar("S", BudgetSpec, QuotaSpec)


def mask_problems(spec_type: type[BudgetSpec] | type[QuotaSpec], paths: Sequence[str]
                  ) -> list[FieldViolation]:
    """What is wrong with an update mask: paths that are not writable fields of the resource."""
    writable = {f.name for f in dataclasses.fields(spec_type)}
    return [FieldViolation("update_mask", f"{path!r} is output only"
                           if path in OUTPUT_ONLY[spec_type] else
                           f"{path!r} is not a writable field")
            for path in paths if path not in writable]


def apply_mask(existing: Budget | Quota, new: S, paths: Sequence[str]) -> S:
    """The spec an update asks for: `existing` with the fields named in `paths` taken from
    `new` (no paths = every writable field from `new`). A path that is not a field, or names
    an output-only field, is INVALID_ARGUMENT naming `update_mask`."""
    raise_if(mask_problems(type(new), paths))
    writable = [f.name for f in dataclasses.fields(new)]
    chosen = set(paths or writable)
    return type(new)(**{name: getattr(new if name in chosen else existing, name)
                        for name in writable})


@dataclass(frozen=True, slots=True)
class PricingUse:
    """What still uses one model or meter of the price book (GetPricingUse): a book that drops
    it would reject all of that, so pricing refuses to publish it."""

    item: str
    """"model <name>" or "meter <METER_NAME>"."""
    recent_events: int = 0
    """Usage events of it within the late-event window (counted up to RECENT_EVENTS_COUNTED)."""
    open_holds: int = 0
    """Authorizations of it still holding credit."""
    quota_ids: tuple[str, ...] = ()
    """Live quotas that count it."""
    budget_ids: tuple[str, ...] = ()
    """Live budgets that name it (none can today: budgets limit credits)."""

    @property
    def in_use(self) -> bool:
        return bool(self.recent_events or self.open_holds or self.quota_ids or self.budget_ids)


RECENT_EVENTS_COUNTED: Final = 1000
MAX_PRICING_USE_MODELS: Final = 1000
MAX_PRICING_USE_METERS: Final = 64
QUOTA_KINDS_COUNTING: Final[Mapping[str, frozenset[QuotaKind]]] = {
    # a token quota counts estimated input plus maximum output tokens (spend.quotas)
    "input_tokens": frozenset({QuotaKind.TOKENS_PER_MINUTE}),
    "output_tokens": frozenset({QuotaKind.TOKENS_PER_MINUTE}),
}
"""Per meter (its wire name), the quota kinds that count it."""
