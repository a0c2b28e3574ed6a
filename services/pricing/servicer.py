"""tally.pricing.v1.PricingService: proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tally.kit.protoconv import from_timestamp
from tally.kit.server import current_principal, until_shutdown
from tally.pricing.v1 import pricing_pb2 as pb
from tally.pricing.v1 import pricing_pb2_grpc

from . import convert
from .domain import Pricing, PublishedBook

Context = grpc.aio.ServicerContext[Any, Any]


def _actor() -> str:
    principal = current_principal.get()
    return principal.identity if principal else "service:anonymous"


class PricingServicer(pricing_pb2_grpc.PricingServiceServicer):
    """Translates PricingService calls to the Pricing domain."""

    def __init__(self, pricing: Pricing, *, watch_lifetime_s: float,
                 shutting_down: asyncio.Event | None = None) -> None:
        self.pricing = pricing
        self.watch_lifetime_s = watch_lifetime_s
        # the server's ServiceApp.shutting_down: watch streams end when it is set
        self.shutting_down = shutting_down or asyncio.Event()
        self._wire: dict[int, pb.PriceBook] = {}  # published books are immutable

    def _book(self, published: PublishedBook) -> pb.PriceBook:
        message = self._wire.get(published.version)
        if message is None:
            message = self._wire[published.version] = convert.book_to_proto(published)
        return message

    async def Quote(self, request: pb.QuoteRequest, context: Context) -> pb.QuoteResponse:
        """Prices a usage or an estimate with the book in force at `at`."""
        quote, published = self.pricing.quote(convert.quote_command(request))
        return convert.quote_to_proto(quote, published, request.is_estimate)

    async def GetPriceBook(self, request: pb.GetPriceBookRequest, context: Context
                           ) -> pb.GetPriceBookResponse:
        """One book: by version, in force at an instant, or current."""
        published = await self.pricing.get(request.version, from_timestamp(request, "at"))
        return pb.GetPriceBookResponse(book=self._book(published))

    async def WatchPriceBook(self, request: pb.WatchPriceBookRequest, context: Context
                             ) -> AsyncIterator[pb.WatchPriceBookResponse]:
        """History (if asked), the current book, then every newly published one; ends cleanly
        at its lifetime cap or when this server begins shutting down (the caller reconnects)."""
        books = self.pricing.watch(request.known_version,
                                   from_timestamp(request, "history_since"),
                                   self.watch_lifetime_s)
        async for published in until_shutdown(books, self.shutting_down):
            yield pb.WatchPriceBookResponse(book=self._book(published))

    async def PublishPriceBook(self, request: pb.PublishPriceBookRequest, context: Context
                               ) -> pb.PublishPriceBookResponse:
        """Validates and publishes a new version; idempotent on request_id."""
        result = await self.pricing.publish(convert.publish_command(request, _actor()))
        return convert.publish_to_proto(result)

    async def SimulatePriceChange(self, request: pb.SimulatePriceChangeRequest,
                                  context: Context) -> pb.SimulatePriceChangeResponse:
        """Re-rates a window of recorded usage under a draft; per-org differences."""
        page = await self.pricing.simulate(
            convert.draft_from_proto(request.draft), from_timestamp(request, "start_time"),
            from_timestamp(request, "end_time"), request.org_id, request.page_size,
            request.page_token)
        return convert.simulation_to_proto(page)

    async def ListCreditPackages(self, request: pb.ListCreditPackagesRequest,
                                 context: Context) -> pb.ListCreditPackagesResponse:
        """Credit packages of the book in force, in display order."""
        page = self.pricing.list_packages(request.page_size, request.page_token)
        return convert.package_page_to_proto(page)

    async def MarginReport(self, request: pb.MarginReportRequest, context: Context
                           ) -> pb.MarginReportResponse:
        """Revenue, upstream cost and margin per model and provider."""
        page = await self.pricing.margin(
            from_timestamp(request, "start_time"), from_timestamp(request, "end_time"),
            request.page_size, request.page_token)
        return convert.margin_to_proto(page)

    async def ListPriceBookVersions(self, request: pb.ListPriceBookVersionsRequest,
                                    context: Context) -> pb.ListPriceBookVersionsResponse:
        """Published versions, newest first."""
        page = await self.pricing.list_versions(request.page_size, request.page_token)
        return convert.version_page_to_proto(page)
