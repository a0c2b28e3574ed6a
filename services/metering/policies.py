"""Spend-control policies, in plain Python: budgets, quotas and an org's spend policy.

What they are and which requests they apply to. Authorize (`authorize.py`) enforces them; the
management RPCs create and change them. No grpc, no SQL.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

DEFAULT_ALARM_THRESHOLDS: Final = (50, 80, 100)


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
