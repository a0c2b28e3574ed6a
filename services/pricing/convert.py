"""Pricing domain objects -> tally.pricing.v1 messages."""

from __future__ import annotations

from tally.pricing.v1 import pricing_pb2
from tally.rating import CreditPackage

from .domain import PackagePage


def package_to_proto(package: CreditPackage) -> pricing_pb2.CreditPackage:
    """A catalog package as the wire message, with its derived (output-only) figures."""
    return pricing_pb2.CreditPackage(
        package_id=package.package_id,
        name=package.name,
        tier=pricing_pb2.PackageTier.Value(f"PACKAGE_TIER_{package.tier.name}"),
        price_minor=package.price_minor,
        currency=package.currency,
        credits_micros=package.credits_micros,
        bonus_credits_micros=package.bonus_credits_micros,
        effective_credits_micros=package.effective_credits_micros,
        cost_per_credit_minor=str(package.cost_per_credit_minor),
        manual_settlement_only=package.manual_settlement_only,
    )


def package_page_to_proto(page: PackagePage) -> pricing_pb2.ListCreditPackagesResponse:
    """A page of packages as the ListCreditPackages response."""
    return pricing_pb2.ListCreditPackagesResponse(
        packages=[package_to_proto(p) for p in page.packages],
        next_page_token=page.next_page_token,
        price_book_version=page.price_book_version,
    )
