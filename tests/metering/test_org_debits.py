"""A batch's ledger debit is one per org; each event's receipt is its share of it, split in
the batch's order exactly as the ledger splits the org's credit."""

from __future__ import annotations

import hashlib

from services.metering.ingestion import domain as ing


def test_a_batch_is_one_debit_per_org_with_each_events_place_in_it() -> None:
    debits, before = ing.org_debits([
        ("acme", "e1", 100, ""), ("globex", "e2", 7, "r9"), ("acme", "e3", 50, "r1"),
        ("acme", "e4", 0, "")])
    assert before == [0, 0, 100, 150]
    acme, globex = debits
    assert (acme.org_id, acme.amount_micros, acme.event_count) == ("acme", 150, 3)
    assert acme.events_digest == hashlib.sha256(b"e1\ne3\ne4").hexdigest()
    assert acme.captures == (ing.Capture("r1", 50, 100),)
    assert globex.captures == (ing.Capture("r9", 7, 0),)


def test_receipts_split_the_org_debit_in_order_and_owe_what_credit_does_not_cover() -> None:
    outcome = ing.OrgOutcome("acme", "usage:b:acme", "usage:b:acme:arrears", 120)
    # events of 100, 50, 0 against 120 available
    assert ing.receipt_share(outcome, 0, 100) == ("usage:b:acme", 20, 0)
    assert ing.receipt_share(outcome, 100, 50) == ("usage:b:acme", 0, 30)
    assert ing.receipt_share(outcome, 150, 0) == ("", 0, 0)
    broke = ing.OrgOutcome("acme", "", "usage:b:acme:arrears", 0)
    assert ing.receipt_share(broke, 0, 10) == ("usage:b:acme:arrears", 0, 10)
