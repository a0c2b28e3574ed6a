"""The plain-Python rules behind Authorize's single statement: a budget's cap for a plain
ALLOW is judge_budgets' rule exactly, and a lease is sized from the org's recent spend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.metering.policies import Budget, BudgetEnforcement, BudgetPeriod, BudgetScope
from services.metering.spend import domain as az
from services.metering.spend.lease import LeaseSettings, Sizing

START = datetime(2026, 12, 1, tzinfo=UTC)
S = 1_000_000_000  # nanoseconds


@given(limit=st.integers(0, 10**12), percent=st.integers(0, 100),
       enforcement=st.sampled_from(list(BudgetEnforcement)),
       committed=st.integers(0, 2 * 10**12), cost=st.integers(0, 10**9))
def test_the_single_statements_cap_is_exactly_a_plain_allow_of_judge_budgets(
        limit: int, percent: int, enforcement: BudgetEnforcement, committed: int,
        cost: int) -> None:
    budget = Budget("b", "o", "b", BudgetScope.ORG, "", BudgetPeriod.MONTHLY, limit,
                    enforcement, downgrade_at_percent=percent)
    verdict = az.judge_budgets([az.BudgetState(budget, START, committed, 0)], cost)
    plain_allow = verdict.allowed and not verdict.downgrade
    assert plain_allow == (committed + cost <= az.allow_cap(budget))


def test_a_lease_holds_its_window_of_recent_spend_between_floor_and_cap() -> None:
    settings = LeaseSettings(window=timedelta(seconds=10), floor_micros=1_000,
                             cap_micros=1_000_000)
    sizing = Sizing(settings)
    assert sizing.target("quiet") == 1_000  # no spend yet: the floor
    for second in range(1, 200):
        sizing.spent("busy", 500, second * S)  # 500 micro-credits a second
    assert sizing.target("busy") == 5_000  # exactly 10 s of it
    assert sizing.rates["busy"].micros_per_second(199 * S) == 500
    for second in range(200, 400):
        sizing.spent("busy", 10**7, second * S)
    assert sizing.target("busy") == 1_000_000  # never more than the cap
    # what to ask for: enough for the request now and the target free after it
    assert sizing.to_add(free_micros=200, needed=300, org_id="quiet") == 1_100
    assert sizing.to_add(free_micros=5_000, needed=300, org_id="quiet") == 0


@given(holds=st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 40 * S)), max_size=60),
       window_s=st.integers(1, 30))
def test_the_burn_rate_is_integer_micro_credits_summed_exactly_over_its_window(
        holds: list[tuple[int, int]], window_s: int) -> None:
    """No float near money: the target is the exact integer sum of what was held in the last
    `window_s` whole seconds, and the rate its integer share per second."""
    settings = LeaseSettings(window=timedelta(seconds=window_s), floor_micros=0,
                             cap_micros=2**63 - 1)
    sizing = Sizing(settings)
    ordered = sorted(holds, key=lambda h: h[1])
    for micros, at in ordered:
        sizing.spent("org", micros, at)
    now = ordered[-1][1] if ordered else 0
    expected = sum(m for m, at in ordered if at // S > now // S - window_s)
    target = sizing.target("org", now)
    assert type(target) is int and target == expected
    if ordered:
        rate = sizing.rates["org"].micros_per_second(now)
        assert type(rate) is int and rate == expected // window_s
    # below a quarter of the target is low (integer percent, no float)
    if target >= 4:
        assert sizing.is_low("org", target // 4 - 1, now)
        assert not sizing.is_low("org", target // 4 + 1, now)
