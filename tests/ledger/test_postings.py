"""The postings rules of usage debits per org, without a database: what a plan debits, owes,
burns, captures and chains."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.ledger import domain as d
from services.ledger import postings as p
from tally.kit.errors import Reason, TallyError
from tally.kit.money import INT64_MAX

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
STAMP = p.Stamp(NOW, "svc:metering")


def grant(org: str, grant_id: str, remaining: int, *, expires_in_days: int | None = None,
          kind: d.GrantKind = d.GrantKind.PURCHASED) -> d.Grant:
    expires = NOW + timedelta(days=expires_in_days) if expires_in_days is not None else None
    return d.Grant(grant_id, org, kind, d.DEFAULT_PRIORITY[kind], remaining, remaining,
                   expires, f"fund:{grant_id}", NOW - timedelta(days=1))


def position(org: str, *grants: d.Grant, held: int = 0, owed: int = 0,
             state: d.BillingState = d.BillingState.ACTIVE) -> p.OrgPosition:
    posted = sum(g.remaining_micros for g in grants)
    return p.OrgPosition(org, posted, held, owed, state, False, "", list(grants))


def test_an_org_debit_is_one_transfer_and_the_credit_it_leaves() -> None:
    acme = position("acme", grant("acme", "g1", 1_000))
    plan = p.plan_usage({"acme": acme}, {}, [("b1", [d.OrgUsageDebit("acme", 300, 3)])],
                        STAMP)
    (result,) = plan.results[0]
    assert result == d.OrgUsageResult("acme", "usage:b1:acme", "", 300, 0, 1_000, 700)
    (entry,) = plan.entries
    assert entry[:6] == ("usage:b1:acme", "USAGE", "org:acme",
                         d.system_account(d.AccountKind.REVENUE, "acme"), "acme", 300)
    assert plan.revenue_micros == {d.system_account(d.AccountKind.REVENUE, "acme"): 300}
    assert acme.posted_micros == 700 and acme.grants[0].remaining_micros == 700
    assert [(o, k) for o, k, _ in plan.outbox] == [("acme", d.OutboxEventType.BALANCE_CHANGED)]


def test_what_credit_does_not_cover_becomes_arrears_and_read_only() -> None:
    acme = position("acme", grant("acme", "g1", 100))
    plan = p.plan_usage({"acme": acme}, {}, [("b1", [d.OrgUsageDebit("acme", 250, 2)])],
                        STAMP)
    (result,) = plan.results[0]
    assert (result.debited_micros, result.arrears_micros, result.balance_after_micros) == (
        100, 150, 0)
    assert result.arrears_transfer_id == "usage:b1:acme:arrears"
    assert [e[0] for e in plan.entries] == ["usage:b1:acme", "usage:b1:acme:arrears"]
    assert acme.owed_micros == 150 and acme.billing_state is d.BillingState.READ_ONLY
    assert plan.state_changes == [("acme", d.BillingState.ACTIVE, d.BillingState.READ_ONLY,
                                   d.automatic_billing_state(0, 150)[1])]
    assert {k for _, k, _ in plan.outbox} == {
        d.OutboxEventType.ARREARS_RECORDED, d.OutboxEventType.BILLING_STATE_CHANGED,
        d.OutboxEventType.BALANCE_CHANGED}


def test_grants_burn_soonest_expiring_promotion_first() -> None:
    acme = position("acme", grant("acme", "bought", 500),
                    grant("acme", "promo", 200, expires_in_days=3,
                          kind=d.GrantKind.PROMOTIONAL))
    plan = p.plan_usage({"acme": acme}, {}, [("b1", [d.OrgUsageDebit("acme", 300, 1)])],
                        STAMP)
    assert {g.grant_id: g.remaining_micros for g in plan.burned.values()} == {
        "promo": 0, "bought": 400}


def test_the_chain_is_hashed_once_per_transfer_and_continues_across_batches() -> None:
    acme = position("acme", grant("acme", "g1", 1_000))
    plan = p.plan_usage({"acme": acme}, {}, [("b1", [d.OrgUsageDebit("acme", 10, 1)]),
                                             ("b2", [d.OrgUsageDebit("acme", 20, 1)])], STAMP)
    first, second = plan.entries
    assert first[16] == "" and second[16] == first[17]  # prev_hash, entry_hash
    assert second[17] == d.chain_hash(first[17], d.canonical_entry(
        "usage:b2:acme", "USAGE", "org:acme", d.system_account(d.AccountKind.REVENUE, "acme"),
        "acme", 20, "svc:metering", "", NOW, trace_id="", user_id="", labels={}, grant_id="",
        reservation_id="", reverses_transfer_id="", payment_order_id="",
        org_posted_after=second[18], org_held_after=second[19], org_arrears_after=second[20]))
    assert second[21] == d.HASH_VERSION
    assert acme.last_hash == second[17]


def test_captured_holds_are_freed_before_the_debit_and_share_its_arrears_in_order() -> None:
    # 100 posted, 60 held by r1 (settled by the batch's second event, cost 50): after freeing
    # it 100 is available; events cost 70 then 50 -> the second pays 30 and owes 20
    acme = position("acme", grant("acme", "g1", 100), held=60)
    holds = {"r1": p.Hold("r1", "acme", 60), "other": p.Hold("other", "globex", 5)}
    debit = d.OrgUsageDebit("acme", 120, 2, "", [
        d.UsageCapture("r1", 50, cost_before_micros=70),
        d.UsageCapture("other", 0, cost_before_micros=0)])  # another org's: ignored
    plan = p.plan_usage({"acme": acme}, holds, [("b1", [debit])], STAMP)
    (result,) = plan.results[0]
    assert (result.available_before_micros, result.debited_micros, result.arrears_micros) == (
        100, 100, 20)
    assert acme.held_micros == 0
    assert plan.captures == [("r1", "acme", 50, 20, "usage:b1:acme")]


def test_an_empty_debit_moves_nothing() -> None:
    acme = position("acme", grant("acme", "g1", 100))
    plan = p.plan_usage({"acme": acme}, {}, [("b1", [d.OrgUsageDebit("acme", 0, 4)])], STAMP)
    assert plan.results[0] == [d.OrgUsageResult("acme", "", "", 0, 0, 100, 100)]
    assert not plan.entries and not plan.outbox and not plan.revenue_micros


def test_arrears_past_int64_are_refused() -> None:
    acme = position("acme", owed=INT64_MAX - 5)
    with pytest.raises(TallyError) as refused:
        p.plan_usage({"acme": acme}, {}, [("b1", [d.OrgUsageDebit("acme", 10, 1)])], STAMP)
    assert refused.value.reason is Reason.INVALID_ARGUMENT


def test_org_debits_name_the_field_that_is_wrong() -> None:
    with pytest.raises(TallyError) as refused:
        d.validate_org_debits("b1", [
            d.OrgUsageDebit("acme", 10, 1),
            d.OrgUsageDebit("acme", -1, 0, "", [d.UsageCapture("r", 20)])])
    fields = {v.field for v in refused.value.violations}
    assert {"org_debits[1].org_id", "org_debits[1].amount_micros",
            "org_debits[1].event_count", "org_debits[1].captures[0].cost_micros"} <= fields
