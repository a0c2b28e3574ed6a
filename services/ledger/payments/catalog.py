"""What credit costs: offers made from the price book in force (pricing service)."""

from __future__ import annotations

from typing import Protocol

import grpc

from services.ledger.payments import domain as p
from tally.kit.errors import Reason, TallyError, invalid
from tally.pricing.v1 import pricing_pb2, pricing_pb2_grpc


class Catalog(Protocol):
    """Turns what a customer asks to buy into an Offer (price, credits, bonus)."""

    async def package_offer(self, package_id: str, *, field: str, checkout: bool) -> p.Offer:
        """The package of the price book in force; with `checkout`, one sold by checkout."""
        ...

    async def custom_offer(self, custom: p.CustomAmount, *, field: str) -> p.Offer:
        """Credits for an amount of money at the book's custom credit price."""
        ...


class PricingCatalog:
    """Reads the book in force from PricingService on each offer (purchases are rare, and a
    price changed a second ago must apply)."""

    def __init__(self, pricing: pricing_pb2_grpc.PricingServiceAsyncStub) -> None:
        self.pricing = pricing

    async def _book(self) -> pricing_pb2.PriceBook:
        try:
            response = await self.pricing.GetPriceBook(pricing_pb2.GetPriceBookRequest(),
                                                       timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            # pricing restarting is an outage the buyer retries through, not our bug
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TallyError(Reason.UNAVAILABLE, f"pricing: {exc.details()}") from exc
            raise
        return response.book

    async def package_offer(self, package_id: str, *, field: str, checkout: bool) -> p.Offer:
        book = await self._book()
        for package in book.packages:
            if package.package_id != package_id:
                continue
            if checkout and package.manual_settlement_only:
                raise invalid(field, f"package {package_id!r} is sold by manual settlement "
                                     "only (RecordManualPayment)")
            return p.Offer(package.price_minor, package.currency, package.credits_micros,
                           package.bonus_credits_micros, package.package_id, book.version,
                           package.manual_settlement_only)
        raise TallyError(Reason.NOT_FOUND,
                         f"{field}: no package {package_id!r} in price book v{book.version}",
                         field=field)

    async def custom_offer(self, custom: p.CustomAmount, *, field: str) -> p.Offer:
        book = await self._book()
        return p.custom_offer(custom, book.custom_credit_price_minor.get(custom.currency),
                              book.version, field)
