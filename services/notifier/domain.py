"""Notifier's rules for alert rules: what a rule is, and how a list of them is paged.

Rules are created by CreateAlertRule (a later issue); today the service lists what exists.
No grpc, no SQL: the store is anything with the `AlertRuleStore` shape.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from tally.kit.errors import FieldViolation, invalid_fields
from tally.kit.paging import encode_token, page_problems, page_request


class NotificationType(enum.StrEnum):
    """Kinds of notification a rule can match (proto NotificationType, lower-cased)."""

    LOW_BALANCE = "low_balance"
    BUDGET_THRESHOLD = "budget_threshold"
    HARD_LIMIT_HIT = "hard_limit_hit"
    BILLING_STATE_CHANGED = "billing_state_changed"
    PAYMENT_SUCCEEDED = "payment_succeeded"
    PAYMENT_FAILED = "payment_failed"
    TOP_UP_SUCCEEDED = "top_up_succeeded"
    TOP_UP_FAILED = "top_up_failed"
    BALANCE_CHANGED = "balance_changed"


class Channel(enum.StrEnum):
    """Where a rule delivers (proto Channel, lower-cased)."""

    WEBHOOK = "webhook"
    EMAIL = "email"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class AlertRule:
    """Which notifications an org wants, and where."""

    rule_id: str
    org_id: str
    types: tuple[NotificationType, ...]
    channel: Channel
    webhook_url: str
    email_to: str
    cooldown_seconds: int
    low_balance_threshold_micros: int
    is_enabled: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AlertRulePage:
    """One page of rules, newest first."""

    rules: Sequence[AlertRule]
    next_page_token: str


class AlertRuleStore(Protocol):
    """The store's side of alert rules."""

    async def list_rules(self, org_id: str, *, offset: int, limit: int) -> Sequence[AlertRule]:
        """The org's rules that are not deleted, newest first, `limit` of them from `offset`."""
        ...


class AlertRules:
    """An org's alert rules."""

    def __init__(self, store: AlertRuleStore) -> None:
        self._store = store

    async def list_rules(self, org_id: str, page_size: int, page_token: str) -> AlertRulePage:
        """One page of the org's live rules; raises INVALID_ARGUMENT naming each bad field."""
        problems = page_problems(page_size, page_token)
        if not org_id.strip():
            problems.insert(0, FieldViolation("org_id", "is required"))
        if problems:
            raise invalid_fields(problems)
        page = page_request(page_size, page_token)
        # One extra row says whether another page follows, without counting the rest.
        found = await self._store.list_rules(
            org_id, offset=page.offset, limit=page.page_size + 1
        )
        has_more = len(found) > page.page_size
        token = encode_token("offset", page.offset + page.page_size) if has_more else ""
        return AlertRulePage(found[: page.page_size], token)
