"""tally.metering.v1.MeteringService: proto <-> domain, nothing else.

Only GetUsageSummary is served so far; every other RPC keeps the generated base class's
UNIMPLEMENTED answer until its issue lands.
"""

from __future__ import annotations

from typing import Any

import grpc

from tally.metering.v1 import metering_pb2, metering_pb2_grpc

from . import convert
from .domain import UsageReports


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    """Answers metering calls."""

    def __init__(self, reports: UsageReports) -> None:
        self.reports = reports

    async def GetUsageSummary(
        self,
        request: metering_pb2.GetUsageSummaryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> metering_pb2.GetUsageSummaryResponse:
        """One org's usage for one calendar month, per meter and the requested dimensions."""
        summary = await self.reports.summarize(convert.summary_query(request))
        return convert.summary_to_proto(summary)
