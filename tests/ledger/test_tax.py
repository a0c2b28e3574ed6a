"""Tax snapshots: one test per rule, the rounding rule as a property (net + tax = gross for
every amount and rate, tax the nearest minor unit), and a stored snapshot that a later rate
table or profile change never alters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from services.ledger.billing import domain as b
from services.ledger.billing import tax
from tally.common.v1 import common_pb2
from tally.kit.errors import Reason, TallyError
from tally.kit.money import INT64_MAX
from tally.ledger.v1 import billing_pb2 as bpb
from tests.ledger.payments_support import PACKAGE_PRICE_MINOR, Shop, open_shop

ISSUER = tax.Issuer("Tally GmbH", "DE", "DE123456789")
TABLE = tax.TaxRateTable(1, {"DE": 190000, "FR": 200000, "AT": 200000, "US-NY": 88750,
                             "CH": 81000})
CONTEXT = common_pb2.RequestContext(actor="user:finance")


def customer(country: str, tax_id: str = "", region: str = "") -> b.BillingProfile:
    return b.BillingProfile("acme", "Acme", b.Address("1 Main St", "", "Town", "", region),
                            country, tax_id, "ap@acme.example", "EUR")


@pytest.mark.parametrize(("who", "rule", "jurisdiction", "rate", "legal"), [
    (customer("DE", "DE123456789"), tax.TaxRule.DOMESTIC, "DE", 190000, ""),
    (None, tax.TaxRule.DOMESTIC, "DE", 190000, ""),
    (customer("FR", "FRXX123456789"), tax.TaxRule.REVERSE_CHARGE, "FR", 0, "Reverse charge"),
    (customer("FR"), tax.TaxRule.EU_OSS, "FR", 200000, ""),
    (customer("AT", "ATX1234"), tax.TaxRule.EU_OSS, "AT", 200000, ""),  # bad VAT id: B2C
    (customer("CH", "CHE-116.281.710"), tax.TaxRule.EXPORT, "CH", 0, "Export"),
    (customer("JP"), tax.TaxRule.EXPORT, "JP", 0, "Export"),
    (customer("US", "12-3456789", "ny"), tax.TaxRule.US_SALES_TAX, "US-NY", 88750, ""),
    (customer("US", "12-3456789", "OR"), tax.TaxRule.EXPORT, "US", 0, "Export"),
])
def test_each_rule_picks_its_jurisdiction_rate_and_legal_text(
        who: b.BillingProfile | None, rule: tax.TaxRule, jurisdiction: str, rate: int,
        legal: str) -> None:
    taken = tax.snapshot(ISSUER, who, TABLE, 11_900, "EUR")
    assert (taken.rule, taken.jurisdiction, taken.rate_ppm) == (rule, jurisdiction, rate)
    assert taken.legal_text.startswith(legal)
    assert taken.net_minor + taken.tax_minor == 11_900


def test_domestic_vat_is_taken_out_of_the_gross_rounded_half_up() -> None:
    assert tax.split_gross(11_900, 190000) == (10_000, 1_900)
    assert tax.split_gross(2000, 190000) == (1681, 319)  # 319.33 -> 319
    assert tax.split_gross(1, 1_000_000) == (0, 1)  # exactly half rounds up
    assert tax.split_gross(0, 190000) == (0, 0)


@given(st.integers(min_value=0, max_value=INT64_MAX),
       st.integers(min_value=0, max_value=tax.MAX_RATE_PPM))
def test_net_plus_tax_is_gross_and_tax_is_the_nearest_minor_unit(gross: int, rate: int
                                                                ) -> None:
    net, tax_minor = tax.split_gross(gross, rate)
    assert net + tax_minor == gross
    assert 0 <= tax_minor <= gross
    exact = Fraction(gross * rate, tax.PPM + rate)
    assert -Fraction(1, 2) < tax_minor - exact <= Fraction(1, 2)


@given(st.integers(min_value=1, max_value=10**12),
       st.sampled_from(sorted(b.COUNTRIES)), st.booleans())
def test_every_snapshot_adds_up_whoever_the_customer_is(gross: int, country: str,
                                                        business: bool) -> None:
    who = customer(country, "X" if business else "")
    taken = tax.snapshot(ISSUER, who, TABLE, gross, "EUR")
    assert taken.net_minor + taken.tax_minor == taken.gross_minor == gross


def test_a_rate_table_names_a_bad_jurisdiction_or_rate() -> None:
    with pytest.raises(TallyError) as caught:
        tax.validate_rates({"XX": 100})
    assert caught.value.field == "rates[XX]"
    with pytest.raises(TallyError) as caught:
        tax.validate_rates({"DE": 1_000_001})
    assert caught.value.field == "rates[DE]"


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


async def snapshot_of(shop: Shop, order_id: str, org: str = "acme") -> bpb.TaxSnapshot:
    return (await shop.tally.billing.GetTaxSnapshot(bpb.GetTaxSnapshotRequest(
        org_id=org, payment_order_id=order_id))).tax


async def publish(shop: Shop, request_id: str, rates: dict[str, int],
                  effective_from: datetime | None = None) -> bpb.TaxRateTable:
    table = bpb.TaxRateTable(rates_ppm=rates)
    if effective_from is not None:
        stamp = Timestamp()
        stamp.FromDatetime(effective_from)
        table.effective_from.CopyFrom(stamp)
    return (await shop.tally.billing.PublishTaxRates(bpb.PublishTaxRatesRequest(
        request_id=request_id, context=CONTEXT, table=table))).table


async def test_an_order_keeps_its_snapshot_after_rates_and_profile_change(shop: Shop) -> None:
    await shop.tally.billing.SetBillingProfile(bpb.SetBillingProfileRequest(
        request_id="p1", context=CONTEXT, profile=bpb.BillingProfile(
            org_id="acme", country="FR", legal_name="Acme SAS")))
    await shop.purchase("po-1")
    before = await snapshot_of(shop, "po-1")
    assert (before.rule, before.jurisdiction, before.rate_ppm, before.rate_table_version) == (
        bpb.TAX_RULE_EU_OSS, "FR", 200000, 1)
    assert (before.gross_minor, before.net_minor + before.tax_minor) == (
        PACKAGE_PRICE_MINOR, PACKAGE_PRICE_MINOR)
    table = await publish(shop, "rates-2", {"DE": 190000, "FR": 210000})
    assert table.version == 2
    assert await publish(shop, "rates-2", {"DE": 190000, "FR": 210000}) == table  # replay
    await shop.tally.billing.SetBillingProfile(bpb.SetBillingProfileRequest(
        request_id="p2", context=CONTEXT, profile=bpb.BillingProfile(
            org_id="acme", country="FR", tax_id="FRXX123456789", legal_name="Acme SAS")))
    assert await snapshot_of(shop, "po-1") == before
    await shop.purchase("po-2")
    after = await snapshot_of(shop, "po-2")
    assert (after.rule, after.rate_ppm, after.rate_table_version) == (
        bpb.TAX_RULE_REVERSE_CHARGE, 0, 2)
    assert after.legal_text.startswith("Reverse charge")


async def test_rates_never_change_retroactively(shop: Shop) -> None:
    with pytest.raises(TallyError) as caught:
        await publish(shop, "rates-old", {"DE": 160000},
                      datetime.now(UTC) - timedelta(days=30))
    assert (caught.value.reason, caught.value.field) == (Reason.INVALID_ARGUMENT,
                                                          "effective_from")
    assert await shop.db.fetchval("SELECT max(version) FROM ledger.tax_rate_tables") == 1
    later = await publish(shop, "rates-later", {"DE": 160000},
                          datetime.now(UTC) + timedelta(days=30))
    assert later.version == 2
    await shop.purchase("po-1")  # the future table is not in force yet
    assert (await snapshot_of(shop, "po-1")).rate_table_version == 1


async def test_another_orgs_snapshot_is_not_found(shop: Shop) -> None:
    await shop.purchase("po-1")
    with pytest.raises(TallyError) as caught:
        await snapshot_of(shop, "po-1", org="intruder")
    assert (caught.value.reason, caught.value.field) == (Reason.NOT_FOUND, "payment_order_id")
