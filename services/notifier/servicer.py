"""tally.notifier.v1.NotifierService: proto <-> domain, nothing else.

Only ListAlertRules is served so far; every other RPC keeps the generated base class's
UNIMPLEMENTED answer until its issue lands.
"""

from __future__ import annotations

from typing import Any

import grpc

from tally.notifier.v1 import notifier_pb2, notifier_pb2_grpc

from . import convert
from .domain import AlertRules


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    """Answers notifier calls."""

    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules

    async def ListAlertRules(
        self,
        request: notifier_pb2.ListAlertRulesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> notifier_pb2.ListAlertRulesResponse:
        """One page of an org's alert rules, newest first."""
        page = await self.rules.list_rules(request.org_id, request.page_size, request.page_token)
        return convert.rule_page_to_proto(page)
