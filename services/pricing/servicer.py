"""tally.pricing.v1.PricingService: proto <-> domain, nothing else.

Only ListCreditPackages is served so far; every other RPC keeps the generated base class's
UNIMPLEMENTED answer until its issue lands.
"""

from __future__ import annotations

from typing import Any

import grpc

from tally.pricing.v1 import pricing_pb2, pricing_pb2_grpc

from . import convert
from .domain import CreditPackageCatalog


class PricingServicer(pricing_pb2_grpc.PricingServiceServicer):
    """Answers pricing calls from the catalog loaded at start-up."""

    def __init__(self, catalog: CreditPackageCatalog) -> None:
        self.catalog = catalog

    async def ListCreditPackages(
        self,
        request: pricing_pb2.ListCreditPackagesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pricing_pb2.ListCreditPackagesResponse:
        """Lists the credit packages of the current price book, in display order."""
        page = self.catalog.list_packages(request.page_size, request.page_token)
        return convert.package_page_to_proto(page)
