"""Billing profiles, in plain Python: who an org is to a finance team (legal name, address,
country, tax id, invoice e-mail, currency), what makes a profile complete, and whether a tax id
has the format its country gives it.

Tax ids are checked for format (and check digit where the country defines one): EU VAT
numbers (VIES formats, with the country prefix; Greece is EL), GB VAT, US EIN, Swiss UID (CHE,
mod 11), Norwegian organisation numbers (mod 11) and Australian ABNs (mod 89). Other countries'
tax ids are kept as given (printable, at most 32 characters). Whether a number is registered is
for the tax office's service to say (VIES), not for a format check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from services.ledger import domain as d
from services.ledger.payments.domain import check_currency
from tally.kit.errors import FieldViolation, Reason, TallyError

MAX_TEXT: Final = 200
MAX_TAX_ID: Final = 32

COUNTRIES: Final = frozenset("""
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS
BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE
EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM
HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC
LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA
NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW
SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO
TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
""".split())
"""ISO 3166-1 alpha-2 codes."""

EU: Final = frozenset("AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO "
                      "SE SI SK".split())
"""Member states of the EU VAT area."""

_EU_VAT: Final = {
    "AT": r"U\d{8}", "BE": r"[01]\d{9}", "BG": r"\d{9,10}", "CY": r"\d{8}[A-Z]",
    "CZ": r"\d{8,10}", "DE": r"\d{9}", "DK": r"\d{8}", "EE": r"\d{9}", "EL": r"\d{9}",
    "ES": r"[A-Z0-9]\d{7}[A-Z0-9]", "FI": r"\d{8}", "FR": r"[A-HJ-NP-Z0-9]{2}\d{9}",
    "HR": r"\d{11}", "HU": r"\d{8}", "IE": r"\d{7}[A-W][A-I]?|\d[A-Z+*]\d{5}[A-W]",
    "IT": r"\d{11}", "LT": r"\d{9}|\d{12}", "LU": r"\d{8}", "LV": r"\d{11}", "MT": r"\d{8}",
    "NL": r"\d{9}B\d{2}", "PL": r"\d{10}", "PT": r"\d{9}", "RO": r"[1-9]\d{1,9}",
    "SE": r"\d{10}01", "SI": r"\d{8}", "SK": r"\d{10}",
}
_GB_VAT: Final = re.compile(r"GB(\d{9}|\d{12}|GD[0-4]\d{2}|HA[5-9]\d{2})")
_EIN: Final = re.compile(r"(\d{2})-?(\d{7})")
_EIN_INVALID_PREFIXES: Final = frozenset(
    "00 07 08 09 17 18 19 28 29 49 69 70 78 79 89 96 97".split())
_CH_UID: Final = re.compile(r"CHE-?(\d{3})\.?(\d{3})\.?(\d{3})( ?(MWST|TVA|IVA))?")
_NO_ORG: Final = re.compile(r"(NO)?(\d{9})(MVA)?")
_ABN: Final = re.compile(r"\d{11}")
_EMAIL: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def vat_prefix(country: str) -> str:
    """The prefix of a country's EU VAT numbers (Greece uses EL)."""
    return "EL" if country == "GR" else country


@dataclass(frozen=True, slots=True)
class Address:
    """A postal address (proto BillingAddress)."""

    line1: str = ""
    line2: str = ""
    city: str = ""
    postal_code: str = ""
    region: str = ""


@dataclass(frozen=True, slots=True)
class BillingProfile:
    """Who an org is on its invoices (proto BillingProfile). A profile may be stored
    incomplete (a draft); `missing_fields` says what a purchase would still need."""

    org_id: str
    legal_name: str = ""
    address: Address = Address()
    country: str = ""
    tax_id: str = ""
    invoice_email: str = ""
    currency: str = ""
    updated_at: datetime | None = None
    updated_by: str = ""

    @property
    def is_business(self) -> bool:
        """A customer with a tax id buys as a business (B2B)."""
        return bool(self.tax_id)


@dataclass(frozen=True, slots=True)
class BillingSettings:
    """An org's billing rules (proto BillingSettings)."""

    org_id: str
    profile_required: bool = False
    """Refuse purchases until the org's profile is complete (off by default: a card top-up
    needs no profile)."""
    updated_at: datetime | None = None
    updated_by: str = ""


REQUIRED_FIELDS: Final = ("legal_name", "address.line1", "address.city", "country",
                          "invoice_email", "currency")
"""What a complete profile has (postal code and region: where the country has them)."""


def missing_fields(profile: BillingProfile | None) -> list[str]:
    """The fields a purchase still needs, in `REQUIRED_FIELDS` order (all of them when the org
    has no profile)."""
    if profile is None:
        return list(REQUIRED_FIELDS)
    values = {"legal_name": profile.legal_name, "address.line1": profile.address.line1,
              "address.city": profile.address.city, "country": profile.country,
              "invoice_email": profile.invoice_email, "currency": profile.currency}
    return [name for name in REQUIRED_FIELDS if not values[name].strip()]


# --- tax ids -------------------------------------------------------------------------------


def normalize_tax_id(value: str) -> str:
    """Upper case without spaces (the form the checks and the documents use); Swiss UIDs keep
    their dashes and dots, EINs their dash."""
    return re.sub(r"\s+", "", value).upper()


def tax_id_problem(country: str, tax_id: str) -> str | None:
    """Why `tax_id` is not a tax id of `country` (None when it has the right format)."""
    if country in EU:
        prefix = vat_prefix(country)
        if not tax_id.startswith(prefix):
            return f"an EU VAT number of {country} starts with {prefix}"
        if not re.fullmatch(_EU_VAT[prefix], tax_id[len(prefix):]):
            return f"is not in the format of a {country} VAT number ({prefix} + " \
                   f"{_EU_VAT[prefix]})"
        return None
    if country == "GB":
        return None if _GB_VAT.fullmatch(tax_id) else (
            "a GB VAT number is GB + 9 or 12 digits (or GD/HA + 3 digits)")
    if country == "US":
        match = _EIN.fullmatch(tax_id)
        if not match:
            return "a US EIN is 9 digits as NN-NNNNNNN"
        if match.group(1) in _EIN_INVALID_PREFIXES:
            return f"{match.group(1)} is not an EIN prefix the IRS assigns"
        return None
    if country == "CH":
        match = _CH_UID.fullmatch(tax_id)
        if not match:
            return "a Swiss UID is CHE-NNN.NNN.NNN (optionally followed by MWST, TVA or IVA)"
        digits = "".join(match.group(i) for i in (1, 2, 3))
        return None if _mod11(digits, (5, 4, 3, 2, 7, 6, 5, 4)) else (
            "the Swiss UID's check digit does not match")
    if country == "NO":
        match = _NO_ORG.fullmatch(tax_id)
        if not match:
            return "a Norwegian organisation number is 9 digits (NO...MVA for VAT)"
        return None if _mod11(match.group(2), (3, 2, 7, 6, 5, 4, 3, 2)) else (
            "the Norwegian organisation number's check digit does not match")
    if country == "AU":
        if not _ABN.fullmatch(tax_id):
            return "an Australian ABN is 11 digits"
        weights = (10, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19)
        abn = [int(c) for c in tax_id]
        abn[0] -= 1
        return None if sum(w * x for w, x in zip(weights, abn, strict=True)) % 89 == 0 \
            else "the ABN's checksum (mod 89) does not match"
    if len(tax_id) > MAX_TAX_ID or not re.fullmatch(r"[A-Z0-9./-]+", tax_id):
        return f"must be at most {MAX_TAX_ID} letters, digits, '.', '/' or '-'"
    return None


def _mod11(digits: str, weights: tuple[int, ...]) -> bool:
    """The mod-11 check digit (the last digit) of Swiss UIDs and Norwegian numbers."""
    total = sum(int(c) * w for c, w in zip(digits, weights, strict=False))
    check = 11 - total % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(digits[len(weights)])


# --- validation ----------------------------------------------------------------------------


def normalized(profile: BillingProfile) -> BillingProfile:
    """The form a profile is stored in: trimmed text, upper-case codes, a compact tax id."""
    a = profile.address
    return BillingProfile(
        profile.org_id, profile.legal_name.strip(),
        Address(a.line1.strip(), a.line2.strip(), a.city.strip(), a.postal_code.strip(),
                a.region.strip()),
        profile.country.strip().upper(), normalize_tax_id(profile.tax_id),
        profile.invoice_email.strip(), profile.currency.strip().upper())


def validate_profile(profile: BillingProfile) -> None:
    """Every problem of a profile (given as `normalized` returns it), each naming its field.
    Empty fields are allowed (a draft); what is given must be right."""
    problems: list[FieldViolation | None] = [d.check_id("profile.org_id", profile.org_id)]
    texts = {"profile.legal_name": profile.legal_name,
             "profile.address.line1": profile.address.line1,
             "profile.address.line2": profile.address.line2,
             "profile.address.city": profile.address.city,
             "profile.address.postal_code": profile.address.postal_code,
             "profile.address.region": profile.address.region}
    for name, value in texts.items():
        if len(value) > MAX_TEXT or not value.isprintable():
            problems.append(FieldViolation(name, f"must be at most {MAX_TEXT} printable "
                                                 "characters"))
    if profile.country and profile.country not in COUNTRIES:
        problems.append(FieldViolation("profile.country",
                                       f"{profile.country!r} is not an ISO 3166-1 alpha-2 "
                                       "country code"))
    if profile.tax_id:
        if not profile.country:
            problems.append(FieldViolation("profile.tax_id", "needs the profile's country"))
        elif profile.country in COUNTRIES:
            why = tax_id_problem(profile.country, profile.tax_id)
            if why:
                problems.append(FieldViolation("profile.tax_id", why))
    if profile.invoice_email and (len(profile.invoice_email) > MAX_TEXT
                                  or not _EMAIL.fullmatch(profile.invoice_email)):
        problems.append(FieldViolation("profile.invoice_email", "is not an e-mail address"))
    if profile.currency:
        problems.append(check_currency("profile.currency", profile.currency))
    d.raise_if(problems)


def check_complete(settings: BillingSettings, profile: BillingProfile | None) -> None:
    """A purchase of an org whose settings require a profile needs a complete one."""
    if not settings.profile_required:
        return
    missing = missing_fields(profile)
    if missing:
        raise TallyError(
            Reason.BILLING_PROFILE_INCOMPLETE,
            f"org_id: the org's billing profile is required and lacks {', '.join(missing)}",
            field="org_id", metadata={"missing_fields": ",".join(missing)})
