"""tally.notifier.v1.NotifierService: proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc

from tally.notifier.v1 import notifier_pb2, notifier_pb2_grpc

from . import convert, convert_deliveries
from .delivery_store import DeliveryStore
from .domain import AlertRules, SigningSecrets, check_id, raise_if
from .hub import NotificationHub

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    """Answers notifier calls."""

    def __init__(self, rules: AlertRules, *, deliveries: DeliveryStore, hub: NotificationHub,
                 secrets: SigningSecrets, stream_lifetime_s: float = 300.0,
                 on_replayed: Callable[[], None] = lambda: None,
                 shutting_down: asyncio.Event | None = None) -> None:
        self.rules = rules
        self.deliveries = deliveries
        self.hub = hub
        self.secrets = secrets
        self.on_replayed = on_replayed
        """Wakes the delivery worker: replayed dead letters are due at once."""
        self.stream_lifetime_s = stream_lifetime_s
        # the server's ServiceApp.shutting_down: Subscribe streams end when it is set
        self.shutting_down = shutting_down or asyncio.Event()

    async def Subscribe(self, request: notifier_pb2.SubscribeRequest, context: Context
                        ) -> AsyncIterator[notifier_pb2.SubscribeResponse]:
        """The org's new notifications until the stream's lifetime or the server's shutdown
        (then OK; the client reconnects)."""
        raise_if([check_id("org_id", request.org_id)])
        types = convert_deliveries.type_filter(request.types)
        stop = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(self.stream_lifetime_s, stop.set)
        shutdown = asyncio.ensure_future(self.shutting_down.wait())
        shutdown.add_done_callback(lambda _: stop.set())
        try:
            async for found in self.hub.subscribe(request.org_id, types, stop):
                yield notifier_pb2.SubscribeResponse(
                    notification=convert_deliveries.notification(found))
        finally:
            timer.cancel()
            shutdown.cancel()

    async def ListDeliveries(self, request: notifier_pb2.ListDeliveriesRequest,
                             context: Context) -> notifier_pb2.ListDeliveriesResponse:
        """One page of the org's delivery log, newest first."""
        page, token = await self.deliveries.deliveries(
            request.org_id, request.rule_id, convert_deliveries.state_filter(request.state),
            request.page_size, request.page_token)
        return notifier_pb2.ListDeliveriesResponse(
            deliveries=[convert_deliveries.delivery(d) for d in page], next_page_token=token)

    async def ReplayDeadLetters(self, request: notifier_pb2.ReplayDeadLettersRequest,
                                context: Context) -> notifier_pb2.ReplayDeadLettersResponse:
        """Moves dead letters back to PENDING; a replay of the request id answers the same."""
        count = await self.deliveries.replay_dead_letters(
            request.request_id, request.org_id, list(request.delivery_ids), datetime.now(UTC))
        self.on_replayed()
        return notifier_pb2.ReplayDeadLettersResponse(replayed_count=count)

    async def CreateAlertRule(self, request: notifier_pb2.CreateAlertRuleRequest,
                              context: Context) -> notifier_pb2.CreateAlertRuleResponse:
        """Creates a rule; a replay of the request id returns the rule first created."""
        created = await self.rules.create_rule(
            request.request_id, request.rule.org_id, convert.rule_spec(request.rule))
        return notifier_pb2.CreateAlertRuleResponse(rule=convert.rule_to_proto(created))

    async def UpdateAlertRule(self, request: notifier_pb2.UpdateAlertRuleRequest,
                              context: Context) -> notifier_pb2.UpdateAlertRuleResponse:
        """Changes the fields in update_mask (empty = every writable field)."""
        updated = await self.rules.update_rule(
            request.request_id, request.rule.org_id, request.rule.rule_id,
            convert.rule_spec(request.rule), list(request.update_mask.paths))
        return notifier_pb2.UpdateAlertRuleResponse(rule=convert.rule_to_proto(updated))

    async def GetAlertRule(self, request: notifier_pb2.GetAlertRuleRequest,
                           context: Context) -> notifier_pb2.GetAlertRuleResponse:
        """One live rule."""
        found = await self.rules.get_rule(request.org_id, request.rule_id)
        return notifier_pb2.GetAlertRuleResponse(rule=convert.rule_to_proto(found))

    async def ListAlertRules(self, request: notifier_pb2.ListAlertRulesRequest,
                             context: Context) -> notifier_pb2.ListAlertRulesResponse:
        """One page of an org's alert rules, newest first."""
        page = await self.rules.list_rules(request.org_id, request.page_size, request.page_token)
        return convert.rule_page_to_proto(page)

    async def DeleteAlertRule(self, request: notifier_pb2.DeleteAlertRuleRequest,
                              context: Context) -> notifier_pb2.DeleteAlertRuleResponse:
        """Deletes a rule; a replay of the request id succeeds again."""
        await self.rules.delete_rule(request.request_id, request.org_id, request.rule_id)
        return notifier_pb2.DeleteAlertRuleResponse()

    async def RotateWebhookSecret(self, request: notifier_pb2.RotateWebhookSecretRequest,
                                  context: Context) -> notifier_pb2.RotateWebhookSecretResponse:
        """A new signing secret, shown once; the previous one signs too for the overlap."""
        rotation = await self.secrets.rotate(request.request_id, request.org_id,
                                             request.overlap_seconds)
        return convert.rotation_to_proto(rotation)
