"""Alerts end to end, on the real services: ledger and metering outbox events become
notifications, delivered once per cooldown to a signed webhook and to SMTP; a receiver that
fails three times then recovers gets the alert once; one that always fails ends in the
dead-letter list, from where a replay delivers it; Subscribe streams them live.

No sleeps for timing: the tests wait for the receivers (events) or poll the delivery log
until a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from services.notifier.server import NotifierConfig, build_for
from services.notifier.store import WebhookSecrets
from tally.kit import db, signing
from tally.kit.infra import free_port
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.notifier.v1 import notifier_pb2_grpc
from tests.metering.conftest import CREDIT, Suite, start_suite, stop_suite

DEADLINE_S = 20.0


@dataclass
class Receiver:
    """A webhook endpoint that fails its first `failures` requests (or every one if < 0)."""

    failures: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.failures < 0 or len(self.requests) <= self.failures:
            return web.Response(status=503)
        self.got.set()
        return web.Response(status=204)


class Mailbox:
    """An SMTP server's received messages (aiosmtpd handler)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.loop = asyncio.get_running_loop()
        self.got = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        self.loop.call_soon_threadsafe(self.got.set)
        return "250 OK"


@dataclass
class World:
    suite: Suite
    notifier: RunningServer
    stub: notifier_pb2_grpc.NotifierServiceStub
    mailbox: Mailbox
    receivers: dict[str, Receiver]


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    suite = await start_suite(db_url)
    mailbox = Mailbox()
    # aiosmtpd checks it is up by connecting to the port it was given: it cannot take port 0
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    app = web.Application()
    receivers = {"ok": Receiver(), "flaky": Receiver(failures=3), "down": Receiver(failures=-1)}
    for name, receiver in receivers.items():
        app.router.add_post(f"/{name}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()  # port 0: the kernel's, read back
    port = runner.addresses[0][1]
    for name, receiver in receivers.items():
        receiver.url = f"http://127.0.0.1:{port}/{name}"
    notifier = await start_server(await build_for(db_url, suite.config, NotifierConfig(
        smtp_host="127.0.0.1", smtp_port=smtp.port, first_retry_ms=10, poll_ms=20)), port=0)
    config = dataclasses.replace(suite.config, notifier_port=notifier.port)
    import grpc
    channel = grpc.aio.insecure_channel(config.address_of("notifier"))
    try:
        yield World(suite, notifier, notifier_pb2_grpc.NotifierServiceStub(channel), mailbox,
                    receivers)
    finally:
        await channel.close()
        await notifier.stop()
        await runner.cleanup()
        smtp.stop()
        await stop_suite(suite)


async def add_rule(world: World, *, channel: str, target: str = "", threshold: int = 0,
                   cooldown: int = 0, types: tuple[str, ...] = ("low_balance",),
                   org: str = "acme") -> str:
    rule_id = f"rule-{uuid.uuid4().hex[:8]}"
    body = {"types": list(types), "channel": channel,
            "webhook_url": target if channel == "webhook" else "",
            "email_to": target if channel == "email" else "", "cooldown_seconds": cooldown,
            "low_balance_threshold_micros": threshold * CREDIT, "enabled": True}
    conn = await asyncpg.connect(db.asyncpg_url(world.suite.db_url))
    try:
        await conn.execute(
            "INSERT INTO notifier.alert_rules (rule_id, org_id, request_id, body) "
            "VALUES ($1, $2, $1, $3)", rule_id, org, json.dumps(body))
    finally:
        await conn.close()
    return rule_id


async def spend(world: World, credits: int, org: str = "acme") -> None:
    await world.suite.client.ledger.Transfer(lpb.TransferRequest(
        transfer_id=f"spend-{uuid.uuid4().hex}", org_id=org, kind=lpb.TRANSFER_KIND_USAGE,
        amount_micros=credits * CREDIT, reason="test usage"))


async def grant(world: World, credits: int, org: str = "acme") -> None:
    await world.suite.client.ledger.Transfer(lpb.TransferRequest(
        transfer_id=f"grant-{uuid.uuid4().hex}", org_id=org,
        kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=credits * CREDIT,
        reason="test grant"))


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def deliveries(world: World, rule_id: str) -> list[npb.Delivery]:
    reply = await world.stub.ListDeliveries(npb.ListDeliveriesRequest(
        org_id="acme", rule_id=rule_id))
    return list(reply.deliveries)


async def caught_up(world: World) -> None:
    """Waits until the notifier has recorded every ledger event there is now."""
    conn = await asyncpg.connect(db.asyncpg_url(world.suite.db_url))
    try:
        async def done() -> bool:
            # one statement, one snapshot: read apart, an event sealed between the reads would
            # count as neither unsealed nor newest
            row = await conn.fetchrow(
                "SELECT (SELECT coalesce(max(sequence), 0) FROM ledger.outbox) AS newest, "
                "(SELECT count(*) FROM ledger.outbox WHERE sequence IS NULL) AS unsealed, "
                "(SELECT coalesce(max(sequence), 0) FROM notifier.source_cursors "
                "WHERE source = 'ledger') AS cursor")
            assert row is not None
            return row["unsealed"] == 0 and row["cursor"] >= row["newest"]
        await until(done, "the notifier to catch up with the ledger")
    finally:
        await conn.close()


async def test_low_balance_reaches_a_signed_webhook_once_per_cooldown(world: World) -> None:
    ok = world.receivers["ok"]
    rule = await add_rule(world, channel="webhook", target=ok.url, threshold=100,
                          cooldown=3600)
    await grant(world, 150)
    await spend(world, 60)  # 90 left: crosses below 100
    await asyncio.wait_for(ok.got.wait(), DEADLINE_S)
    headers, body = ok.requests[0]
    secrets = await WebhookSecrets(db.create_engine(world.suite.db_url)).valid_secrets(
        "acme", datetime.now(UTC))
    signing.verify(headers["Tally-Signature"], body, secrets, int(time.time()))
    sent = json.loads(body)
    assert sent["type"] == "LOW_BALANCE" and sent["org_id"] == "acme"
    assert sent["attributes"]["available_micros"] == str(90 * CREDIT)
    # back above, and below again inside the cooldown: nothing more
    await grant(world, 50)
    await spend(world, 60)
    await caught_up(world)
    await until(lambda: _no_pending(world, rule), "deliveries to settle")
    assert len(ok.requests) == 1
    (only,) = await deliveries(world, rule)
    assert only.state == npb.DELIVERY_STATE_DELIVERED and only.attempts == 1


async def _no_pending(world: World, rule: str) -> bool:
    found = await deliveries(world, rule)
    return bool(found) and all(
        d.state in (npb.DELIVERY_STATE_DELIVERED, npb.DELIVERY_STATE_DEAD_LETTERED)
        for d in found)


async def test_low_balance_reaches_smtp(world: World) -> None:
    await add_rule(world, channel="email", target="ops@acme.example", threshold=100)
    await grant(world, 150)
    await spend(world, 60)
    await asyncio.wait_for(world.mailbox.got.wait(), DEADLINE_S)
    (message,) = world.mailbox.messages
    assert message["To"] == "ops@acme.example"
    assert "below 100" in message["Subject"]


async def test_a_receiver_failing_three_times_gets_the_alert_once(world: World) -> None:
    flaky = world.receivers["flaky"]
    rule = await add_rule(world, channel="webhook", target=flaky.url, threshold=100)
    await grant(world, 150)
    await spend(world, 60)
    await asyncio.wait_for(flaky.got.wait(), DEADLINE_S)
    await until(lambda: _no_pending(world, rule), "the delivery to settle")
    (delivery,) = await deliveries(world, rule)
    assert delivery.state == npb.DELIVERY_STATE_DELIVERED and delivery.attempts == 4
    ids = {headers["Tally-Notification-Id"] for headers, _ in flaky.requests}
    assert len(flaky.requests) == 4 and len(ids) == 1  # one alert, retried; dedupable


async def test_a_dead_receiver_lands_in_the_dead_letters_and_a_replay_delivers(
        world: World) -> None:
    down = world.receivers["down"]
    rule = await add_rule(world, channel="webhook", target=down.url, threshold=100)
    await grant(world, 150)
    await spend(world, 60)
    await until(lambda: _no_pending(world, rule), "the delivery to give up")
    (dead,) = await deliveries(world, rule)
    assert dead.state == npb.DELIVERY_STATE_DEAD_LETTERED and dead.attempts == 8
    assert dead.last_error == "HTTP 503"
    down.failures = 0  # the receiver is fixed
    replay = npb.ReplayDeadLettersRequest(request_id="replay-1", org_id="acme")
    assert (await world.stub.ReplayDeadLetters(replay)).replayed_count == 1
    assert (await world.stub.ReplayDeadLetters(replay)).replayed_count == 1  # idempotent
    await asyncio.wait_for(down.got.wait(), DEADLINE_S)
    await until(lambda: _no_pending(world, rule), "the replayed delivery")
    (delivered,) = await deliveries(world, rule)
    assert delivered.state == npb.DELIVERY_STATE_DELIVERED


async def test_subscribe_streams_the_orgs_notifications_live(world: World) -> None:
    await add_rule(world, channel="stream", threshold=100)
    await grant(world, 150)
    stream = world.stub.Subscribe(npb.SubscribeRequest(
        org_id="acme", types=[npb.NOTIFICATION_TYPE_LOW_BALANCE]))
    first = asyncio.ensure_future(stream.read())

    async def cross_below_until_heard() -> None:
        # the stream carries what happens after it opened: cross again until one arrives
        while not first.done():
            await spend(world, 60)
            await grant(world, 60)

    crossing = asyncio.ensure_future(cross_below_until_heard())
    reply = await asyncio.wait_for(first, DEADLINE_S)
    crossing.cancel()
    assert reply.notification.type == npb.NOTIFICATION_TYPE_LOW_BALANCE
    assert reply.notification.org_id == "acme"
    stream.cancel()


async def test_a_failed_automatic_top_up_alerts_the_org(world: World) -> None:
    ok = world.receivers["ok"]
    await add_rule(world, channel="webhook", target=ok.url,
                   types=("top_up_failed", "low_balance"))
    await world.suite.client.ledger.SetAutoTopUp(lpb.SetAutoTopUpRequest(
        request_id="top-up-1", auto_top_up=lpb.AutoTopUp(
            org_id="acme", enabled=True, threshold_micros=100 * CREDIT,
            package_id="individual-20", max_per_day=1,
            payment_method_id="pm_card_chargeDeclined")))
    await grant(world, 150)
    await spend(world, 60)  # 90 left: below the top-up threshold; the card is declined

    async def alerted() -> bool:
        return any(json.loads(body)["type"] == "TOP_UP_FAILED" for _, body in ok.requests)
    await until(alerted, "the top-up failure alert")
    failed = [json.loads(body) for _, body in ok.requests
              if json.loads(body)["type"] == "TOP_UP_FAILED"]
    assert failed[0]["attributes"]["failure_reason"] == "card_declined"
    assert failed[0]["org_id"] == "acme"
