"""The pages the first portal lacked: monthly statements (with PDF), alert-rule editing,
and custom-amount purchases (within limits, idempotent on the form's order id)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import httpx

from tally.kit.money import MICROS_PER_CREDIT
from tally.ledger.v1 import billing_pb2 as bpb
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.notifier.v1 import notifier_pb2 as npb
from tests.ledger.payments_support import EXPIRY, GOOD_CARD
from tests.portal.support import ORG, PEOPLE, Suite, csrf_of, field_of, signed_in

BASE = f"/orgs/{ORG}"


async def _page(http: httpx.AsyncClient, path: str) -> str:
    reply = await http.get(path)
    assert reply.status_code == 200, (path, reply.status_code, reply.text[-400:])
    return reply.text


async def test_the_statement_page_shows_the_ledgers_statement_and_its_pdf(
        suite: Suite) -> None:
    month = datetime.now(UTC).strftime("%Y-%m")
    statement = (await suite.tally.billing.GetStatement(bpb.GetStatementRequest(
        org_id=ORG, month=month))).statement
    assert statement.closing_balance_micros > 0
    async with signed_in(suite, PEOPLE["billing"]) as http:
        listing = await _page(http, f"{BASE}/statements")
        assert f'href="{BASE}/statements/{month}"' in listing and "so far" in listing
        page = await _page(http, f"{BASE}/statements/{month}")
        closing = statement.closing_balance_micros // MICROS_PER_CREDIT
        assert f'id="closing">{closing:,}' in page
        assert "Opening balance" in page and "Download PDF" in page
        pdf = await http.get(f"{BASE}/statements/{month}.pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        assert pdf.headers["content-type"] == "application/pdf"
        bad = await http.get(f"{BASE}/statements/2026-13")
        assert bad.status_code == 400 and "month: must be YYYY-MM" in bad.text


async def _rules(suite: Suite) -> dict[str, npb.AlertRule]:
    reply = await suite.tally.notifier.ListAlertRules(npb.ListAlertRulesRequest(org_id=ORG))
    return {r.rule_id: r for r in reply.rules}


async def test_a_billing_admin_creates_edits_and_deletes_an_alert_rule(suite: Suite) -> None:
    before = await _rules(suite)
    async with signed_in(suite, PEOPLE["billing"]) as http:
        page = await _page(http, f"{BASE}/alerts")
        token = csrf_of(page)
        made = await http.post(f"{BASE}/alerts", data={
            "csrf_token": token, "request_id": field_of(page, "request_id"),
            "types": ["low_balance"], "channel": "webhook",
            "webhook_url": "https://hooks.example/tally", "low_balance_threshold": "12.5",
            "cooldown_seconds": "300", "enabled": "on"})
        assert made.status_code == 303, made.text[-400:]
        new = [r for r in (await _rules(suite)).values() if r.rule_id not in before]
        assert len(new) == 1
        rule = new[0]
        assert rule.channel == npb.CHANNEL_WEBHOOK and rule.enabled
        assert rule.low_balance_threshold_micros == 12_500_000 and rule.cooldown_seconds == 300
        page = await _page(http, f"{BASE}/alerts")
        assert f'id="edit-{rule.rule_id}"' in page and 'value="12.5"' in page
        edited = await http.post(f"{BASE}/alerts/{rule.rule_id}", data={
            "csrf_token": token, "request_id": uuid.uuid4().hex,
            "types": ["low_balance", "payment_failed"], "channel": "webhook",
            "webhook_url": "https://hooks.example/tally", "low_balance_threshold": "3",
            "cooldown_seconds": "0"})  # "enabled" unchecked
        assert edited.status_code == 303, edited.text[-400:]
        rule = (await _rules(suite))[rule.rule_id]
        assert not rule.enabled and rule.low_balance_threshold_micros == 3_000_000
        assert set(rule.types) == {npb.NOTIFICATION_TYPE_LOW_BALANCE,
                                   npb.NOTIFICATION_TYPE_PAYMENT_FAILED}
        bad = await http.post(f"{BASE}/alerts/{rule.rule_id}", data={
            "csrf_token": token, "types": ["no_such_type"], "channel": "webhook"})
        assert bad.status_code == 400 and "types: unknown notification type" in bad.text
        assert (await _rules(suite))[rule.rule_id] == rule
        deleted = await http.post(f"{BASE}/alerts/{rule.rule_id}/delete", data={
            "csrf_token": token, "request_id": uuid.uuid4().hex})
        assert deleted.status_code == 303
        assert rule.rule_id not in await _rules(suite)
    async with signed_in(suite, PEOPLE["viewer"]) as viewer:
        page = await _page(viewer, f"{BASE}/alerts")
        assert 'id="new-alert"' not in page and "Save rule" not in page
        some_rule = next(iter(before))
        for path in (f"{BASE}/alerts/{some_rule}", f"{BASE}/alerts/{some_rule}/delete"):
            forged = await viewer.post(path, data={"csrf_token": csrf_of(page),
                                                   "types": ["low_balance"],
                                                   "channel": "stream"})
            assert forged.status_code == 403, path
        assert await _rules(suite) == before


async def test_a_custom_amount_is_bought_once_per_form_and_credited_after_checkout(
        suite: Suite) -> None:
    before = await suite.balance()
    async with signed_in(suite, PEOPLE["billing"]) as http:
        page = await _page(http, f"{BASE}/credit")
        assert 'id="buy-custom"' in page and "USD 5.00" in page
        form = {"csrf_token": csrf_of(page), "order_id": field_of(page, "order_id"),
                "amount": "25.50", "currency": "USD"}
        first = await http.post(f"{BASE}/credit", data=form)
        again = await http.post(f"{BASE}/credit", data=form)
        assert first.status_code == again.status_code == 303
        assert first.headers["location"] == again.headers["location"]
        changed = await http.post(f"{BASE}/credit", data={**form, "amount": "30"})
        assert changed.status_code == 409 and "IDEMPOTENCY_KEY_REUSED" in changed.text
        order = (await suite.tally.ledger.GetPaymentOrder(lpb.GetPaymentOrderRequest(
            org_id=ORG, payment_order_id=form["order_id"]))).order
        assert order.amount_minor == 2550 and order.currency == "USD"
        assert order.credits_micros == 2550 * MICROS_PER_CREDIT and not order.package_id
        async with httpx.AsyncClient() as customer:
            paid = await customer.post(f"{first.headers['location']}/pay", data={
                "card_number": GOOD_CARD, "expiry": EXPIRY, "cvc": "123", "name": "Bill"})
        assert paid.status_code == 303
        await suite.provider.settled()
        done = await _page(http, httpx.URL(paid.headers["location"]).path)
        assert 'id="order-state">SUCCEEDED' in done
    after = await suite.balance()
    assert after.available_micros - before.available_micros == 2550 * MICROS_PER_CREDIT


async def test_inviting_past_the_seat_limit_is_refused_with_the_reason_and_changes_nothing(
        suite: Suite) -> None:
    from tally.accounts.v1 import accounts_pb2 as apb
    from tests.portal.support import OTHER_ORG

    base = f"/orgs/{OTHER_ORG}"  # seat limit 3, its owner mallory holds one

    async def members() -> set[str]:
        reply = await suite.tally.accounts.ListMembers(apb.ListMembersRequest(org_id=OTHER_ORG))
        return {m.subject for m in reply.members}

    async with signed_in(suite, "mallory") as http:
        page = await _page(http, f"{base}/members")
        assert "1 of 3 paid seats used" in page
        token = csrf_of(page)
        for n in (1, 2):
            invited = await http.post(f"{base}/members/invite", data={
                "csrf_token": token, "subject": f"seat-{n}", "role": "developer"})
            assert invited.status_code == 303
        page = await _page(http, f"{base}/members?done=invited")
        assert "3 of 3 paid seats used" in page and "The seat limit is reached" in page
        before = await members()
        refused = await http.post(f"{base}/members/invite", data={
            "csrf_token": token, "subject": "seat-3", "role": "developer"})
        assert refused.status_code == 409 and "SEAT_LIMIT_REACHED" in refused.text
        assert await members() == before
        free = await http.post(f"{base}/members/invite", data={  # viewers take free seats
            "csrf_token": token, "subject": "seat-free", "role": "viewer"})
        assert free.status_code == 303 and "seat-free" in await members()
