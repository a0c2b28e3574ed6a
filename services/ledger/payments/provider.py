"""The payment provider seam: what the ledger asks of a provider, and what it hears back.

The ledger never learns that a payment succeeded from a return value: it creates a checkout
session (or charges a saved method) and waits for the provider's signed webhook, which the
webhook endpoint verifies (tally.kit.signing: `t=<ts>,v1=<HMAC-SHA256 over "ts.body">`) and
hands to `parse_event`. Only then is credit granted, once per provider event id.

The shapes follow Stripe's, so a Stripe adapter is a thin translation:

| here                           | Stripe                                                        |
|--------------------------------|---------------------------------------------------------------|
| create_checkout                | POST /v1/checkout/sessions, mode=payment, one price_data line, |
|                                | client_reference_id = payment_order_id, metadata.org_id,      |
|                                | Idempotency-Key = payment_order_id                            |
| CheckoutSession.session_id/url | Session.id / Session.url                                      |
| charge                         | POST /v1/payment_intents, confirm=true, off_session=true,     |
|                                | payment_method = payment_method_id, customer from the billing |
|                                | profile, metadata.payment_order_id, Idempotency-Key           |
| refund                         | POST /v1/refunds (payment_intent, amount), Idempotency-Key    |
| Stripe-Signature header        | the same format; verified by the webhook endpoint             |
| PAYMENT_SUCCEEDED              | checkout.session.completed (payment_status=paid),             |
|                                | payment_intent.succeeded (off-session charges)                |
| PAYMENT_FAILED                 | payment_intent.payment_failed (last_payment_error.code)       |
| CHECKOUT_EXPIRED               | checkout.session.expired                                      |
| REFUND_SUCCEEDED               | charge.refunded                                               |
| ProviderEvent.event_id         | Event.id (evt_...), unique per event, repeated on redelivery  |
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ProviderEventType(enum.StrEnum):
    """What a provider's webhook reports, in the ledger's words."""

    PAYMENT_SUCCEEDED = "PAYMENT_SUCCEEDED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    CHECKOUT_EXPIRED = "CHECKOUT_EXPIRED"
    REFUND_SUCCEEDED = "REFUND_SUCCEEDED"
    OTHER = "OTHER"  # an event type the ledger does not act on (acknowledged, recorded)


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One webhook event, parsed after its signature was verified."""

    event_id: str
    """Provider's event id: the same on every redelivery of the event (the dedup key)."""
    type: ProviderEventType
    payment_order_id: str
    """The order it concerns (client_reference_id / metadata.payment_order_id)."""
    session_id: str
    """Checkout session or payment intent id at the provider."""
    amount_minor: int
    """Money the event is about (paid, or refunded), minor units of `currency`."""
    currency: str
    failure_reason: str = ""
    """For PAYMENT_FAILED: the provider's code (card_declined, insufficient_funds, ...)."""
    created: int = 0
    """When the provider created the event, unix seconds."""


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    """A hosted checkout session for one payment order."""

    payment_order_id: str
    org_id: str
    amount_minor: int
    currency: str
    description: str
    """What the customer sees they are buying, e.g. "1,000 credits + 100 bonus"."""
    success_url: str = ""
    """Where the page sends the customer after paying; empty = the provider's own page."""
    cancel_url: str = ""


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    """A checkout the customer can open."""

    session_id: str
    url: str


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """An off-session charge of a saved payment method (automatic top-up)."""

    payment_order_id: str
    org_id: str
    amount_minor: int
    currency: str
    payment_method_id: str
    description: str


@dataclass(frozen=True, slots=True)
class ProviderRefund:
    """Money the provider returned to the customer."""

    refund_id: str
    amount_minor: int


class ProviderError(Exception):
    """The provider refused or could not be reached; the message says which."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code
        """The provider's reason for a refusal (card_declined, insufficient_funds, ...)."""


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or asked us to come back (rate limit, 5xx, no
    answer): nothing happened that the same idempotency key would not replay, so retrying
    is safe."""


class PaymentProvider(Protocol):
    """A payment provider as the ledger uses it. Every call is idempotent on its key, so a
    ledger request retried after a timeout never creates a second session, charge or refund."""

    name: str
    """Short name, as in PaymentOrder.provider and the webhook path (/webhooks/<name>)."""
    signature_header: str
    """The HTTP header carrying the webhook signature (Stripe: "Stripe-Signature")."""

    async def create_checkout(self, request: CheckoutRequest) -> CheckoutSession:
        """Opens (or, for the same payment_order_id, returns) a hosted checkout session."""
        ...

    async def charge(self, request: ChargeRequest) -> str:
        """Starts an off-session charge (idempotent on payment_order_id) and returns the
        provider's payment id. The outcome arrives by webhook, never as the return value."""
        ...

    async def refund(self, session_id: str, amount_minor: int, idempotency_key: str
                     ) -> ProviderRefund:
        """Refunds part or all of a paid session or charge (raises ProviderError)."""
        ...

    def verify_webhook(self, payload: bytes, signature_header: str, secrets: Sequence[str],
                       now: int) -> None:
        """Checks a webhook's signature header against `secrets` (any of them, for a
        rotation) and its timestamp against `now`; raises tally.kit.signing.SignatureError."""
        ...

    def parse_event(self, payload: bytes) -> ProviderEvent:
        """Reads a verified webhook body (raises ValueError when it is not one)."""
        ...
