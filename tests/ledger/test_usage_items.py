"""A statement's usage breakdown is used only when it is consistent with the ledger's debits:
metering's events equal each batch's debit, and meter, model and project each add up to the
itemized total (labels need not: an event counts under each label it carries)."""

from __future__ import annotations

from services.ledger.billing import statements as st

LEDGER = [st.BatchCharge("b1", 70), st.BatchCharge("b2", 30)]


def rows(meter: int = 100, model: int = 100, project: int = 100) -> list[st.UsageRow]:
    return [st.UsageRow("meter", "input_tokens", meter - 10, 5),
            st.UsageRow("meter", "output_tokens", 10, 5),
            st.UsageRow("model", "gpt", model, 5),
            st.UsageRow("project", "", project, 5),
            st.UsageRow("label", "team=a", 80, 4), st.UsageRow("label", "env=prod", 90, 4)]


def test_a_breakdown_that_agrees_batch_by_batch_and_adds_up_is_the_statements() -> None:
    metering = st.BatchUsage([st.BatchCharge("b2", 30, 2), st.BatchCharge("b1", 70, 3)],
                             rows())
    items = st.usage_items(LEDGER, metering)
    assert items is not None and items.itemized_micros == 100
    assert items.rows == rows()


def test_a_batch_metering_charged_differently_or_never_saw_is_named() -> None:
    assert st.batch_mismatches(LEDGER, [st.BatchCharge("b1", 71)]) == [
        ("b1", 70, 71), ("b2", 30, None)]
    assert st.usage_items(LEDGER, st.BatchUsage([st.BatchCharge("b1", 71),
                                                 st.BatchCharge("b2", 30)], rows())) is None


def test_a_dimension_that_does_not_add_up_to_the_debits_is_not_shown() -> None:
    charges = [st.BatchCharge("b1", 70), st.BatchCharge("b2", 30)]
    for bad in (rows(meter=99), rows(model=101), rows(project=0)):
        assert st.usage_items(LEDGER, st.BatchUsage(charges, bad)) is None
