"""LocalProvider: Tally's default payment provider, a Stripe-like simulation in process.

It is a development provider. It serves real hosted checkout pages (aiohttp, server-rendered
HTML, real forms, Stripe's test cards), charges saved test payment methods (Stripe's
`pm_card_*` names), refunds, and tells the ledger what happened only through signed webhooks
delivered the way a real provider delivers them: asynchronously, retried with exponential
backoff and jitter on any non-2xx answer, each attempt freshly timestamped and signed with the
current secret, and, when asked for chaos, duplicated and reordered. So the ledger's webhook
path is exercised exactly as it will be against Stripe, without a network or an account.

Sessions, charges and refunds are held in memory, or, as the ledger runs it, in PostgreSQL
(local_store.PostgresPayments), so that several ledger replicas share them: a checkout opened
through one replica can be paid on another's page. There the events are kept too, in the
transaction that changed the payment, and sent until delivered: by the replica that made the
event, or, when it died, by whichever replica is alive when the next attempt falls due (the
one that restarts resumes at once). Never use it to take real money; nothing here moves
any (the ledger refuses to start it with TALLY_ENVIRONMENT=production).

Test cards (hosted checkout):      Payment methods (charge):
  4242 4242 4242 4242 succeeds       pm_card_visa                            succeeds
  4000 0000 0000 0002 card_declined  pm_card_chargeDeclined                  card_declined
  4000 0000 0000 9995 insufficient   pm_card_chargeDeclinedInsufficientFunds insufficient_funds
  4000 0025 0000 3155 3-D Secure     pm_card_authenticationRequired          authentication_required
                                     pm_card_pending      processing until complete_pending()
"""

from __future__ import annotations

import asyncio
import contextvars
import html
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

import aiohttp
from aiohttp import web

from tally.kit import signing
from tally.kit.log import get_logger
from tally.kit.money import format_money
from tally.kit.readiness import is_outage

from .local_store import Event, LocalPayment, LocalPayments, LocalRefund, MemoryPayments
from .provider import (
    ChargeRequest,
    CheckoutRequest,
    CheckoutSession,
    PaymentProvider,
    ProviderError,
    ProviderEvent,
    ProviderEventType,
    ProviderRefund,
)

log = get_logger("ledger.payments.local")

_T = TypeVar("_T")

_OUTBOX: Final[contextvars.ContextVar[list[Event] | None]] = contextvars.ContextVar(
    "local_provider_outbox", default=None)
"""The events of the payment change under way in this task (see LocalProvider._changing)."""

_EVENT_TYPES: Final = {
    "checkout.session.completed": ProviderEventType.PAYMENT_SUCCEEDED,
    "payment_intent.succeeded": ProviderEventType.PAYMENT_SUCCEEDED,
    "payment_intent.payment_failed": ProviderEventType.PAYMENT_FAILED,
    "checkout.session.expired": ProviderEventType.CHECKOUT_EXPIRED,
    "charge.refunded": ProviderEventType.REFUND_SUCCEEDED,
}

SUCCEEDS: Final = "succeeds"
AUTHENTICATION_REQUIRED: Final = "authentication_required"
PENDING: Final = "pending"


@dataclass(frozen=True, slots=True)
class CheckoutCard:
    """A test card number the hosted checkout page accepts, and what paying with it does."""

    number: str
    outcome: str
    """SUCCEEDS, AUTHENTICATION_REQUIRED, or the decline code (card_declined, ...)."""
    label: str


TEST_CARDS: Final = (
    CheckoutCard("4242424242424242", SUCCEEDS, "Succeeds"),
    CheckoutCard("4000000000000002", "card_declined", "Declined (card_declined)"),
    CheckoutCard("4000000000009995", "insufficient_funds", "Declined (insufficient_funds)"),
    CheckoutCard("4000002500003155", AUTHENTICATION_REQUIRED,
                 "Requires authentication (3-D Secure)"),
)

PAYMENT_METHODS: Final = {
    "pm_card_visa": SUCCEEDS,
    "pm_card_chargeDeclined": "card_declined",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "pm_card_authenticationRequired": AUTHENTICATION_REQUIRED,
    "pm_card_pending": PENDING,
}
"""The saved payment methods `charge` knows (Stripe's test names), and their outcomes."""

_DECLINE_MESSAGES: Final = {
    "card_declined": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "authentication_required": "This payment requires authentication by the cardholder.",
    "authentication_failed": "We could not authenticate your payment method.",
    "not_a_test_card": "Your card was declined: this is a test page, use a test card below.",
}

# ISO 4217 currencies whose minor unit is not 1/100 (Stripe's lists).
def luhn_ok(digits: str) -> bool:
    """Whether a card number passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One attempt to deliver one webhook event."""

    event_id: str
    event_type: str
    attempt: int
    """1 for the first try of this delivery, counting up through the retries."""
    status: int | None
    """The receiver's HTTP status; None when there was no answer (see `error`)."""
    error: str
    """Why the attempt failed ("HTTP 503", "ClientConnectorError: ..."); "" when delivered."""
    delivered: bool
    gave_up: bool = False
    """True on the last failed attempt: max_attempts reached, the event is not sent again."""
    is_redelivery: bool = False
    """A chaos duplicate or a `resend`, not the event's first delivery."""


_Payment = LocalPayment
_RefundRecord = LocalRefund


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class LocalProvider:
    """A development payment provider in this process: hosted checkout pages, off-session
    charges of test payment methods, refunds, and signed, retried webhooks. Memory only."""

    SIGNATURE_HEADER: Final = "Local-Signature"
    MAX_SESSIONS: Final = 100_000
    """Checkouts plus charges held in memory; more is refused (a runaway caller, not use)."""
    SWEEP_INTERVAL_S: Final = 30.0
    """How often a running provider looks for checkouts past their ttl to expire them, and
    for events another replica left unsent (sooner when a known retry falls due)."""
    RESUME_BATCH: Final = 100
    RESUME_RECHECK_S: Final = 0.5
    """While an event is pending and due (being attempted by someone, or waiting for a
    webhook_url), how soon the sweeper looks again."""

    name = "local"
    signature_header = SIGNATURE_HEADER

    def __init__(self, *, webhook_url: str = "", secrets: Sequence[str], host: str = "127.0.0.1",
                 port: int = 0, public_url: str = "", retry_first_s: float = 0.5,
                 retry_max_s: float = 30.0, max_attempts: int = 12, duplicate_rate: float = 0.0,
                 reorder_rate: float = 0.0, seed: int | None = None,
                 session_ttl_s: float = 86400, delivery_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time,
                 state: LocalPayments | None = None) -> None:
        if not secrets or not all(secrets):
            raise ValueError("LocalProvider needs at least one non-empty signing secret")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if retry_first_s < 0 or retry_max_s < 0:
            raise ValueError("retry delays cannot be negative")
        for rate_name, rate in (("duplicate_rate", duplicate_rate),
                                ("reorder_rate", reorder_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{rate_name} must be within [0, 1], got {rate}")
        self._webhook_url = webhook_url
        self._secrets = list(secrets)
        self._host, self._port = host, port
        self._public_url = public_url.rstrip("/")
        self.retry_first_s, self.retry_max_s = retry_first_s, retry_max_s
        self.max_attempts = max_attempts
        self.duplicate_rate, self.reorder_rate = duplicate_rate, reorder_rate
        self.session_ttl_s = session_ttl_s
        self._random = random.Random(seed)
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=delivery_timeout_s)

        self._state: LocalPayments = state or MemoryPayments()
        self._events: list[Event] = []
        self._events_by_id: dict[str, Event] = {}
        self._unsent: list[Event] = []  # created while no webhook_url was set
        self._deliveries: list[WebhookDelivery] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sending: set[str] = set()  # event ids this process is attempting

        self._client: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bound_url = ""

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Serves the checkout pages on host:port (0 = any free port); see `url`."""
        app = web.Application()
        app.add_routes([
            web.get("/checkout/{session_id}", self._page_checkout),
            web.post("/checkout/{session_id}/pay", self._page_pay),
            web.post("/checkout/{session_id}/cancel", self._page_cancel),
            web.get("/checkout/{session_id}/authenticate", self._page_authenticate),
            web.post("/checkout/{session_id}/authenticate", self._page_authenticate_answer),
            web.get("/checkout/{session_id}/complete", self._page_complete),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self._bound_url = f"http://{self._host}:{bound_port}"
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Cancels pending deliveries, closes the webhook client and the page server."""
        pending = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        self._sweeper = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """Base URL of the checkout pages: public_url, else http://host:<bound port>."""
        if self._public_url:
            return self._public_url
        if not self._bound_url:
            raise RuntimeError("LocalProvider is not started and has no public_url")
        return self._bound_url

    def keep_state_in(self, state: LocalPayments) -> None:
        """Moves the provider's sessions, charges and refunds to `state` (the ledger's
        PostgreSQL, shared by its replicas); only before the first of them exists."""
        if isinstance(self._state, MemoryPayments) and not self._state.is_empty:
            raise RuntimeError("the local provider already holds payments in memory")
        self._state = state

    @asynccontextmanager
    async def _changing(self, payment_id: str) -> AsyncIterator[_Payment | None]:
        """The payment, locked, to change; the events the change emits are kept with it
        (the same transaction) and sent once it is kept, never before and never without."""
        outbox: list[Event] = []
        token = _OUTBOX.set(outbox)
        kept = False
        try:
            async with self._state.locked(payment_id, outbox) as payment:
                yield payment
            kept = True
        except web.HTTPException:  # an answer (a redirect): the change was kept
            kept = True
            raise
        finally:
            _OUTBOX.reset(token)
            if kept:
                for event in outbox:
                    self._publish(event)

    @property
    def webhook_url(self) -> str:
        """Where webhooks are POSTed ("" = not yet known; events wait for it)."""
        return self._webhook_url

    def set_webhook_url(self, url: str) -> None:
        """Points webhooks at `url`; events created while there was none are sent now."""
        self._webhook_url = url
        if url:
            waiting, self._unsent = self._unsent, []
            for event in waiting:
                self._spawn(self._deliver(event))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Signing secrets, current first (then the ones rotated out, newest first)."""
        return tuple(self._secrets)

    def rotate_secret(self, new_secret: str) -> None:
        """Signs every later delivery (retries of earlier events included) with `new_secret`
        only; the old secrets stay listed in `secrets` for a receiver's overlap window."""
        if not new_secret:
            raise ValueError("empty signing secret")
        self._secrets = [new_secret, *(s for s in self._secrets if s != new_secret)]

    async def settled(self) -> None:
        """Returns once every queued webhook was delivered or given up (events waiting for a
        webhook_url are not queued yet). For tests: await this instead of sleeping."""
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def deliveries(self) -> list[WebhookDelivery]:
        """Every delivery attempt so far, in the order they finished."""
        return list(self._deliveries)

    @property
    def events(self) -> list[Event]:
        """Every event created so far (sent, being sent, or waiting), in creation order."""
        return list(self._events)

    async def resend(self, event_id: str) -> WebhookDelivery:
        """Delivers an existing event again, freshly timestamped and signed (the dashboard's
        "resend"), with the usual retries; returns the last attempt."""
        event = self._events_by_id.get(event_id)
        if event is None:
            raise ProviderError(f"no such event {event_id!r}")
        if not self._webhook_url:
            raise ProviderError("no webhook_url to resend to")
        return await self._spawn(self._redeliver(event))

    async def complete_pending(self, payment_id: str, succeed: bool) -> None:
        """Settles a `pm_card_pending` charge still processing: payment_intent.succeeded, or
        payment_intent.payment_failed with card_declined."""
        async with self._changing(payment_id) as payment:
            if payment is None or payment.is_checkout or payment.outcome != PENDING:
                raise ProviderError(f"no pending charge {payment_id!r}")
            if not payment.is_open:
                raise ProviderError(f"charge {payment_id!r} is no longer processing")
            if succeed:
                self._mark_paid(payment)
            else:
                self._fail(payment, "card_declined")

    # ---- PaymentProvider -------------------------------------------------------------------

    async def create_checkout(self, request: CheckoutRequest) -> CheckoutSession:
        """Opens a hosted checkout session; the same payment_order_id returns the same one."""
        existing = await self._state.find_by_order(request.payment_order_id, checkout=True)
        if existing is not None:
            return await self._existing_checkout(existing, request)
        await self._check_new_order(request.payment_order_id, request.org_id,
                                    request.amount_minor, request.currency)
        payment = _Payment(
            session_id=_new_id("cs"), payment_intent_id=_new_id("pi"),
            payment_order_id=request.payment_order_id, org_id=request.org_id,
            amount_minor=request.amount_minor, currency=request.currency.upper(),
            description=request.description, created_at=self._clock(),
            success_url=request.success_url, cancel_url=request.cancel_url)
        session = self._session_of(payment)  # raises before storing when there is no url
        stored = await self._state.add(payment, checkout=True)
        if stored is not payment and stored.session_id != payment.session_id:
            return await self._existing_checkout(stored, request)  # another replica's, first
        return session

    async def _existing_checkout(self, existing: _Payment, request: CheckoutRequest
                                 ) -> CheckoutSession:
        self._check_same_order(existing, request.org_id, request.amount_minor, request.currency)
        async with self._changing(existing.session_id) as payment:
            assert payment is not None
            self._expire_if_due(payment)
        return self._session_of(existing)

    async def charge(self, request: ChargeRequest) -> str:
        """Charges a saved test payment method off-session; idempotent on payment_order_id.
        The outcome is only ever a webhook, sent after this returns."""
        existing = await self._state.find_by_order(request.payment_order_id, checkout=False)
        if existing is not None:
            self._check_same_order(existing, request.org_id, request.amount_minor,
                                   request.currency, request.payment_method_id)
            return existing.session_id
        outcome = PAYMENT_METHODS.get(request.payment_method_id)
        if outcome is None:
            raise ProviderError(f"no such payment method {request.payment_method_id!r} "
                                f"(test methods: {', '.join(PAYMENT_METHODS)})")
        await self._check_new_order(request.payment_order_id, request.org_id,
                                    request.amount_minor, request.currency)
        payment_id = _new_id("pi")
        payment = _Payment(
            session_id=payment_id, payment_intent_id=payment_id,
            payment_order_id=request.payment_order_id, org_id=request.org_id,
            amount_minor=request.amount_minor, currency=request.currency.upper(),
            description=request.description, created_at=self._clock(),
            payment_method=request.payment_method_id, outcome=outcome)
        stored = await self._state.add(payment, checkout=False)
        if stored.session_id != payment_id:  # another replica charged this order first
            self._check_same_order(stored, request.org_id, request.amount_minor,
                                   request.currency, request.payment_method_id)
            return stored.session_id
        async with self._changing(payment_id) as locked:
            assert locked is not None
            if outcome == SUCCEEDS:
                self._mark_paid(locked)
            elif outcome != PENDING:
                self._fail(locked, outcome)
        return payment_id

    async def refund(self, session_id: str, amount_minor: int, idempotency_key: str
                     ) -> ProviderRefund:
        """Refunds part or all of a paid checkout (cs_) or succeeded charge (pi_); the same
        idempotency_key returns the same refund. Emits charge.refunded."""
        if not idempotency_key:
            raise ProviderError("refund needs an idempotency key")
        async with self._changing(session_id) as payment:
            return await self._refund(payment, session_id, amount_minor, idempotency_key)

    async def _refund(self, payment: _Payment | None, session_id: str, amount_minor: int,
                      idempotency_key: str) -> ProviderRefund:
        done = await self._state.refund_of(idempotency_key)
        if done is not None:
            if (done.session_id, done.refund.amount_minor) != (session_id, amount_minor):
                raise ProviderError(f"idempotency key {idempotency_key!r} was used for a "
                                    f"different refund")
            return done.refund
        if payment is None:
            raise ProviderError(f"no such payment {session_id!r}")
        if not payment.is_paid:
            raise ProviderError(f"payment {session_id!r} is not paid; nothing to refund")
        if amount_minor <= 0:
            raise ProviderError(f"refund amount must be positive, got {amount_minor}")
        refundable = payment.amount_minor - payment.amount_refunded
        if amount_minor > refundable:
            raise ProviderError(
                f"refund of {format_money(amount_minor, payment.currency)} exceeds what is "
                f"left to refund ({format_money(refundable, payment.currency)})")
        refund = ProviderRefund(refund_id=_new_id("re"), amount_minor=amount_minor)
        await self._state.add_refund(idempotency_key, _RefundRecord(session_id, refund))
        payment.amount_refunded += amount_minor
        self._emit("charge.refunded", {
            "id": payment.charge_id, "object": "charge",
            "amount": payment.amount_minor, "amount_refunded": payment.amount_refunded,
            "currency": payment.currency.lower(), "payment_intent": payment.payment_intent_id,
            "refunded": payment.amount_refunded == payment.amount_minor,
            "metadata": self._metadata(payment),
            "refund": {"id": refund.refund_id, "amount": amount_minor, "status": "succeeded"},
        })
        return refund

    def verify_webhook(self, payload: bytes, signature_header: str, secrets: Sequence[str],
                       now: int) -> None:
        """The kit's check of Stripe's format (t=..,v1=..), which this provider signs with."""
        signing.verify(signature_header, payload, secrets, now)

    def parse_event(self, payload: bytes) -> ProviderEvent:
        """Reads a (verified) webhook body into the ledger's terms; ValueError if it is not a
        well-formed event of this provider."""
        try:
            event = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"webhook body is not JSON: {exc}") from None
        if not isinstance(event, dict) or event.get("object") != "event":
            raise ValueError("webhook body is not an event object")
        event_id = _field(event, "id", str)
        event_type_name = _field(event, "type", str)
        created = _field(event, "created", int)
        data = _field(event, "data", dict)
        obj = _field(data, "object", dict)
        if not event_id.startswith("evt_"):
            raise ValueError(f"event id {event_id!r} is not an evt_ id")
        event_type = _EVENT_TYPES.get(event_type_name, ProviderEventType.OTHER)
        if event_type is ProviderEventType.OTHER:
            return ProviderEvent(event_id=event_id, type=event_type, payment_order_id="",
                                 session_id="", amount_minor=0, currency="", created=created)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError("object.metadata is not an object")
        order = obj.get("client_reference_id") or metadata.get("payment_order_id")
        if not isinstance(order, str) or not order:
            raise ValueError("event names no payment order (client_reference_id or "
                             "metadata.payment_order_id)")
        session_id = metadata.get("session_id") or obj.get("id")
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("event names no session (metadata.session_id or object.id)")
        if event_type_name == "charge.refunded":
            amount = _field(_field(obj, "refund", dict), "amount", int)
        elif event_type_name.startswith("checkout.session."):
            amount = _field(obj, "amount_total", int)
        else:
            amount = _field(obj, "amount", int)
        currency = _field(obj, "currency", str)
        if len(currency) != 3 or not currency.isalpha():
            raise ValueError(f"currency {currency!r} is not an ISO 4217 code")
        failure_reason = ""
        if event_type is ProviderEventType.PAYMENT_FAILED:
            error = _field(obj, "last_payment_error", dict)
            failure_reason = _field(error, "code", str)
        return ProviderEvent(event_id=event_id, type=event_type, payment_order_id=order,
                             session_id=session_id, amount_minor=amount,
                             currency=currency.upper(), failure_reason=failure_reason,
                             created=created)

    # ---- payments --------------------------------------------------------------------------

    async def _check_new_order(self, payment_order_id: str, org_id: str, amount_minor: int,
                               currency: str) -> None:
        if not payment_order_id:
            raise ProviderError("payment_order_id is empty")
        if not org_id:
            raise ProviderError("org_id is empty")
        if amount_minor <= 0:
            raise ProviderError(f"amount must be positive, got {amount_minor}")
        if len(currency) != 3 or not currency.isalpha():
            raise ProviderError(f"currency {currency!r} is not an ISO 4217 code")
        if await self._state.count() >= self.MAX_SESSIONS:
            raise ProviderError(f"the local provider holds {self.MAX_SESSIONS} sessions already")

    @staticmethod
    def _check_same_order(payment: _Payment, org_id: str, amount_minor: int, currency: str,
                          payment_method: str = "") -> None:
        # Stripe answers a reused Idempotency-Key with different parameters by an error too.
        if (payment.org_id, payment.amount_minor, payment.currency) != (
                org_id, amount_minor, currency.upper()) or (
                payment_method and payment_method != payment.payment_method):
            raise ProviderError(f"payment order {payment.payment_order_id!r} was already "
                                f"opened with different parameters")

    def _session_of(self, payment: _Payment) -> CheckoutSession:
        return CheckoutSession(session_id=payment.session_id,
                               url=f"{self.url}/checkout/{payment.session_id}")

    def _expire_if_due(self, payment: _Payment) -> None:
        if (payment.is_checkout and payment.is_open
                and self._clock() >= payment.created_at + self.session_ttl_s):
            self._expire(payment)

    def _expire(self, payment: _Payment) -> None:
        payment.is_closed = True
        payment.awaits_authentication = False
        self._emit("checkout.session.expired", self._session_object(payment))

    def _mark_paid(self, payment: _Payment) -> None:
        payment.is_paid = True
        payment.awaits_authentication = False
        payment.charge_id = _new_id("ch")
        if payment.is_checkout:
            self._emit("checkout.session.completed", self._session_object(payment))
        else:
            self._emit("payment_intent.succeeded", self._intent_object(payment))

    def _fail(self, payment: _Payment, code: str) -> None:
        """A failed payment attempt; a checkout stays open for another card."""
        payment.awaits_authentication = False
        if not payment.is_checkout:
            payment.is_closed = True
        self._emit("payment_intent.payment_failed", self._intent_object(payment, code))

    async def _expire_due(self) -> None:
        for session_id in await self._state.open_checkouts(self._clock() - self.session_ttl_s):
            async with self._changing(session_id) as payment:
                if payment is not None:
                    self._expire_if_due(payment)

    async def _sweep_forever(self) -> None:
        """Expires checkouts past their ttl every interval, and sends the events nobody is
        sending as their next attempts fall due: at once after a restart, then when the
        earliest pending retry is due (the interval covering events made meanwhile by
        replicas that died before their first attempt)."""
        loop = asyncio.get_running_loop()
        interval = min(self.SWEEP_INTERVAL_S, max(self.session_ttl_s, 0.1))
        next_expiry = loop.time() + interval
        while True:
            due: float | None = None
            try:
                await self._resume_due()
                if loop.time() >= next_expiry:
                    next_expiry = loop.time() + interval
                    await self._expire_due()
                due = await self._state.next_event_due()
            except Exception as exc:  # the database may be away for a while: try again soon
                log.warning("local_provider_sweep_failed", error=str(exc),
                            exc_info=not is_outage(exc))
                due = self._clock() + self.RESUME_RECHECK_S * 2
            wait = next_expiry - loop.time()
            if due is not None:
                wait = min(wait, max(due - self._clock(), self.RESUME_RECHECK_S))
            await asyncio.sleep(max(wait, 0.0))

    # ---- event objects (Stripe-shaped) -----------------------------------------------------

    @staticmethod
    def _metadata(payment: _Payment) -> dict[str, str]:
        return {"org_id": payment.org_id, "payment_order_id": payment.payment_order_id,
                "session_id": payment.session_id}

    def _session_object(self, payment: _Payment) -> dict[str, Any]:
        status = "complete" if payment.is_paid else "expired" if payment.is_closed else "open"
        return {
            "id": payment.session_id, "object": "checkout.session", "mode": "payment",
            "amount_total": payment.amount_minor, "currency": payment.currency.lower(),
            "client_reference_id": payment.payment_order_id,
            "payment_intent": payment.payment_intent_id if payment.is_paid else None,
            "payment_status": "paid" if payment.is_paid else "unpaid", "status": status,
            "success_url": payment.success_url or None, "cancel_url": payment.cancel_url or None,
            "metadata": self._metadata(payment),
        }

    def _intent_object(self, payment: _Payment, failure_code: str = "") -> dict[str, Any]:
        intent: dict[str, Any] = {
            "id": payment.payment_intent_id, "object": "payment_intent",
            "amount": payment.amount_minor,
            "amount_received": payment.amount_minor if payment.is_paid else 0,
            "currency": payment.currency.lower(), "description": payment.description,
            "payment_method": payment.payment_method or None,
            "status": "succeeded" if payment.is_paid else "requires_payment_method",
            "latest_charge": payment.charge_id or None,
            "metadata": self._metadata(payment), "last_payment_error": None,
        }
        if failure_code:
            intent["last_payment_error"] = {
                "code": failure_code, "type": "card_error",
                "message": _DECLINE_MESSAGES.get(failure_code, "The payment failed.")}
        return intent

    # ---- webhooks --------------------------------------------------------------------------

    def _emit(self, event_type: str, obj: dict[str, Any]) -> Event:
        outbox = _OUTBOX.get()
        if outbox is None:
            raise RuntimeError("an event is emitted only by a payment change (_changing)")
        event: Event = {"id": _new_id("evt"), "object": "event", "type": event_type,
                        "created": int(self._clock()), "livemode": False,
                        "data": {"object": obj}}
        outbox.append(event)
        return event

    def _publish(self, event: Event) -> None:
        self._events.append(event)
        self._events_by_id[event["id"]] = event
        if self._webhook_url:
            self._spawn(self._deliver(event))
        else:
            self._unsent.append(event)

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery crashed", exc_info=task.exception())

    async def _deliver(self, event: Event, *, is_redelivery: bool = False
                       ) -> WebhookDelivery | None:
        """Sends one event until a 2xx answer or max_attempts; chaos may hold it back first
        or send it once more after. None when another replica had the event's turn."""
        if not is_redelivery and self._random.random() < self.reorder_rate:
            await asyncio.sleep(self._random.uniform(0.0, self.retry_first_s))
        if is_redelivery:
            last: WebhookDelivery | None = await self._redeliver(event)
        else:
            self._sending.add(event["id"])
            try:
                last = await self._attempts(event)
            finally:
                self._sending.discard(event["id"])
        if (last is not None and last.delivered and not is_redelivery
                and self._random.random() < self.duplicate_rate):
            await self._redeliver(event)
        return last

    async def _attempts(self, event: Event) -> WebhookDelivery | None:
        """The event's attempts from here on, each one claimed in the state first: the
        record of how many came before and when the next is due is shared by the replicas
        (in PostgreSQL), so a retry left by a dead replica continues its count."""
        body = json.dumps(event, separators=(",", ":")).encode()
        last: WebhookDelivery | None = None
        planned_at = 0.0  # when this loop set its next attempt (a sleep may end a hair early)
        outage_retries = 0
        while True:
            now = max(self._clock(), planned_at)
            try:
                async with self._state.attempting(event["id"], now) as turn:
                    if turn is None:  # delivered, or another replica's turn
                        return last
                    attempt = turn.attempts_before + 1
                    status, error = await self._post(body)
                    turn.delivered = status is not None and 200 <= status < 300
                    turn.gave_up = not turn.delivered and attempt >= self.max_attempts
                    delay = self._backoff_s(attempt)
                    turn.next_attempt_at = planned_at = self._clock() + delay
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # the record of the attempt is lost with the database: the event is still
                # pending there, so try again (a second delivery is deduplicated)
                outage_retries += 1
                log.warning("webhook_attempt_unrecorded", event_id=event["id"], error=str(exc))
                await asyncio.sleep(self._backoff_s(outage_retries))
                continue
            last = self._record(event, attempt, status, error, turn.delivered, turn.gave_up,
                                is_redelivery=False)
            if turn.delivered or turn.gave_up:
                return last
            await asyncio.sleep(delay)

    async def _redeliver(self, event: Event) -> WebhookDelivery:
        """A chaos duplicate or a `resend`: the event once more, with the usual retries,
        outside its record (it was delivered already, or is being sent anyway)."""
        body = json.dumps(event, separators=(",", ":")).encode()
        attempt = 0
        while True:
            attempt += 1
            status, error = await self._post(body)
            delivered = status is not None and 200 <= status < 300
            gave_up = not delivered and attempt >= self.max_attempts
            last = self._record(event, attempt, status, error, delivered, gave_up,
                                is_redelivery=True)
            if delivered or gave_up:
                return last
            await asyncio.sleep(self._backoff_s(attempt))

    def _record(self, event: Event, attempt: int, status: int | None, error: str,
                delivered: bool, gave_up: bool, *, is_redelivery: bool) -> WebhookDelivery:
        record = WebhookDelivery(event_id=event["id"], event_type=event["type"],
                                 attempt=attempt, status=status, error=error,
                                 delivered=delivered, gave_up=gave_up,
                                 is_redelivery=is_redelivery)
        self._deliveries.append(record)
        if gave_up:
            log.warning("webhook given up", event_id=event["id"], event_type=event["type"],
                        attempts=attempt, last_error=error)
        return record

    async def _resume_due(self) -> None:
        """Sends the events whose next attempt is due and that nobody here is sending: what
        a crashed replica (this one's previous life included) left behind."""
        if not self._webhook_url:
            return
        for event in await self._state.due_events(self._clock(), self.RESUME_BATCH):
            if event["id"] not in self._sending:
                self._spawn(self._deliver(event))

    def _backoff_s(self, attempt: int) -> float:
        # Exponential with "equal jitter": at least half the step, so retries of many events
        # spread out without ever retrying immediately.
        step = min(self.retry_max_s, self.retry_first_s * 2.0 ** (attempt - 1))
        return step / 2 + self._random.uniform(0.0, step / 2)

    async def _post(self, body: bytes) -> tuple[int | None, str]:
        url = self._webhook_url
        if not url:
            return None, "no webhook_url"
        headers = {"Content-Type": "application/json",
                   self.SIGNATURE_HEADER: signing.sign(self._secrets[:1], int(self._clock()),
                                                       body)}
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._client.post(url, data=body, headers=headers) as reply:
                await reply.read()
                if 200 <= reply.status < 300:
                    return reply.status, ""
                return reply.status, f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]

    # ---- hosted checkout pages -------------------------------------------------------------

    @asynccontextmanager
    async def _checkout_for(self, request: web.Request) -> AsyncIterator[_Payment | None]:
        """The checkout a page is for (None if there is none), held until the page is
        answered: pages of two replicas acting on one checkout take turns."""
        async with self._changing(request.match_info["session_id"]) as payment:
            if payment is None or not payment.is_checkout:
                yield None
                return
            self._expire_if_due(payment)
            yield payment

    def _complete_path(self, payment: _Payment) -> str:
        return f"/checkout/{payment.session_id}/complete"

    async def _page_checkout(self, request: web.Request) -> web.StreamResponse:
        async with self._checkout_for(request) as payment:
            if payment is None:
                return _not_found()
            if payment.is_paid:
                return _paid_page(payment)
            if payment.is_closed:
                return _expired_page()
            return _checkout_page(payment)

    async def _page_pay(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        async with self._checkout_for(request) as payment:
            if payment is None:
                return _not_found()
            if payment.is_paid:  # a second submit never charges twice
                raise web.HTTPSeeOther(self._complete_path(payment))
            if payment.is_closed:
                return _expired_page()
            fields = {key: str(form.get(key, ""))
                      for key in ("card_number", "expiry", "cvc", "name")}
            problem = self._form_problem(fields)
            if problem:
                # never the CVC
                kept = {key: fields[key] for key in ("card_number", "expiry", "name")}
                return _checkout_page(payment, error=problem, fields=kept, status=422)
            number = "".join(fields["card_number"].split())
            outcome = next((card.outcome for card in TEST_CARDS if card.number == number),
                           "not_a_test_card")
            payment.payment_method = f"card_{number[-4:]}"
            if outcome == SUCCEEDS:
                self._paid_redirect(payment)
            if outcome == AUTHENTICATION_REQUIRED:
                payment.awaits_authentication = True
                raise web.HTTPSeeOther(f"/checkout/{payment.session_id}/authenticate")
            code = "card_declined" if outcome == "not_a_test_card" else outcome
            self._fail(payment, code)
            why = f"{_DECLINE_MESSAGES[outcome]} ({code})"
            return _checkout_page(payment, error=why, fields={"name": fields["name"]},
                                  status=402)

    def _authenticating(self, payment: _Payment | None) -> _Payment | web.StreamResponse:
        """The payment an authentication page is for, or the answer when there is none: not
        found, or a redirect to where the payment stands."""
        if payment is None:
            return _not_found()
        if payment.is_paid:
            raise web.HTTPSeeOther(self._complete_path(payment))
        if not payment.awaits_authentication:
            raise web.HTTPSeeOther(f"/checkout/{payment.session_id}")
        return payment

    async def _page_authenticate(self, request: web.Request) -> web.StreamResponse:
        async with self._checkout_for(request) as found:
            payment = self._authenticating(found)
            if isinstance(payment, web.StreamResponse):
                return payment
            return _authenticate_page(payment)

    async def _page_authenticate_answer(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        async with self._checkout_for(request) as found:
            payment = self._authenticating(found)
            if isinstance(payment, web.StreamResponse):
                return payment
            action = form.get("action")
            if action == "approve":
                self._paid_redirect(payment)
            if action == "fail":
                self._fail(payment, "authentication_failed")
                why = f"{_DECLINE_MESSAGES['authentication_failed']} (authentication_failed)"
                return _checkout_page(payment, error=why, status=402)
            return _authenticate_page(payment, status=400)

    async def _page_cancel(self, request: web.Request) -> web.StreamResponse:
        async with self._checkout_for(request) as payment:
            if payment is None:
                return _not_found()
            if payment.is_paid:
                raise web.HTTPSeeOther(self._complete_path(payment))
            if payment.is_open:
                self._expire(payment)
            raise web.HTTPSeeOther(payment.cancel_url or f"/checkout/{payment.session_id}")

    async def _page_complete(self, request: web.Request) -> web.StreamResponse:
        async with self._checkout_for(request) as payment:
            if payment is None:
                return _not_found()
            if not payment.is_paid:
                raise web.HTTPSeeOther(f"/checkout/{payment.session_id}")
            return _paid_page(payment)

    def _paid_redirect(self, payment: _Payment) -> NoReturn:
        self._mark_paid(payment)
        target = payment.success_url.replace("{CHECKOUT_SESSION_ID}", payment.session_id)
        raise web.HTTPSeeOther(target or self._complete_path(payment))

    def _form_problem(self, fields: dict[str, str]) -> str:
        """What is wrong with the card form, "" when nothing is."""
        number = "".join(fields["card_number"].split())
        if not number.isdigit() or not 12 <= len(number) <= 19:
            return "Your card number is incomplete or not a number."
        if not luhn_ok(number):
            return "Your card number is invalid."
        month_text, slash, year_text = "".join(fields["expiry"].split()).partition("/")
        if (not slash or not month_text.isdigit() or not year_text.isdigit()
                or len(year_text) not in (2, 4) or not 1 <= int(month_text) <= 12):
            return "Your card's expiry date must be MM/YY."
        year = int(year_text) + (2000 if len(year_text) == 2 else 0)
        today = datetime.fromtimestamp(self._clock(), UTC)
        if (year, int(month_text)) < (today.year, today.month):
            return "Your card's expiry date is in the past."
        cvc = fields["cvc"].strip()
        if not cvc.isdigit() or not 3 <= len(cvc) <= 4:
            return "Your card's security code (CVC) must be 3 or 4 digits."
        if not fields["name"].strip():
            return "Enter the name on the card."
        return ""


if TYPE_CHECKING:  # mypy proves the class satisfies the protocol the ledger uses
    _conforms: PaymentProvider = LocalProvider(secrets=["x"])


def _field(container: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = container.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"event field {key!r} is missing or not a {kind.__name__}")
    return value


# ---- HTML ------------------------------------------------------------------------------------

_CSS: Final = """
body{font-family:system-ui,sans-serif;background:#f6f8fa;color:#1f2328;margin:0}
main{max-width:26rem;margin:2rem auto;background:#fff;padding:1.5rem 2rem;border-radius:8px;
box-shadow:0 1px 3px #0002}
.test{background:#fff8c5;padding:.4rem .6rem;border-radius:4px;font-size:.85rem}
.amount{font-size:1.6rem;font-weight:600;margin:.2rem 0 1rem}
label{display:block;font-size:.9rem;margin:.8rem 0 .2rem}
input{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem;border:1px solid #d0d7de;
border-radius:4px}
button{width:100%;padding:.7rem;margin-top:1rem;font-size:1rem;border:0;border-radius:4px;
background:#0969da;color:#fff;cursor:pointer}
button.secondary{background:#eaeef2;color:#1f2328}
#error{background:#ffebe9;color:#82071e;padding:.5rem;border-radius:4px}
#paid{color:#1a7f37;font-size:1.3rem;font-weight:600}
table{width:100%;font-size:.85rem;border-collapse:collapse}td{padding:.2rem 0}
code{font-family:ui-monospace,monospace}
"""


def _html(title: str, body: str, status: int = 200) -> web.Response:
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{body}</main></body></html>")
    return web.Response(status=status, text=page, content_type="text/html")


def _banner() -> str:
    return '<p class="test">Test mode (Tally local provider): no real money moves.</p>'


def _summary(payment: _Payment) -> str:
    amount = format_money(payment.amount_minor, payment.currency)
    return (f'<p id="description">{html.escape(payment.description)}</p>'
            f'<p class="amount" id="amount">{html.escape(amount)}</p>')


def _checkout_page(payment: _Payment, *, error: str = "", fields: dict[str, str] | None = None,
                   status: int = 200) -> web.Response:
    values = fields or {}
    sid = html.escape(payment.session_id)
    amount = html.escape(format_money(payment.amount_minor, payment.currency))

    def field(name: str, input_id: str, label: str, extra: str) -> str:
        value = html.escape(values.get(name, ""))
        return (f'<label for="{input_id}">{label}</label>'
                f'<input id="{input_id}" name="{name}" value="{value}" required {extra}>')

    cards = "".join(f"<tr><td><code>{' '.join(c.number[i:i + 4] for i in range(0, 16, 4))}"
                    f"</code></td><td>{html.escape(c.label)}</td></tr>" for c in TEST_CARDS)
    body = (
        f"{_banner()}<h1>Checkout</h1>{_summary(payment)}"
        + (f'<p id="error" role="alert">{html.escape(error)}</p>' if error else "")
        + f'<form method="post" action="/checkout/{sid}/pay">'
        + field("card_number", "card-number", "Card number",
                'inputmode="numeric" autocomplete="cc-number" placeholder="4242 4242 4242 4242"')
        + field("expiry", "expiry", "Expiry (MM/YY)", 'autocomplete="cc-exp" placeholder="MM/YY"')
        + field("cvc", "cvc", "CVC", 'inputmode="numeric" autocomplete="cc-csc" placeholder="123"')
        + field("name", "name", "Name on card", 'autocomplete="cc-name"')
        + f'<button id="pay" type="submit">Pay {amount}</button></form>'
        + f'<form method="post" action="/checkout/{sid}/cancel">'
        + '<button id="cancel" type="submit" class="secondary">Cancel</button></form>'
        + '<h2>Test cards</h2><table id="test-cards">' + cards + "</table>"
        + "<p>Any future expiry, any 3-digit CVC and any name.</p>"
    )
    return _html(f"Pay {format_money(payment.amount_minor, payment.currency)}", body, status)


def _authenticate_page(payment: _Payment, status: int = 200) -> web.Response:
    sid = html.escape(payment.session_id)
    body = (
        f"{_banner()}<h1>Authenticate this payment</h1>{_summary(payment)}"
        "<p>Your bank asks you to confirm this payment (a simulated 3-D Secure step).</p>"
        f'<form method="post" action="/checkout/{sid}/authenticate">'
        '<button id="authenticate-approve" type="submit" name="action" value="approve">'
        "Complete authentication</button>"
        '<button id="authenticate-fail" type="submit" name="action" value="fail" '
        'class="secondary">Fail authentication</button></form>'
    )
    return _html("Authenticate payment", body, status)


def _paid_page(payment: _Payment) -> web.Response:
    amount = html.escape(format_money(payment.amount_minor, payment.currency))
    body = (f"{_banner()}<h1>Thank you</h1>"
            f'<p id="paid">Payment received: {amount}</p>'
            f'<p id="description">{html.escape(payment.description)}</p>')
    return _html("Payment received", body)


def _expired_page() -> web.Response:
    body = (f"{_banner()}<h1>Checkout expired</h1>"
            '<p id="expired">This checkout session has expired or was canceled.</p>')
    return _html("Checkout expired", body, status=410)


def _not_found() -> web.Response:
    body = f'{_banner()}<h1>Not found</h1><p id="not-found">No such checkout session.</p>'
    return _html("Checkout not found", body, status=404)
