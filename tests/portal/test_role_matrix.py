"""Every role × every page and every action, against the policy table itself: a page renders
(200) exactly when the table lets the role call the RPC behind it, its nav link shows exactly
then, and a form is accepted exactly when the table allows it — refused 403 with nothing
changed otherwise. API keys: a developer manages keys no stronger than their own."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit import policy
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.notifier.v1 import notifier_pb2 as npb
from tests.portal.support import ORG, PEOPLE, Suite, csrf_of, field_of, signed_in

BASE = f"/orgs/{ORG}"
_FULL = {"ledger": "/tally.ledger.v1.LedgerService/",
         "billing": "/tally.ledger.v1.BillingService/",
         "metering": "/tally.metering.v1.MeteringService/",
         "notifier": "/tally.notifier.v1.NotifierService/",
         "accounts": "/tally.accounts.v1.AccountsService/",
         "pricing": "/tally.pricing.v1.PricingService/"}


def allowed(role: str, *methods: str) -> bool:
    """Whether the policy table lets `role` call any of `methods` (`ledger.Purchase`)."""
    return any(role in policy.POLICY[_FULL[m.split(".")[0]] + m.split(".")[1]].roles
               for m in methods)


MONTH = datetime.now(UTC).strftime("%Y-%m")
PAGES: list[tuple[str, str, tuple[str, ...]]] = [
    # (page, the RPC it needs, the RPCs that put it in the nav; () = always in the nav)
    ("overview", "ledger.GetBalance", ()),
    ("usage", "metering.ExportUsage", ()),
    ("transactions", "ledger.ListTransactions", ()),
    ("budgets", "metering.ListBudgets", ()),
    ("alerts", "notifier.ListAlertRules", ()),
    ("invoices", "billing.ListInvoices", ("billing.ListInvoices",)),
    ("statements", "billing.ListStatements", ("billing.ListStatements",)),
    (f"statements/{MONTH}", "billing.GetStatement", ()),
    (f"statements/{MONTH}.pdf", "billing.DownloadStatementPdf", ()),
    ("credit", "pricing.ListCreditPackages", ("ledger.Purchase", "ledger.ListPaymentOrders")),
    ("top-up", "ledger.GetAutoTopUp", ("ledger.GetAutoTopUp",)),
    ("keys", "accounts.ListApiKeys", ("accounts.ListApiKeys",)),
    ("members", "accounts.ListMembers", ("accounts.ListMembers",)),
]


@pytest.mark.parametrize("role", list(PEOPLE))
async def test_each_page_renders_exactly_for_the_roles_the_policy_table_allows(
        suite: Suite, role: str) -> None:
    async with signed_in(suite, PEOPLE[role]) as http:
        overview = (await http.get(f"{BASE}/overview")).text
        for page, method, nav in PAGES:
            reply = await http.get(f"{BASE}/{page}")
            expected = 200 if allowed(role, method) else 403
            assert reply.status_code == expected, (role, page, reply.status_code)
            if expected == 403:
                assert "PERMISSION_DENIED" in reply.text, (role, page)
            if nav:
                assert (f'href="{BASE}/{page}"' in overview) == allowed(role, *nav), (role, page)


Form = Callable[[str, str], dict[str, Any]]
"""The fields of an action's form, given the page's HTML and the acting role."""


def _key_form(html: str, role: str) -> dict[str, Any]:
    return {"name": f"matrix {role}", "role": "gateway", "request_id": uuid.uuid4().hex}


def _buy_form(html: str, role: str) -> dict[str, Any]:
    order_id = (field_of(html, "order_id") if 'name="order_id"' in html
                else f"po-portal-{uuid.uuid4().hex}")
    return {"package_id": "individual-20", "order_id": order_id}


def _top_up_form(html: str, role: str) -> dict[str, Any]:
    return {"threshold": "10", "package_id": "individual-20", "max_per_day": "1",
            "payment_method_id": "pm_card_visa"}  # not enabled: nothing is bought


def _alert_form(html: str, role: str) -> dict[str, Any]:
    return {"types": ["low_balance"], "channel": "stream", "low_balance_threshold": "5",
            "cooldown_seconds": "60", "enabled": "on", "request_id": uuid.uuid4().hex}


def _invite_form(html: str, role: str) -> dict[str, Any]:
    return {"subject": f"invitee-of-{role}", "role": "viewer"}


ACTIONS: list[tuple[str, str, str, Form]] = [
    # (action, RPC, page whose form it is, path posted to)
    ("accounts.CreateApiKey", "keys", f"{BASE}/keys", _key_form),
    ("ledger.Purchase", "credit", f"{BASE}/credit", _buy_form),
    ("ledger.SetAutoTopUp", "top-up", f"{BASE}/top-up", _top_up_form),
    ("notifier.CreateAlertRule", "alerts", f"{BASE}/alerts", _alert_form),
    ("accounts.InviteMember", "members", f"{BASE}/members/invite", _invite_form),
]


async def _state(suite: Suite) -> tuple[Any, ...]:
    """Everything the actions could change."""
    t = suite.tally
    keys = (await t.accounts.ListApiKeys(apb.ListApiKeysRequest(org_id=ORG, page_size=500)))
    orders = await t.ledger.ListPaymentOrders(lpb.ListPaymentOrdersRequest(org_id=ORG,
                                                                            page_size=500))
    members = await t.accounts.ListMembers(apb.ListMembersRequest(org_id=ORG, page_size=500))
    rules = await t.notifier.ListAlertRules(npb.ListAlertRulesRequest(org_id=ORG))
    top_up = await t.ledger.GetAutoTopUp(lpb.GetAutoTopUpRequest(org_id=ORG))
    return (sorted(k.key_id for k in keys.keys), sorted(o.payment_order_id for o in orders.orders),
            sorted((m.subject, m.role) for m in members.members),
            sorted(r.rule_id for r in rules.rules), top_up.SerializeToString())


@pytest.mark.parametrize("role", list(PEOPLE))
async def test_each_action_is_accepted_exactly_for_the_roles_the_policy_table_allows(
        suite: Suite, role: str) -> None:
    async with signed_in(suite, PEOPLE[role]) as http:
        token = csrf_of((await http.get(f"{BASE}/overview")).text)
        for method, page, path, form in ACTIONS:
            page_reply = await http.get(f"{BASE}/{page}")
            fields = form(page_reply.text, role)
            before = await _state(suite)
            reply = await http.post(path, data={"csrf_token": token, **fields})
            if allowed(role, method):
                assert reply.status_code in (201, 303), (role, method, reply.text[-500:])
                assert await _state(suite) != before or method == "ledger.SetAutoTopUp", (
                    role, method)
            else:
                assert reply.status_code == 403, (role, method, reply.status_code)
                assert "PERMISSION_DENIED" in reply.text, (role, method)
                assert await _state(suite) == before, (role, method)


async def _form_page(http: httpx.AsyncClient, path: str) -> str:
    reply = await http.get(path)
    assert reply.status_code == 200, (path, reply.text[-400:])
    return reply.text


async def test_only_the_owner_changes_roles_and_removes_members(suite: Suite) -> None:
    target = "matrix-target"
    async with signed_in(suite, PEOPLE["owner"]) as owner:
        token = csrf_of(await _form_page(owner, f"{BASE}/members"))
        invited = await owner.post(f"{BASE}/members/invite", data={
            "csrf_token": token, "subject": target, "role": "viewer"})
        assert invited.status_code == 303
    for role in ("admin", "billing", "developer", "viewer"):
        async with signed_in(suite, PEOPLE[role]) as http:
            token = csrf_of((await http.get(f"{BASE}/overview")).text)
            before = await _state(suite)
            for path, fields in ((f"{BASE}/members/role", {"subject": target, "role": "admin"}),
                                 (f"{BASE}/members/remove", {"subject": target})):
                reply = await http.post(path, data={"csrf_token": token, **fields})
                assert reply.status_code == 403, (role, path)
            assert await _state(suite) == before
    async with signed_in(suite, PEOPLE["owner"]) as owner:
        page = await _form_page(owner, f"{BASE}/members")
        assert 'id="invite-member"' in page and "paid seats used" in page
        token = csrf_of(page)
        changed = await owner.post(f"{BASE}/members/role", data={
            "csrf_token": token, "subject": target, "role": "developer"})
        assert changed.status_code == 303
        members = await suite.tally.accounts.ListMembers(apb.ListMembersRequest(org_id=ORG))
        assert (target, apb.ROLE_DEVELOPER) in {(m.subject, m.role) for m in members.members}
        removed = await owner.post(f"{BASE}/members/remove", data={
            "csrf_token": token, "subject": target})
        assert removed.status_code == 303
        members = await suite.tally.accounts.ListMembers(apb.ListMembersRequest(org_id=ORG))
        assert target not in {m.subject for m in members.members}


async def test_a_developer_manages_weaker_keys_and_the_portal_refuses_stronger_ones(
        suite: Suite) -> None:
    async with signed_in(suite, PEOPLE["owner"]) as owner:
        page = await _form_page(owner, f"{BASE}/keys")
        assert 'value="admin"' in page and 'value="billing"' in page
        made = await owner.post(f"{BASE}/keys", data={
            "csrf_token": csrf_of(page), "name": "strong", "role": "admin",
            "request_id": uuid.uuid4().hex})
        assert made.status_code == 201
        strong = field_of(made.text, "key_id") if 'name="key_id"' in made.text else None
    keys = (await suite.tally.accounts.ListApiKeys(apb.ListApiKeysRequest(
        org_id=ORG, page_size=500))).keys
    strong_id = strong or next(k.key_id for k in keys if k.name == "strong")
    async with signed_in(suite, PEOPLE["developer"]) as dev:
        page = await _form_page(dev, f"{BASE}/keys")
        assert 'id="create-key"' in page
        assert 'value="admin"' not in page and 'value="billing"' not in page
        assert f"/keys/{strong_id}/revoke" not in page and f"/keys/{strong_id}/rotate" not in page
        token = csrf_of(page)
        before = await _state(suite)
        for path, fields in ((f"{BASE}/keys", {"name": "up", "role": "admin"}),
                             (f"{BASE}/keys", {"name": "up", "role": "billing"}),
                             (f"{BASE}/keys/{strong_id}/rotate", {}),
                             (f"{BASE}/keys/{strong_id}/revoke", {})):
            reply = await dev.post(path, data={"csrf_token": token, **fields})
            assert reply.status_code == 403, (path, reply.status_code)
            assert "stronger than your role" in reply.text, path
        assert await _state(suite) == before
        mine = await dev.post(f"{BASE}/keys", data={
            "csrf_token": token, "name": "dev key", "role": "developer",
            "request_id": uuid.uuid4().hex})
        assert mine.status_code == 201 and 'id="new-secret">tly_' in mine.text
        key_id = next(k.key_id for k in (await suite.tally.accounts.ListApiKeys(
            apb.ListApiKeysRequest(org_id=ORG, page_size=500))).keys if k.name == "dev key")
        revoked = await dev.post(f"{BASE}/keys/{key_id}/revoke", data={"csrf_token": token})
        assert revoked.status_code == 303
