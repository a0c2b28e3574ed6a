"""Tax of a payment order, in plain Python: which rule applies between the issuer and the
customer, at which rate, and how the order's amount splits into net and tax.

Prices are tax-inclusive: what the customer pays (the order's amount, the price book's price)
is the gross, and the tax is taken out of it, so a customer is charged the same amount whatever
rule applies. One rounding rule, for every order:

    tax   = round_half_up(gross * rate / (1 + rate))     (exact integer arithmetic)
    net   = gross - tax

in the currency's minor units, with rates held as integer parts per million (19 % = 190000).
So net + tax = gross always, and tax is the whole minor unit nearest the exact tax (a half
rounds up).

Rules (the issuer is Tally's selling entity, in the ledger's settings):
- DOMESTIC: the customer is in the issuer's country (or has no billing profile: its place of
  supply is then taken as the issuer's): the issuer's country rate.
- REVERSE_CHARGE: issuer and customer in different EU states, the customer a business with a
  VAT number of its own country in the right format: 0 %, and the invoice says who owes VAT.
- EU_OSS: issuer and customer in different EU states, the customer without a valid VAT number
  (a consumer): the customer's country rate (digital services are taxed where the customer is).
- US_SALES_TAX: a customer in the US whose state (profile region) is in the rate table: that
  rate (jurisdiction US-<state>); the table decides where sales tax is collected.
- EXPORT: anything else across a border (outside the EU): 0 %.
Rates come from a versioned table (`TaxRateTable`); the snapshot keeps the version and rate it
used, so a later table never changes an order's tax.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from services.ledger.billing import domain as b
from tally.kit.errors import invalid

PPM: Final = 1_000_000
MAX_RATE_PPM: Final = PPM  # 100 %

REVERSE_CHARGE_TEXT: Final = (
    "Reverse charge: VAT to be accounted for by the recipient (Article 196, Council "
    "Directive 2006/112/EC).")
EXPORT_TEXT: Final = "Export of services outside the EU: not subject to VAT."


class TaxRule(enum.StrEnum):
    """Which rule decided an order's tax (proto TaxRule)."""

    DOMESTIC = "DOMESTIC"
    REVERSE_CHARGE = "REVERSE_CHARGE"
    EU_OSS = "EU_OSS"
    US_SALES_TAX = "US_SALES_TAX"
    EXPORT = "EXPORT"


LEGAL_TEXT: Final = {TaxRule.REVERSE_CHARGE: REVERSE_CHARGE_TEXT,
                     TaxRule.EXPORT: EXPORT_TEXT}
"""What an invoice under a rule must say."""


@dataclass(frozen=True, slots=True)
class Issuer:
    """Tally's selling entity: who issues invoices."""

    legal_name: str
    country: str
    tax_id: str = ""
    address: str = ""


@dataclass(frozen=True, slots=True)
class TaxRateTable:
    """One version of the rates: jurisdiction (a country code, or US-<state>) -> parts per
    million. A new version is published for any change; old versions stay as they were."""

    version: int
    rates_ppm: dict[str, int]
    effective_from: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaxSnapshot:
    """An order's tax as decided when it was made (proto TaxSnapshot); never recomputed."""

    rule: TaxRule
    jurisdiction: str
    rate_ppm: int
    rate_table_version: int
    gross_minor: int
    tax_minor: int
    net_minor: int
    currency: str
    issuer_country: str
    issuer_tax_id: str
    customer_country: str
    customer_tax_id: str
    legal_text: str = ""


def split_gross(gross_minor: int, rate_ppm: int) -> tuple[int, int]:
    """(net, tax) of a tax-inclusive amount: tax rounded half up to a whole minor unit."""
    if gross_minor < 0 or not 0 <= rate_ppm <= MAX_RATE_PPM:
        raise ValueError("gross must be >= 0 and the rate within 0..100 %")
    numerator, denominator = gross_minor * rate_ppm, PPM + rate_ppm
    tax = (2 * numerator + denominator) // (2 * denominator)
    return gross_minor - tax, tax


def decide(issuer: Issuer, customer: b.BillingProfile | None, table: TaxRateTable
           ) -> tuple[TaxRule, str, int]:
    """(rule, jurisdiction, rate in ppm) for a sale from `issuer` to `customer`."""
    country = customer.country if customer is not None and customer.country else ""
    if not country or country == issuer.country:
        return TaxRule.DOMESTIC, issuer.country, table.rates_ppm.get(issuer.country, 0)
    if issuer.country in b.EU and country in b.EU:
        assert customer is not None
        if customer.tax_id and b.tax_id_problem(country, customer.tax_id) is None:
            return TaxRule.REVERSE_CHARGE, country, 0
        return TaxRule.EU_OSS, country, table.rates_ppm.get(country, 0)
    if country == "US" and customer is not None:
        state = f"US-{customer.address.region.upper()}"
        if customer.address.region and state in table.rates_ppm:
            return TaxRule.US_SALES_TAX, state, table.rates_ppm[state]
    return TaxRule.EXPORT, country, 0


def snapshot(issuer: Issuer, customer: b.BillingProfile | None, table: TaxRateTable,
             gross_minor: int, currency: str) -> TaxSnapshot:
    """The tax of an order of `gross_minor`, as it will be stored on the order."""
    rule, jurisdiction, rate = decide(issuer, customer, table)
    net, tax = split_gross(gross_minor, rate)
    return TaxSnapshot(
        rule, jurisdiction, rate, table.version, gross_minor, tax, net, currency,
        issuer.country, issuer.tax_id, customer.country if customer else "",
        customer.tax_id if customer else "", LEGAL_TEXT.get(rule, ""))


def validate_rates(rates_ppm: dict[str, int]) -> None:
    """A table of known jurisdictions (countries, or US-<state>) with rates 0..100 %."""
    for jurisdiction, rate in sorted(rates_ppm.items()):
        field = f"rates[{jurisdiction}]"
        country = jurisdiction.split("-", 1)[0]
        if country not in b.COUNTRIES or ("-" in jurisdiction and country != "US"):
            raise invalid(field, "is not a country code or US-<state>")
        if not 0 <= rate <= MAX_RATE_PPM:
            raise invalid(field, "rate_ppm must be 0..1000000 (0..100 %)")
