"""Billing profiles: tax ids checked per country, CRUD over gRPC, and purchases refused while
an org that requires a profile lacks a complete one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.ledger.billing import domain as b
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import billing_pb2 as bpb
from tests.ledger.payments_support import GOOD_CARD, PACKAGE_CREDITS, Shop, open_shop

CONTEXT = common_pb2.RequestContext(actor="user:finance")


@pytest.mark.parametrize(("country", "tax_id"), [
    ("DE", "DE123456789"), ("FR", "FRXX123456789"), ("GR", "EL123456789"),
    ("NL", "NL123456789B01"), ("AT", "ATU12345678"), ("IE", "IE1234567WA"),
    ("GB", "GB123456789"), ("GB", "GBGD001"), ("US", "12-3456789"), ("US", "123456789"),
    ("CH", "CHE-116.281.710"), ("CH", "CHE-116.281.710 MWST"), ("NO", "NO923609016MVA"),
    ("NO", "923609016"), ("AU", "51824753556"), ("JP", "T1234567890123"),
])
def test_a_tax_id_in_its_countrys_format_is_accepted(country: str, tax_id: str) -> None:
    assert b.tax_id_problem(country, b.normalize_tax_id(tax_id)) is None


@pytest.mark.parametrize(("country", "tax_id", "why"), [
    ("DE", "123456789", "starts with DE"),
    ("DE", "DE12345678", "DE VAT number"),
    ("GR", "GR123456789", "starts with EL"),
    ("NL", "NL123456789A01", "NL VAT number"),
    ("GB", "GB12345", "GB VAT number"),
    ("US", "1234-5678", "NN-NNNNNNN"),
    ("US", "00-1234567", "not an EIN prefix"),
    ("CH", "CHE-116.281.711", "check digit"),
    ("CH", "123456789", "CHE-NNN"),
    ("NO", "923609017", "check digit"),
    ("AU", "51824753557", "mod 89"),
    ("AU", "5182475355", "11 digits"),
    ("JP", "T1234<>", "letters, digits"),
])
def test_a_malformed_tax_id_is_refused_with_the_reason(country: str, tax_id: str,
                                                       why: str) -> None:
    problem = b.tax_id_problem(country, b.normalize_tax_id(tax_id))
    assert problem is not None and why in problem


def test_missing_fields_lists_what_a_purchase_needs() -> None:
    assert b.missing_fields(None) == list(b.REQUIRED_FIELDS)
    draft = b.BillingProfile("acme", legal_name="Acme GmbH", country="DE")
    assert b.missing_fields(draft) == ["address.line1", "address.city", "invoice_email",
                                       "currency"]


def complete_profile(org: str = "acme", **changes: object) -> bpb.BillingProfile:
    profile = bpb.BillingProfile(
        org_id=org, legal_name="Acme GmbH",
        address=bpb.BillingAddress(line1="Invalidenstraße 1", city="Berlin",
                                   postal_code="10115"),
        country="DE", tax_id="de 123 456 789", invoice_email="ap@acme.example",
        currency="eur")
    for name, value in changes.items():
        setattr(profile, name, value)
    return profile


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def set_profile(shop: Shop, request_id: str, profile: bpb.BillingProfile
                      ) -> bpb.BillingProfile:
    return (await shop.tally.billing.SetBillingProfile(bpb.SetBillingProfileRequest(
        request_id=request_id, context=CONTEXT, profile=profile))).profile


async def require_profile(shop: Shop, org: str = "acme") -> None:
    await shop.tally.billing.SetBillingSettings(bpb.SetBillingSettingsRequest(
        request_id=f"settings-{org}", context=CONTEXT,
        settings=bpb.BillingSettings(org_id=org, profile_required=True)))


async def test_a_profile_is_created_read_replaced_and_deleted(shop: Shop) -> None:
    stored = await set_profile(shop, "p1", complete_profile())
    assert (stored.tax_id, stored.currency, stored.updated_by) == ("DE123456789", "EUR",
                                                                   "user:finance")
    assert list(stored.missing_fields) == []
    read = (await shop.tally.billing.GetBillingProfile(
        bpb.GetBillingProfileRequest(org_id="acme"))).profile
    assert read == stored
    assert await set_profile(shop, "p1", complete_profile()) == stored  # a replay
    replaced = await set_profile(shop, "p2", complete_profile(legal_name="Acme AG"))
    assert replaced.legal_name == "Acme AG"
    await shop.tally.billing.DeleteBillingProfile(bpb.DeleteBillingProfileRequest(
        request_id="d1", context=CONTEXT, org_id="acme"))
    with pytest.raises(TallyError) as caught:
        await shop.tally.billing.GetBillingProfile(bpb.GetBillingProfileRequest(org_id="acme"))
    assert caught.value.reason is Reason.NOT_FOUND


async def test_a_request_id_reused_for_another_profile_is_refused(shop: Shop) -> None:
    await set_profile(shop, "p1", complete_profile())
    with pytest.raises(TallyError) as caught:
        await set_profile(shop, "p1", complete_profile(legal_name="Someone else"))
    assert caught.value.reason is Reason.IDEMPOTENCY_KEY_REUSED


@pytest.mark.parametrize(("changes", "field", "why"), [
    ({"tax_id": "DE12"}, "profile.tax_id", "DE VAT number"),
    ({"country": "XX"}, "profile.country", "ISO 3166-1"),
    ({"country": "US", "tax_id": "00-1234567"}, "profile.tax_id", "EIN prefix"),
    ({"invoice_email": "not-an-address"}, "profile.invoice_email", "e-mail"),
    ({"currency": "euro"}, "profile.currency", "ISO 4217"),
    ({"org_id": ""}, "profile.org_id", "required"),
])
async def test_a_bad_profile_names_its_field_and_writes_nothing(
        shop: Shop, changes: dict[str, object], field: str, why: str) -> None:
    with pytest.raises(TallyError) as caught:
        await set_profile(shop, "bad", complete_profile(**changes))
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == [field]
    assert why in caught.value.violations[0].description
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.billing_profiles") == 0
    assert await shop.db.fetchval(
        "SELECT count(*) FROM ledger.idempotency_keys WHERE key LIKE 'billing-%'") == 0


async def test_deleting_a_missing_profile_is_not_found_and_writes_nothing(shop: Shop) -> None:
    with pytest.raises(TallyError) as caught:
        await shop.tally.billing.DeleteBillingProfile(bpb.DeleteBillingProfileRequest(
            request_id="d1", context=CONTEXT, org_id="nobody"))
    assert (caught.value.reason, caught.value.field) == (Reason.NOT_FOUND, "org_id")
    assert await shop.db.fetchval(
        "SELECT count(*) FROM ledger.idempotency_keys WHERE key LIKE 'billing-%'") == 0


async def test_by_default_a_purchase_needs_no_profile(shop: Shop) -> None:
    settings = (await shop.tally.billing.GetBillingSettings(
        bpb.GetBillingSettingsRequest(org_id="acme"))).settings
    assert not settings.profile_required
    order = await shop.purchase("po-1")
    assert await shop.pay(order, GOOD_CARD) == 303
    assert (await shop.balance()).posted_micros >= PACKAGE_CREDITS


async def test_an_org_requiring_a_profile_cannot_buy_until_it_is_complete(shop: Shop) -> None:
    await require_profile(shop)
    with pytest.raises(TallyError) as caught:
        await shop.purchase("po-1")
    assert caught.value.reason is Reason.BILLING_PROFILE_INCOMPLETE
    assert caught.value.metadata["missing_fields"] == ",".join(b.REQUIRED_FIELDS)
    draft = complete_profile(invoice_email="")
    draft.address.city = ""
    await set_profile(shop, "draft", draft)
    with pytest.raises(TallyError) as caught:
        await shop.purchase("po-1")
    assert caught.value.metadata["missing_fields"] == "address.city,invoice_email"
    assert "address.city, invoice_email" in str(caught.value)
    assert await shop.db.fetchval("SELECT count(*) FROM ledger.payment_orders") == 0
    await set_profile(shop, "full", complete_profile())
    order = await shop.purchase("po-1")
    assert order.payment_order_id == "po-1"
