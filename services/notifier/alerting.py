"""What an outbox event means for an org's alert rules, in plain Python: which rules it
fires, with what notification, and when a failed delivery is tried again.

Events come from the ledger's and metering's outboxes (`SourceEvent`). A rule fires when it
wants the event's notification type, is enabled, and is outside its cooldown for that type.
LOW_BALANCE with a threshold fires when available credit *crosses* below it (the rule
remembers whether the org is below), so a balance hovering around the threshold alerts per
crossing and the cooldown bounds even that; without a threshold the ledger's own LOW_BALANCE
events fire it. A notification's id derives from (source event, rule): replays of an event
cannot notify twice. No grpc, no SQL.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from .domain import AlertRule, NotificationType

MAX_ATTEMPTS: Final = 8
"""Attempts before a delivery is dead-lettered (about 4 minutes of backoff by default)."""
FIRST_RETRY: Final = timedelta(seconds=1)
MAX_RETRY: Final = timedelta(minutes=5)

# source outbox type -> notification type (types with no entry notify nobody)
_TYPE_OF: Final[Mapping[tuple[str, str], NotificationType]] = {
    ("ledger", "BALANCE_CHANGED"): NotificationType.BALANCE_CHANGED,
    ("ledger", "LOW_BALANCE"): NotificationType.LOW_BALANCE,
    ("ledger", "BILLING_STATE_CHANGED"): NotificationType.BILLING_STATE_CHANGED,
    ("ledger", "PAYMENT_SUCCEEDED"): NotificationType.PAYMENT_SUCCEEDED,
    ("ledger", "PAYMENT_FAILED"): NotificationType.PAYMENT_FAILED,
    ("ledger", "TOP_UP_SUCCEEDED"): NotificationType.TOP_UP_SUCCEEDED,
    ("ledger", "TOP_UP_FAILED"): NotificationType.TOP_UP_FAILED,
    ("metering", "BUDGET_THRESHOLD"): NotificationType.BUDGET_THRESHOLD,
    ("metering", "HARD_LIMIT_HIT"): NotificationType.HARD_LIMIT_HIT,
}


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """One event of a service's outbox, as the notifier reads it."""

    source: str
    """"ledger" or "metering"."""
    event_id: str
    sequence: int
    org_id: str
    type: str
    occurred_at: datetime
    trace_id: str = ""
    available_micros: int | None = None
    """Ledger events: the org's available credit after the change."""
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Notification:
    """Something one rule tells an org about one event."""

    notification_id: str
    source_event_id: str
    rule_id: str
    org_id: str
    type: NotificationType
    occurred_at: datetime
    trace_id: str
    title: str
    attributes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RuleState:
    """What a rule remembers between events."""

    below: Mapping[str, bool]
    """rule id -> whether the org's credit is below the rule's LOW_BALANCE threshold."""
    last_sent: Mapping[tuple[str, NotificationType], datetime]
    """(rule id, type) -> when the rule last notified that type."""


@dataclass(slots=True)
class Decisions:
    """What a batch of events causes: notifications, and the rules' new memory."""

    notifications: list[Notification] = field(default_factory=list)
    below: dict[str, bool] = field(default_factory=dict)
    last_sent: dict[tuple[str, NotificationType], datetime] = field(default_factory=dict)


def notification_id(source_event_id: str, rule_id: str) -> str:
    """The one notification an event can cause through one rule."""
    digest = hashlib.sha256(f"{source_event_id}\x1f{rule_id}".encode()).hexdigest()[:32]
    return f"ntf_{digest}"


def _credits(micros: int) -> str:
    whole, frac = divmod(abs(micros), 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return f"-{text}" if micros < 0 else text


def _title(kind: NotificationType, event: SourceEvent, rule: AlertRule) -> str:
    if kind is NotificationType.LOW_BALANCE:
        below = (f" below {_credits(rule.low_balance_threshold_micros)}"
                 if rule.low_balance_threshold_micros else " low")
        return f"Available credit{below}: {_credits(event.available_micros or 0)} left"
    if kind is NotificationType.BUDGET_THRESHOLD:
        return (f"Budget {event.attributes.get('budget_id', '')} reached "
                f"{event.attributes.get('threshold_percent', '?')} %")
    if kind is NotificationType.BILLING_STATE_CHANGED:
        return f"Billing state is now {event.attributes.get('billing_state', '?')}"
    return kind.value.replace("_", " ").capitalize()


def decide(events: Sequence[SourceEvent], rules_of: Mapping[str, Sequence[AlertRule]],
           state: RuleState, now: datetime) -> Decisions:
    """The notifications `events` (in outbox order) cause under the orgs' rules."""
    out = Decisions()
    below = dict(state.below)
    last_sent = dict(state.last_sent)
    for event in events:
        for rule in rules_of.get(event.org_id, ()):
            if not rule.is_enabled:
                continue
            kind = _fires(event, rule, below)
            if kind is None or kind not in rule.types:
                continue
            sent = last_sent.get((rule.rule_id, kind))
            if sent is not None and rule.cooldown_seconds and (
                    event.occurred_at < sent + timedelta(seconds=rule.cooldown_seconds)):
                continue
            last_sent[(rule.rule_id, kind)] = event.occurred_at
            out.last_sent[(rule.rule_id, kind)] = event.occurred_at
            attributes = {**event.attributes, "source": event.source}
            if event.available_micros is not None:
                attributes["available_micros"] = str(event.available_micros)
            if kind is NotificationType.LOW_BALANCE and rule.low_balance_threshold_micros:
                attributes["threshold_micros"] = str(rule.low_balance_threshold_micros)
            out.notifications.append(Notification(
                notification_id(event.event_id, rule.rule_id), event.event_id, rule.rule_id,
                event.org_id, kind, event.occurred_at, event.trace_id,
                _title(kind, event, rule), attributes))
    out.below = {r: b for r, b in below.items() if state.below.get(r) != b}
    return out


def _fires(event: SourceEvent, rule: AlertRule, below: dict[str, bool]
           ) -> NotificationType | None:
    """The notification type `event` is for `rule`, or None; updates `below`."""
    threshold = rule.low_balance_threshold_micros
    if (threshold and event.source == "ledger" and event.available_micros is not None
            and NotificationType.LOW_BALANCE in rule.types):
        was_below = below.get(rule.rule_id, False)
        now_below = event.available_micros < threshold
        below[rule.rule_id] = now_below
        if now_below and not was_below:
            return NotificationType.LOW_BALANCE
        if event.type == "LOW_BALANCE":
            return None  # the threshold rule decides LOW_BALANCE for itself
    kind = _TYPE_OF.get((event.source, event.type))
    if kind is NotificationType.LOW_BALANCE and threshold:
        return None
    return kind


def retry_at(attempts: int, now: datetime, rng: random.Random | None = None,
             first: timedelta = FIRST_RETRY) -> datetime | None:
    """When to try again after `attempts` failed attempts: exponential backoff with full
    jitter (so receivers coming back are not stampeded), capped; None = dead-letter."""
    if attempts >= MAX_ATTEMPTS:
        return None
    ceiling = min(first * (2 ** (attempts - 1)), MAX_RETRY)
    fraction: float = (rng or random.Random()).random()
    wait: timedelta = first / 2 + (ceiling - first / 2) * fraction
    return now + wait
