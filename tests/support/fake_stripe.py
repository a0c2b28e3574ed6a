"""A local HTTP fake of exactly the Stripe endpoints StripeProvider uses, for its tests.

Endpoints (form-encoded requests as stripe-python sends them, JSON answers shaped as in
Stripe's OpenAPI spec: checkout.session, payment_intent, payment_method, refund, error):

    POST /v1/checkout/sessions          GET /v1/checkout/sessions/{id}
    POST /v1/payment_intents            GET /v1/payment_methods/{id}
    POST /v1/refunds

It checks the Bearer key, replays a write whose Idempotency-Key it has seen (same answer,
`Idempotent-Replayed: true`) and refuses the key reused with other parameters (400,
idempotency_error), as Stripe does. `fail_next` queues error answers (a 429, a 5xx) for a path.
Events (checkout.session.completed, payment_intent.succeeded / payment_failed,
charge.refunded) are kept in `events`; `deliver` POSTs one to a webhook URL signed like
Stripe: `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

Saved payment methods, by Stripe's test names: pm_card_visa succeeds;
pm_card_chargeDeclined (card_declined), pm_card_chargeDeclinedInsufficientFunds
(card_declined / insufficient_funds) and pm_card_authenticationRequired
(authentication_required) are declined at confirmation with a 402 card error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

SECRET_KEY = "sk_test_tally_fake_0000000000000000"
WEBHOOK_SECRET = "whsec_tally_fake_signing_secret_0001"

PAYMENT_METHODS: dict[str, tuple[str, str]] = {
    "pm_card_visa": ("", ""),
    "pm_card_chargeDeclined": ("card_declined", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds"),
    "pm_card_authenticationRequired": ("authentication_required", ""),
}
"""Payment method -> (error code, decline code) of its off-session confirmation; ("", "")
succeeds."""
_MESSAGES = {
    "card_declined": "Your card was declined.",
    "authentication_required": "Your card was declined. This transaction requires "
                               "authentication.",
}
CUSTOMER = "cus_TallyFake0001"


def _id(prefix: str) -> str:
    return f"{prefix}_test_{uuid.uuid4().hex[:24]}"


def decode_form(pairs: Any) -> dict[str, Any]:
    """`a[b][0][c]=v` form keys (stripe-python's encoding) into nested dicts; list indexes
    stay string keys ("0", "1", ...)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        path = key.replace("]", "").split("[")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@dataclass
class Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str


class FakeStripe:
    """The fake's state and its aiohttp server (start() binds 127.0.0.1 on a free port)."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.intents: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.requests: list[Request] = []
        self._replies: dict[str, tuple[str, int, dict[str, Any]]] = {}  # by idempotency key
        self._failures: dict[str, list[Failure]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([
            web.post("/v1/checkout/sessions", self._create_session),
            web.get("/v1/checkout/sessions/{id}", self._get_session),
            web.post("/v1/payment_intents", self._create_intent),
            web.get("/v1/payment_methods/{id}", self._get_method),
            web.post("/v1/refunds", self._create_refund),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- what tests do ----------------------------------------------------------------------

    def fail_next(self, path: str, status: int, error: dict[str, Any], times: int = 1,
                  headers: dict[str, str] | None = None) -> None:
        """The next `times` requests to `path` answer `status` with {"error": error}."""
        self._failures.setdefault(path, []).extend(
            Failure(status, {"error": error}, headers or {}) for _ in range(times))

    def writes(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def complete_checkout(self, session_id: str) -> dict[str, Any]:
        """The customer paid on Stripe's page: the session completes, its payment intent
        succeeds; returns the checkout.session.completed event (also queued in `events`)."""
        session = self.sessions[session_id]
        intent = self._intent(session["amount_total"], session["currency"],
                              session["payment_intent_data_metadata"], "pm_card_visa")
        intent.update(status="succeeded", amount_received=intent["amount"],
                      latest_charge=_id("ch"))
        session.update(status="complete", payment_status="paid", payment_intent=intent["id"])
        completed = self._emit("checkout.session.completed", _public(session))
        self._emit("payment_intent.succeeded", intent)
        return completed

    def event(self, event_type: str, object_id: str) -> dict[str, Any]:
        """The last event of a type about an object."""
        for event in reversed(self.events):
            if event["type"] == event_type and event["data"]["object"]["id"] == object_id:
                return event
        raise AssertionError(f"no {event_type} about {object_id}")

    async def deliver(self, event: dict[str, Any], url: str, *,
                      secret: str = WEBHOOK_SECRET, timestamp: int | None = None,
                      signature: str | None = None) -> tuple[int, dict[str, Any]]:
        """POSTs `event` to `url` as Stripe would (or with another secret, time or header)."""
        body = json.dumps(event, indent=2).encode()  # Stripe sends pretty-printed JSON
        header = signature if signature is not None else sign(body, secret, timestamp)
        async with aiohttp.ClientSession() as http, http.post(
                url, data=body, headers={"Content-Type": "application/json; charset=utf-8",
                                         "Stripe-Signature": header}) as reply:
            return reply.status, await reply.json()

    # ---- the API ----------------------------------------------------------------------------

    async def _admit(self, request: web.Request) -> tuple[dict[str, Any], str] | web.Response:
        """Authenticates, records, and answers a queued failure or an idempotent replay."""
        params = decode_form((await request.post()).items()) if request.method == "POST" else {}
        key = request.headers.get("Idempotency-Key", "")
        self.requests.append(Request(request.method, request.path, params, key))
        if request.headers.get("Authorization") != f"Bearer {SECRET_KEY}":
            return _error(401, {"type": "invalid_request_error",
                                "message": "Invalid API Key provided: sk_test_****"})
        queued = self._failures.get(request.path)
        if queued:
            failure = queued.pop(0)
            return web.json_response(failure.body, status=failure.status,
                                     headers=failure.headers)
        if key and key in self._replies:
            fingerprint, status, body = self._replies[key]
            if fingerprint != _fingerprint(request.path, params):
                return _error(400, {
                    "type": "idempotency_error",
                    "message": "Keys for idempotent requests can only be used with the same "
                               "parameters they were first used with."})
            return web.json_response(body, status=status,
                                     headers={"Idempotent-Replayed": "true"})
        return params, key

    def _remember(self, key: str, path: str, params: dict[str, Any], status: int,
                  body: dict[str, Any]) -> web.Response:
        if key:
            self._replies[key] = (_fingerprint(path, params), status, body)
        return web.json_response(body, status=status)

    async def _create_session(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        params, key = admitted
        line = params["line_items"]["0"]
        price = line["price_data"]
        amount = int(price["unit_amount"]) * int(line.get("quantity", "1"))
        session_id = _id("cs")
        now = int(time.time())
        session = {
            "id": session_id, "object": "checkout.session", "after_expiration": None,
            "allow_promotion_codes": None, "amount_subtotal": amount, "amount_total": amount,
            "automatic_tax": {"enabled": False, "liability": None, "status": None},
            "billing_address_collection": None, "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"), "client_secret": None,
            "consent": None, "consent_collection": None, "created": now,
            "currency": price["currency"], "currency_conversion": None, "custom_fields": [],
            "custom_text": {"after_submit": None, "shipping_address": None, "submit": None,
                            "terms_of_service_acceptance": None},
            "customer": None, "customer_creation": "if_required", "customer_details": None,
            "customer_email": None, "expires_at": now + 86400, "invoice": None,
            "livemode": False, "locale": None, "metadata": params.get("metadata", {}),
            "mode": params["mode"], "payment_intent": None, "payment_link": None,
            "payment_method_collection": "if_required", "payment_method_types": ["card"],
            "payment_status": "unpaid", "setup_intent": None, "shipping_address_collection": None,
            "shipping_cost": None, "shipping_details": None, "shipping_options": [],
            "status": "open", "submit_type": None, "subscription": None,
            "success_url": params.get("success_url"), "total_details": {
                "amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "payment_intent_data_metadata": params.get("payment_intent_data", {}).get(
                "metadata", {}),
        }
        self.sessions[session_id] = session
        return self._remember(key, request.path, params, 200, _public(session))

    async def _get_session(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _missing("checkout.session", request.match_info["id"])
        return web.json_response(_public(session))

    async def _get_method(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        method_id = request.match_info["id"]
        if method_id not in PAYMENT_METHODS:
            return _missing("payment_method", method_id)
        return web.json_response({
            "id": method_id, "object": "payment_method", "allow_redisplay": "unspecified",
            "billing_details": {"address": None, "email": None, "name": None, "phone": None},
            "card": {"brand": "visa", "country": "US", "exp_month": 12, "exp_year": 2034,
                     "funding": "credit", "last4": "4242"},
            "created": int(time.time()), "customer": CUSTOMER, "livemode": False,
            "metadata": {}, "type": "card"})

    async def _create_intent(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        params, key = admitted
        method = params.get("payment_method", "")
        intent = self._intent(int(params["amount"]), params["currency"],
                              params.get("metadata", {}), method)
        intent.update(customer=params.get("customer"), description=params.get("description"),
                      confirmation_method="automatic")
        code, decline_code = PAYMENT_METHODS.get(method, ("", ""))
        if code:
            error = {"type": "card_error", "code": code, "message": _MESSAGES[code],
                     "doc_url": f"https://stripe.com/docs/error-codes/{code}",
                     "payment_method": {"id": method, "object": "payment_method"}}
            if decline_code:
                error["decline_code"] = decline_code
            intent.update(status="requires_payment_method", last_payment_error=error,
                          payment_method=None)
            self._emit("payment_intent.payment_failed", intent)
            body = {"error": {**error, "charge": _id("ch"), "payment_intent": _public(intent)}}
            return self._remember(key, request.path, params, 402, body)
        intent.update(status="succeeded", amount_received=intent["amount"],
                      latest_charge=_id("ch"))
        self._emit("payment_intent.succeeded", intent)
        return self._remember(key, request.path, params, 200, _public(intent))

    async def _create_refund(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        params, key = admitted
        intent = self.intents.get(params.get("payment_intent", ""))
        if intent is None or intent["status"] != "succeeded":
            return _error(400, {"type": "invalid_request_error", "code": "resource_missing",
                                "param": "payment_intent",
                                "message": "No such payment_intent"})
        amount = int(params.get("amount", intent["amount"] - intent["amount_refunded"]))
        if amount > intent["amount"] - intent["amount_refunded"]:
            return _error(400, {"type": "invalid_request_error",
                                "code": "charge_already_refunded", "param": "amount",
                                "message": "Refund amount is greater than unrefunded amount"})
        intent["amount_refunded"] += amount
        refund = {
            "id": _id("re"), "object": "refund", "amount": amount,
            "balance_transaction": _id("txn"), "charge": intent["latest_charge"],
            "created": int(time.time()), "currency": intent["currency"],
            "destination_details": {"card": {"type": "refund"}, "type": "card"},
            "metadata": {}, "payment_intent": intent["id"], "reason": None,
            "receipt_number": None, "source_transfer_reversal": None, "status": "succeeded",
            "transfer_reversal": None,
        }
        self.refunds[refund["id"]] = refund
        self._emit("charge.refunded", {
            "id": intent["latest_charge"], "object": "charge", "amount": intent["amount"],
            "amount_captured": intent["amount"], "amount_refunded": intent["amount_refunded"],
            "captured": True, "currency": intent["currency"], "metadata": intent["metadata"],
            "paid": True, "payment_intent": intent["id"],
            "refunded": intent["amount_refunded"] == intent["amount"], "status": "succeeded"})
        return self._remember(key, request.path, params, 200, refund)

    # ---- objects ----------------------------------------------------------------------------

    def _intent(self, amount: int, currency: str, metadata: dict[str, Any], method: str
                ) -> dict[str, Any]:
        intent = {
            "id": _id("pi"), "object": "payment_intent", "amount": amount,
            "amount_capturable": 0, "amount_details": {"tip": {}}, "amount_received": 0,
            "application": None, "application_fee_amount": None,
            "automatic_payment_methods": None, "canceled_at": None,
            "cancellation_reason": None, "capture_method": "automatic",
            "client_secret": None, "confirmation_method": "automatic",
            "created": int(time.time()), "currency": currency, "customer": None,
            "description": None, "last_payment_error": None, "latest_charge": None,
            "livemode": False, "metadata": dict(metadata), "next_action": None,
            "on_behalf_of": None, "payment_method": method or None,
            "payment_method_types": ["card"], "processing": None, "receipt_email": None,
            "setup_future_usage": None, "shipping": None, "statement_descriptor": None,
            "status": "requires_confirmation", "transfer_data": None, "transfer_group": None,
        }
        intent["amount_refunded"] = 0  # the fake's own bookkeeping (not sent: see _public)
        self.intents[intent["id"]] = intent
        return intent

    def _emit(self, event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
        event = {
            "id": _id("evt"), "object": "event", "api_version": "2025-09-30.clover",
            "created": int(time.time()), "data": {"object": _public(obj)}, "livemode": False,
            "pending_webhooks": 1, "request": {"id": _id("req"), "idempotency_key": None},
            "type": event_type,
        }
        self.events.append(event)
        return event


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as Stripe shows it (without the fake's own bookkeeping fields)."""
    return {k: v for k, v in obj.items()
            if k not in ("payment_intent_data_metadata", "amount_refunded")
            or obj.get("object") == "charge"}


def _fingerprint(path: str, params: dict[str, Any]) -> str:
    return path + json.dumps(params, sort_keys=True)


def _error(status: int, error: dict[str, Any]) -> web.Response:
    return web.json_response({"error": error}, status=status)


def _missing(kind: str, object_id: str) -> web.Response:
    return _error(404, {"type": "invalid_request_error", "code": "resource_missing",
                        "param": "id", "message": f"No such {kind}: '{object_id}'"})
