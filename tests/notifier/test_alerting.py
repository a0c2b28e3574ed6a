"""The alerting rules in plain Python: which events fire which rules, the low-balance crossing,
cooldowns, one notification per event and rule, and the retry schedule."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from services.notifier.alerting import (
    MAX_ATTEMPTS,
    RuleState,
    SourceEvent,
    decide,
    notification_id,
    retry_at,
)
from services.notifier.domain import AlertRule, Channel, NotificationType

T0 = datetime(2026, 11, 1, tzinfo=UTC)
CREDIT = 1_000_000


def rule(rule_id: str = "r1", *types: NotificationType, threshold: int = 0, cooldown: int = 0,
         enabled: bool = True) -> AlertRule:
    return AlertRule(rule_id, "acme", types or (NotificationType.LOW_BALANCE,),
                     Channel.WEBHOOK, "https://hooks.example/t", "", cooldown, threshold,
                     enabled, T0, T0)


def balance(seq: int, available_credits: int, *, kind: str = "BALANCE_CHANGED",
            at: timedelta = timedelta(0)) -> SourceEvent:
    return SourceEvent("ledger", f"ev-{seq}", seq, "acme", kind, T0 + at,
                       available_micros=available_credits * CREDIT)


EMPTY = RuleState({}, {})


def test_a_threshold_rule_fires_on_each_crossing_below_not_on_every_change() -> None:
    rules = {"acme": [rule(threshold=100 * CREDIT)]}
    events = [balance(1, 150), balance(2, 90), balance(3, 80), balance(4, 120), balance(5, 95)]
    out = decide(events, rules, EMPTY, T0)
    assert [n.source_event_id for n in out.notifications] == ["ev-2", "ev-5"]
    assert out.notifications[0].attributes["threshold_micros"] == str(100 * CREDIT)
    assert "below 100" in out.notifications[0].title
    assert out.below == {"r1": True}


def test_the_remembered_state_carries_across_batches() -> None:
    rules = {"acme": [rule(threshold=100 * CREDIT)]}
    first = decide([balance(1, 90)], rules, EMPTY, T0)
    second = decide([balance(2, 80)], rules, RuleState(first.below, first.last_sent), T0)
    assert len(first.notifications) == 1 and second.notifications == []


def test_a_cooldown_suppresses_repeats_of_the_same_type_within_it() -> None:
    rules = {"acme": [rule(threshold=100 * CREDIT, cooldown=3600)]}
    events = [balance(1, 90), balance(2, 120, at=timedelta(minutes=1)),
              balance(3, 90, at=timedelta(minutes=2)),
              balance(4, 120, at=timedelta(hours=2)), balance(5, 90, at=timedelta(hours=2))]
    out = decide(events, rules, EMPTY, T0)
    assert [n.source_event_id for n in out.notifications] == ["ev-1", "ev-5"]


def test_without_a_threshold_the_ledgers_low_balance_events_fire_the_rule() -> None:
    rules = {"acme": [rule()]}
    out = decide([balance(1, 5), balance(2, 4, kind="LOW_BALANCE")], rules, EMPTY, T0)
    assert [n.source_event_id for n in out.notifications] == ["ev-2"]


def test_rules_get_only_the_types_they_want_and_disabled_rules_nothing() -> None:
    budget = SourceEvent("metering", "m-1", 1, "acme", "BUDGET_THRESHOLD", T0,
                         attributes={"budget_id": "b1", "threshold_percent": "80"})
    rules = {"acme": [rule("low"), rule("budgets", NotificationType.BUDGET_THRESHOLD),
                      rule("off", NotificationType.BUDGET_THRESHOLD, enabled=False)],
             "globex": [rule("other", NotificationType.BUDGET_THRESHOLD)]}
    out = decide([budget], rules, EMPTY, T0)
    assert [(n.rule_id, n.type) for n in out.notifications] == [
        ("budgets", NotificationType.BUDGET_THRESHOLD)]
    assert out.notifications[0].title == "Budget b1 reached 80 %"


def test_an_event_and_a_rule_make_one_stable_notification_id() -> None:
    rules = {"acme": [rule(threshold=100 * CREDIT)]}
    once = decide([balance(1, 90)], rules, EMPTY, T0).notifications
    again = decide([balance(1, 90)], rules, EMPTY, T0).notifications
    assert once[0].notification_id == again[0].notification_id == notification_id("ev-1", "r1")
    assert notification_id("ev-1", "r2") != notification_id("ev-1", "r1")


def test_retries_back_off_exponentially_with_jitter_then_dead_letter() -> None:
    rng = random.Random(7)
    first = timedelta(seconds=1)
    waits = [retry_at(n, T0, rng, first) for n in range(1, MAX_ATTEMPTS)]
    assert all(w is not None for w in waits)
    delays = [(w - T0).total_seconds() for w in waits if w is not None]
    for attempt, delay in enumerate(delays, start=1):
        assert 0.5 <= delay <= min(2 ** (attempt - 1), 300)
    assert retry_at(MAX_ATTEMPTS, T0, rng, first) is None
    spread = {retry_at(5, T0, random.Random(seed), first) for seed in range(20)}
    assert len(spread) > 10  # jittered, not in lockstep
