"""StripeProvider: the production payment provider, Stripe through stripe-python.

The ledger's provider seam (provider.py) was shaped after Stripe, so this is a translation:

| PaymentProvider | Stripe                                                                  |
|-----------------|-------------------------------------------------------------------------|
| create_checkout | POST /v1/checkout/sessions (mode=payment, one price_data line in minor  |
|                 | units, client_reference_id and metadata.payment_order_id = the order)   |
| charge          | GET /v1/payment_methods/{pm} (its customer), then POST                  |
|                 | /v1/payment_intents with confirm=true, off_session=true                 |
| refund          | GET /v1/checkout/sessions/{cs} (its payment_intent) for a checkout, then|
|                 | POST /v1/refunds (payment_intent, amount)                               |
| verify_webhook  | stripe.Webhook.construct_event under the Stripe-Signature header        |
| parse_event     | checkout.session.completed (paid) / async_payment_succeeded,            |
|                 | payment_intent.succeeded -> PAYMENT_SUCCEEDED; payment_intent.          |
|                 | payment_failed, checkout.session.async_payment_failed -> PAYMENT_FAILED;|
|                 | checkout.session.expired -> CHECKOUT_EXPIRED; charge.refunded           |
|                 | -> REFUND_SUCCEEDED; anything else -> OTHER (acknowledged)              |

Every write carries an Idempotency-Key derived from our own id (`checkout:<order>`,
`charge:<order>`, `refund:<refund id>`), so a ledger retry after a timeout, a crash between the
call and its bookkeeping, or stripe-python's own network retries never open a second session,
charge twice or refund twice. Amounts are integers in the currency's minor unit, as Stripe
takes them. Errors: a card error (decline, authentication required) is a refusal with Stripe's
code (`card_declined`, `insufficient_funds`, ...); a rate limit, a 5xx or no answer is
ProviderUnavailable (retryable, nothing happened that the key would not replay); anything else
(a bad request, a bad key) is a refusal with the error's code.

The secret key and the webhook signing secrets come from the ledger's config (the environment
or a mounted file) and are never logged; only their last four characters appear, in repr().
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import stripe

from tally.kit import signing
from tally.kit.log import get_logger

from .provider import (
    ChargeRequest,
    CheckoutRequest,
    CheckoutSession,
    PaymentProvider,
    ProviderError,
    ProviderEvent,
    ProviderEventType,
    ProviderRefund,
    ProviderUnavailable,
)

log = get_logger("ledger.payments.stripe")

_EVENT_TYPES: Final = {
    "checkout.session.completed": ProviderEventType.PAYMENT_SUCCEEDED,
    "checkout.session.async_payment_succeeded": ProviderEventType.PAYMENT_SUCCEEDED,
    "checkout.session.async_payment_failed": ProviderEventType.PAYMENT_FAILED,
    "checkout.session.expired": ProviderEventType.CHECKOUT_EXPIRED,
    "payment_intent.succeeded": ProviderEventType.PAYMENT_SUCCEEDED,
    "payment_intent.payment_failed": ProviderEventType.PAYMENT_FAILED,
    "charge.refunded": ProviderEventType.REFUND_SUCCEEDED,
}


class StripeProvider:
    """The PaymentProvider for Stripe. `api_base` points stripe-python elsewhere (tests)."""

    SIGNATURE_HEADER: Final = "Stripe-Signature"

    name = "stripe"
    signature_header = SIGNATURE_HEADER

    def __init__(self, secret_key: str, *, success_url: str, cancel_url: str = "",
                 api_base: str = "", max_network_retries: int = 2,
                 timeout_s: float = 30.0, tolerance_s: int = signing.TOLERANCE_S) -> None:
        if not secret_key:
            raise ValueError("StripeProvider needs a secret key")
        if not success_url:
            raise ValueError("StripeProvider needs a success_url for its checkout pages")
        self._key_hint = secret_key[-4:]
        self.success_url = success_url
        self.cancel_url = cancel_url
        self.tolerance_s = tolerance_s
        self._http = stripe.AIOHTTPClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=max_network_retries,
            http_client=self._http,
        )

    def __repr__(self) -> str:
        return f"StripeProvider(key=...{self._key_hint})"

    async def stop(self) -> None:
        """Closes the HTTP session stripe-python opened."""
        await self._http.close_async()  # type: ignore[no-untyped-call]

    # ---- PaymentProvider -------------------------------------------------------------------

    async def create_checkout(self, request: CheckoutRequest) -> CheckoutSession:
        metadata = {"payment_order_id": request.payment_order_id, "org_id": request.org_id}
        params: dict[str, Any] = {
            "mode": "payment",
            "client_reference_id": request.payment_order_id,
            "line_items": [{
                "quantity": 1,
                "price_data": {"currency": request.currency.lower(),
                               "unit_amount": request.amount_minor,
                               "product_data": {"name": request.description}},
            }],
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata, "description": request.description},
            "success_url": request.success_url or self.success_url,
        }
        cancel_url = request.cancel_url or self.cancel_url
        if cancel_url:
            params["cancel_url"] = cancel_url
        session = await self._call(
            "create checkout session",
            self._client.v1.checkout.sessions.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": f"checkout:{request.payment_order_id}"}))
        if not session.url:
            raise ProviderError(f"checkout session {session.id} has no url")
        return CheckoutSession(session_id=session.id, url=session.url)

    async def charge(self, request: ChargeRequest) -> str:
        """Confirms a PaymentIntent off-session with the saved method. Stripe answers a
        decline at once (402, a card error): that is raised as a refusal with its code."""
        method = await self._call(
            "look up payment method",
            self._client.v1.payment_methods.retrieve_async(request.payment_method_id))
        params: dict[str, Any] = {
            "amount": request.amount_minor,
            "currency": request.currency.lower(),
            "payment_method": request.payment_method_id,
            "confirm": True,
            "off_session": True,
            "description": request.description,
            "metadata": {"payment_order_id": request.payment_order_id,
                         "org_id": request.org_id},
        }
        customer = method.customer
        if customer:
            params["customer"] = customer if isinstance(customer, str) else customer.id
        intent = await self._call(
            "create payment intent",
            self._client.v1.payment_intents.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": f"charge:{request.payment_order_id}"}))
        return str(intent.id)

    async def refund(self, session_id: str, amount_minor: int, idempotency_key: str
                     ) -> ProviderRefund:
        if not idempotency_key:
            raise ProviderError("refund needs an idempotency key")
        payment_intent = session_id
        if session_id.startswith("cs_"):
            session = await self._call(
                "look up checkout session",
                self._client.v1.checkout.sessions.retrieve_async(session_id))
            intent = session.payment_intent
            if not intent:
                raise ProviderError(f"checkout session {session_id} was never paid")
            payment_intent = intent if isinstance(intent, str) else intent.id
        refund = await self._call(
            "create refund",
            self._client.v1.refunds.create_async(
                {"payment_intent": payment_intent, "amount": amount_minor},
                {"idempotency_key": f"refund:{idempotency_key}"}))
        if refund.status in ("failed", "canceled"):
            raise ProviderError(f"refund {refund.id} {refund.status}")
        return ProviderRefund(refund_id=refund.id, amount_minor=int(refund.amount))

    def verify_webhook(self, payload: bytes, signature_header: str, secrets: Sequence[str],
                       now: int) -> None:
        """stripe.Webhook.construct_event with each secret in turn (two during a rotation);
        Stripe's check refuses old timestamps, this one refuses future ones too."""
        timestamp = _timestamp(signature_header)
        if timestamp is not None and timestamp > now + self.tolerance_s:
            raise signing.SignatureError("timestamp outside the tolerance (in the future)")
        why = "no webhook secret"
        for secret in secrets:
            try:
                stripe.Webhook.construct_event(payload, signature_header, secret,
                                               tolerance=self.tolerance_s)
                return
            except stripe.SignatureVerificationError as exc:
                why = str(exc.user_message or exc)
            except ValueError as exc:  # signed, but not JSON: say so without the body
                raise signing.SignatureError(f"signed body is not an event: {exc}") from None
        raise signing.SignatureError(why)

    def parse_event(self, payload: bytes) -> ProviderEvent:
        try:
            event = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"webhook body is not JSON: {exc}") from None
        if not isinstance(event, dict) or event.get("object") != "event":
            raise ValueError("webhook body is not an event object")
        event_id = _field(event, "id", str)
        type_name = _field(event, "type", str)
        created = _field(event, "created", int)
        obj = _field(_field(event, "data", dict), "object", dict)
        event_type = _EVENT_TYPES.get(type_name, ProviderEventType.OTHER)
        # A checkout whose payment method settles later (bank debits) completes unpaid; its
        # money is reported by async_payment_succeeded.
        if type_name == "checkout.session.completed" and obj.get("payment_status") != "paid":
            event_type = ProviderEventType.OTHER
        metadata = obj.get("metadata") or {}
        order = obj.get("client_reference_id") or (
            metadata.get("payment_order_id") if isinstance(metadata, dict) else None)
        if event_type is ProviderEventType.OTHER or not isinstance(order, str) or not order:
            # not ours to act on (another integration's object, a type we do not use)
            return ProviderEvent(event_id=event_id, type=ProviderEventType.OTHER,
                                 payment_order_id="", session_id="", amount_minor=0,
                                 currency="", created=created)
        if type_name == "charge.refunded":
            amount = _field(obj, "amount_refunded", int)
        elif type_name.startswith("checkout.session."):
            amount = _field(obj, "amount_total", int)
        elif type_name == "payment_intent.succeeded":
            amount = _field(obj, "amount_received", int)
        else:
            amount = _field(obj, "amount", int)
        currency = _field(obj, "currency", str)
        if len(currency) != 3 or not currency.isalpha():
            raise ValueError(f"currency {currency!r} is not an ISO 4217 code")
        failure_reason = ""
        if event_type is ProviderEventType.PAYMENT_FAILED:
            error = obj.get("last_payment_error") or {}
            failure_reason = _reason(error.get("code"), error.get("decline_code"))
        return ProviderEvent(event_id=event_id, type=event_type, payment_order_id=order,
                             session_id=_field(obj, "id", str), amount_minor=amount,
                             currency=currency.upper(), failure_reason=failure_reason,
                             created=created)

    # ---- errors ----------------------------------------------------------------------------

    async def _call(self, what: str, call: Any) -> Any:
        try:
            return await call
        except stripe.CardError as exc:
            # a decline: Stripe's decline code says the most (insufficient_funds, ...)
            error = exc.error
            code = _reason(exc.code, getattr(error, "decline_code", None) if error else None)
            raise ProviderError(f"{code}: {exc.user_message or 'card error'}",
                                code=code) from None
        except (stripe.RateLimitError, stripe.APIConnectionError) as exc:
            raise ProviderUnavailable(f"stripe {what}: {_describe(exc)}") from None
        except stripe.StripeError as exc:
            if exc.http_status is None or exc.http_status >= 500 or exc.http_status == 429:
                raise ProviderUnavailable(f"stripe {what}: {_describe(exc)}") from None
            raise ProviderError(f"{exc.code or 'stripe_error'}: stripe {what}: "
                                f"{_describe(exc)}") from None


def _reason(code: object, decline_code: object) -> str:
    """The failure reason the ledger records: Stripe's decline code where it says more than
    the error code (insufficient_funds rather than card_declined), else the error code."""
    if isinstance(decline_code, str) and decline_code not in ("", "generic_decline"):
        return decline_code
    return code if isinstance(code, str) and code else "card_declined"


def _describe(exc: stripe.StripeError) -> str:
    status = f"HTTP {exc.http_status}" if exc.http_status else "no answer"
    return f"{status} {type(exc).__name__}: {exc.user_message or ''}".strip()


def _timestamp(header: str) -> int | None:
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    return None


def _field(container: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = container.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"event field {key!r} is missing or not a {kind.__name__}")
    return value


if TYPE_CHECKING:  # mypy proves the class satisfies the protocol the ledger uses
    _conforms: PaymentProvider = StripeProvider("sk_test_x", success_url="https://x")
