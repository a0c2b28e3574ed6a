"""LocalProvider as the ledger and a customer meet it: its real checkout pages over HTTP (paid
through the forms with an aiohttp client), and its webhooks arriving at a real aiohttp receiver
that verifies every signature. Cards, payment methods, refunds, retries, give-ups, chaos
duplicates, secret rotation and parse_event are each checked on the wire.

No sleeps for timing: the tests await `provider.settled()`, which returns once every queued
webhook was delivered or given up.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from services.ledger.payments.local_provider import LocalProvider
from services.ledger.payments.provider import (
    ChargeRequest,
    CheckoutRequest,
    PaymentProvider,
    ProviderError,
    ProviderEventType,
)
from tally.kit import signing
from tally.kit.infra import free_port
from tests.ledger.payments_support import RECEIVER_SECRET as SECRET
from tests.ledger.payments_support import Receiver

GOOD_CARD = "4242 4242 4242 4242"
FUTURE_EXPIRY = f"12/{(datetime.now(UTC).year + 3) % 100:02d}"


MakeProvider = Callable[..., Awaitable[LocalProvider]]


@pytest.fixture
async def make_provider(receiver: Receiver) -> AsyncIterator[MakeProvider]:
    """Starts LocalProviders sending to `receiver` (fast retries), stopped at the end."""
    started: list[LocalProvider] = []

    async def make(**overrides: Any) -> LocalProvider:
        options: dict[str, Any] = {"webhook_url": receiver.url, "secrets": [SECRET],
                                   "retry_first_s": 0.01, "retry_max_s": 0.05,
                                   "max_attempts": 4, "seed": 7}
        provider = LocalProvider(**(options | overrides))
        await provider.start()
        started.append(provider)
        return provider

    yield make
    for provider in started:
        await provider.stop()


@pytest.fixture
async def provider(make_provider: MakeProvider) -> LocalProvider:
    return await make_provider()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def checkout_request(order: str = "po_1", **overrides: Any) -> CheckoutRequest:
    options: dict[str, Any] = {"payment_order_id": order, "org_id": "org_acme",
                               "amount_minor": 2500, "currency": "USD",
                               "description": "1,000 credits + 100 bonus"}
    return CheckoutRequest(**(options | overrides))


def charge_request(order: str = "po_c1", method: str = "pm_card_visa",
                   amount_minor: int = 1000) -> ChargeRequest:
    return ChargeRequest(payment_order_id=order, org_id="org_acme", amount_minor=amount_minor,
                         currency="eur", payment_method_id=method, description="auto top-up")


@dataclass
class Page:
    status: int
    text: str
    location: str


async def submit(http: aiohttp.ClientSession, url: str, form: dict[str, str],
                 follow: bool = False) -> Page:
    async with http.post(url, data=form, allow_redirects=follow) as reply:
        return Page(reply.status, await reply.text(), reply.headers.get("Location", ""))


async def pay(http: aiohttp.ClientSession, checkout_url: str, card: str = GOOD_CARD,
              expiry: str = FUTURE_EXPIRY, cvc: str = "123", name: str = "Ada Lovelace",
              follow: bool = False) -> Page:
    form = {"card_number": card, "expiry": expiry, "cvc": cvc, "name": name}
    return await submit(http, f"{checkout_url}/pay", form, follow)


async def get(http: aiohttp.ClientSession, url: str) -> Page:
    async with http.get(url, allow_redirects=False) as reply:
        return Page(reply.status, await reply.text(), reply.headers.get("Location", ""))


# ---- checkout sessions and pages ----------------------------------------------------------

async def test_a_checkout_is_idempotent_on_its_payment_order(provider: LocalProvider) -> None:
    as_provider: PaymentProvider = provider
    assert (as_provider.name, as_provider.signature_header) == ("local", "Local-Signature")

    first = await provider.create_checkout(checkout_request("po_1"))
    again = await provider.create_checkout(checkout_request("po_1"))
    other = await provider.create_checkout(checkout_request("po_2"))

    assert again == first
    assert first.session_id.startswith("cs_") and other.session_id != first.session_id
    assert first.url == f"{provider.url}/checkout/{first.session_id}"
    with pytest.raises(ProviderError, match="different parameters"):
        await provider.create_checkout(checkout_request("po_1", amount_minor=9999))


async def test_the_checkout_page_shows_the_purchase_and_a_labelled_card_form(
        provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    session = await provider.create_checkout(checkout_request())

    page = await get(http, session.url)

    assert page.status == 200
    assert "1,000 credits + 100 bonus" in page.text and "USD 25.00" in page.text
    assert f'action="/checkout/{session.session_id}/pay"' in page.text
    for name, input_id in [("card_number", "card-number"), ("expiry", "expiry"),
                           ("cvc", "cvc"), ("name", "name")]:
        assert f'<label for="{input_id}">' in page.text
        assert f'id="{input_id}" name="{name}"' in page.text
    assert '<button id="pay" type="submit">Pay USD 25.00</button>' in page.text
    assert 'id="cancel"' in page.text and f"/checkout/{session.session_id}/cancel" in page.text
    assert "4242 4242 4242 4242" in page.text and "4000 0025 0000 3155" in page.text
    assert 'id="error"' not in page.text
    missing = await get(http, f"{provider.url}/checkout/cs_nope")
    assert missing.status == 404


async def test_the_4242_card_pays_once_signed_and_redirects_to_the_success_url(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    success = "https://shop.example/thanks?session={CHECKOUT_SESSION_ID}"
    session = await provider.create_checkout(checkout_request("po_ok", success_url=success))

    page = await pay(http, session.url)
    await provider.settled()

    assert page.status == 303
    assert page.location == f"https://shop.example/thanks?session={session.session_id}"
    assert receiver.types() == ["checkout.session.completed"]
    assert receiver.bad_signatures == 0
    headers, body = receiver.requests[0]
    assert headers["Content-Type"] == "application/json"
    signing.verify(headers["Local-Signature"], body, [SECRET], int(time.time()))
    completed = receiver.accepted[0]["data"]["object"]
    assert completed["id"] == session.session_id
    assert (completed["amount_total"], completed["currency"]) == (2500, "usd")
    assert completed["client_reference_id"] == "po_ok"
    assert completed["payment_status"] == "paid"
    assert completed["metadata"] == {"org_id": "org_acme", "payment_order_id": "po_ok",
                                     "session_id": session.session_id}
    event = provider.parse_event(body)
    assert (event.type, event.payment_order_id, event.session_id) == (
        ProviderEventType.PAYMENT_SUCCEEDED, "po_ok", session.session_id)
    assert (event.amount_minor, event.currency) == (2500, "USD")
    assert 'id="paid"' in (await get(http, session.url)).text


async def test_without_a_success_url_the_customer_lands_on_the_payment_received_page(
        provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    session = await provider.create_checkout(checkout_request())

    redirect = await pay(http, session.url)
    landed = await pay(http, session.url, follow=True)  # already paid: the paid page again

    assert redirect.location == f"/checkout/{session.session_id}/complete"
    assert landed.status == 200
    assert '<p id="paid">Payment received: USD 25.00</p>' in landed.text


@pytest.mark.parametrize(("card", "code"), [("4000 0000 0000 0002", "card_declined"),
                                            ("4000000000009995", "insufficient_funds")])
async def test_a_declined_card_shows_why_reports_the_failure_and_leaves_the_session_payable(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession,
        card: str, code: str) -> None:
    session = await provider.create_checkout(checkout_request("po_decl"))

    declined = await pay(http, session.url, card=card)
    await provider.settled()

    assert declined.status == 402
    assert 'id="error"' in declined.text and f"({code})" in declined.text
    assert 'id="pay"' in declined.text  # the form again, for another card
    assert receiver.types() == ["payment_intent.payment_failed"]
    failed = receiver.accepted[0]["data"]["object"]
    assert failed["last_payment_error"]["code"] == code
    event = provider.parse_event(receiver.requests[0][1])
    assert (event.type, event.failure_reason) == (ProviderEventType.PAYMENT_FAILED, code)
    assert (event.session_id, event.payment_order_id) == (session.session_id, "po_decl")

    assert (await pay(http, session.url)).status == 303
    await provider.settled()
    assert receiver.types() == ["payment_intent.payment_failed", "checkout.session.completed"]


async def test_the_3ds_card_pays_once_the_customer_approves_authentication(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    session = await provider.create_checkout(checkout_request("po_3ds"))

    asked = await pay(http, session.url, card="4000 0025 0000 3155")
    assert asked.status == 303
    assert asked.location == f"/checkout/{session.session_id}/authenticate"
    await provider.settled()
    assert receiver.accepted == []  # nothing is decided before the customer answers
    challenge = await get(http, f"{provider.url}{asked.location}")
    assert challenge.status == 200
    assert 'id="authenticate-approve"' in challenge.text
    assert 'id="authenticate-fail"' in challenge.text

    approved = await submit(http, f"{provider.url}{asked.location}", {"action": "approve"})
    await provider.settled()

    assert approved.status == 303
    assert approved.location == f"/checkout/{session.session_id}/complete"
    assert receiver.types() == ["checkout.session.completed"]


async def test_a_failed_3ds_authentication_reports_the_failure_and_the_form_returns(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    session = await provider.create_checkout(checkout_request("po_3ds_fail"))
    asked = await pay(http, session.url, card="4000002500003155")

    failed = await submit(http, f"{provider.url}{asked.location}", {"action": "fail"})
    await provider.settled()

    assert failed.status == 402
    assert 'id="error"' in failed.text and "authentication_failed" in failed.text
    assert receiver.types() == ["payment_intent.payment_failed"]
    assert provider.parse_event(receiver.requests[0][1]).failure_reason == "authentication_failed"
    after = await get(http, f"{provider.url}{asked.location}")
    assert (after.status, after.location) == (303, f"/checkout/{session.session_id}")
    assert (await get(http, session.url)).status == 200  # still open


@pytest.mark.parametrize(("field_name", "value", "complaint"), [
    ("card", "4242 4242 4242 4241", "card number is invalid"),
    ("card", "4242 abcd", "card number is incomplete"),
    ("expiry", "01/20", "expiry date is in the past"),
    ("expiry", "13/40", "must be MM/YY"),
    ("expiry", "1240", "must be MM/YY"),
    ("cvc", "12", "CVC"),
    ("cvc", "12a", "CVC"),
    ("name", "   ", "name on the card"),
])
async def test_an_invalid_form_is_refused_with_422_and_sends_nothing(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession,
        field_name: str, value: str, complaint: str) -> None:
    session = await provider.create_checkout(checkout_request("po_invalid"))

    page = await pay(http, session.url, **{field_name: value})
    await provider.settled()

    assert page.status == 422
    assert 'id="error"' in page.text and complaint in page.text
    assert provider.events == [] and receiver.requests == []


async def test_cancel_expires_the_session_and_returns_to_the_cancel_url(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    with_url = await provider.create_checkout(
        checkout_request("po_cancel", cancel_url="https://shop.example/cart"))
    without_url = await provider.create_checkout(checkout_request("po_cancel_2"))

    canceled = await submit(http, f"{with_url.url}/cancel", {})
    landed = await submit(http, f"{without_url.url}/cancel", {}, follow=True)
    late_payment = await pay(http, with_url.url)
    await provider.settled()

    assert (canceled.status, canceled.location) == (303, "https://shop.example/cart")
    assert landed.status == 410 and 'id="expired"' in landed.text
    assert late_payment.status == 410
    assert receiver.types() == ["checkout.session.expired"] * 2
    events = [provider.parse_event(body) for _, body in receiver.requests]
    assert {(e.type, e.session_id) for e in events} == {
        (ProviderEventType.CHECKOUT_EXPIRED, with_url.session_id),
        (ProviderEventType.CHECKOUT_EXPIRED, without_url.session_id)}


async def test_a_session_past_its_ttl_expires_once(
        make_provider: MakeProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    offset_s = [0.0]
    provider = await make_provider(session_ttl_s=60,
                                   clock=lambda: time.time() + offset_s[0])
    session = await provider.create_checkout(checkout_request("po_ttl"))

    offset_s[0] = 61.0  # within the receiver's 300 s signature tolerance
    first = await get(http, session.url)
    second = await get(http, session.url)
    await provider.settled()

    assert (first.status, second.status) == (410, 410)
    assert await provider.create_checkout(checkout_request("po_ttl")) == session
    assert receiver.types() == ["checkout.session.expired"]


async def test_paying_twice_even_at_once_completes_the_session_once(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    session = await provider.create_checkout(checkout_request("po_twice"))

    pages = await asyncio.gather(*(pay(http, session.url) for _ in range(4)))
    again = await pay(http, session.url)
    await provider.settled()

    assert {page.status for page in [*pages, again]} == {303}
    assert receiver.types() == ["checkout.session.completed"]


# ---- webhook delivery ---------------------------------------------------------------------

async def test_a_receiver_failing_three_times_gets_the_event_on_attempt_four_once(
        make_provider: MakeProvider, receiver: Receiver) -> None:
    provider = await make_provider(max_attempts=6)
    receiver.failures = 3

    await provider.charge(charge_request())
    await provider.settled()

    assert [(d.attempt, d.status, d.delivered) for d in provider.deliveries] == [
        (1, 503, False), (2, 503, False), (3, 503, False), (4, 200, True)]
    assert len(receiver.requests) == 4 and len(receiver.accepted) == 1
    assert receiver.bad_signatures == 0  # every retry freshly signed, every one valid


async def test_a_receiver_that_always_fails_is_given_up_after_max_attempts(
        provider: LocalProvider, receiver: Receiver) -> None:
    receiver.failures = -1

    await provider.charge(charge_request())
    await provider.settled()

    assert [(d.attempt, d.error, d.gave_up) for d in provider.deliveries] == [
        (1, "HTTP 503", False), (2, "HTTP 503", False), (3, "HTTP 503", False),
        (4, "HTTP 503", True)]
    assert len(receiver.requests) == 4 and receiver.accepted == []


async def test_an_unreachable_receiver_is_retried_then_given_up(
        make_provider: MakeProvider) -> None:
    provider = await make_provider(webhook_url=f"http://127.0.0.1:{free_port()}/hook",
                                   max_attempts=3)

    await provider.charge(charge_request())
    await provider.settled()

    deliveries = provider.deliveries
    assert [(d.attempt, d.status, d.delivered) for d in deliveries] == [
        (1, None, False), (2, None, False), (3, None, False)]
    assert deliveries[-1].gave_up and "Connect" in deliveries[-1].error


async def test_with_duplicate_rate_1_every_event_arrives_twice_with_its_id(
        make_provider: MakeProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    provider = await make_provider(duplicate_rate=1.0)
    session = await provider.create_checkout(checkout_request("po_dup"))

    await provider.charge(charge_request("po_dup_charge"))
    await pay(http, session.url)
    await provider.settled()

    ids = Counter(event["id"] for event in receiver.accepted)
    assert len(ids) == 2 and set(ids.values()) == {2}
    assert set(ids) == {event["id"] for event in provider.events}


async def test_with_reorder_rate_1_every_event_still_arrives_exactly_once(
        make_provider: MakeProvider, receiver: Receiver) -> None:
    provider = await make_provider(reorder_rate=1.0, retry_first_s=0.05)

    for i in range(8):
        await provider.charge(charge_request(f"po_reorder_{i}"))
    await provider.settled()

    assert Counter(e["id"] for e in receiver.accepted) == Counter(
        e["id"] for e in provider.events)
    assert len(receiver.accepted) == 8


async def test_after_rotate_secret_webhooks_verify_with_the_new_secret_not_the_old(
        make_provider: MakeProvider, receiver: Receiver) -> None:
    receiver.secrets = ["whsec_old", "whsec_new"]
    provider = await make_provider(secrets=["whsec_old"])
    await provider.charge(charge_request("po_before"))
    await provider.settled()

    provider.rotate_secret("whsec_new")
    await provider.charge(charge_request("po_after"))
    await provider.settled()

    assert provider.secrets == ("whsec_new", "whsec_old")
    (before_headers, before), (after_headers, after) = receiver.requests
    now = int(time.time())
    signing.verify(before_headers["Local-Signature"], before, ["whsec_old"], now)
    signing.verify(after_headers["Local-Signature"], after, ["whsec_new"], now)
    with pytest.raises(signing.SignatureError):
        signing.verify(after_headers["Local-Signature"], after, ["whsec_old"], now)


async def test_events_wait_for_a_webhook_url_and_resend_redelivers_with_the_same_id(
        make_provider: MakeProvider, receiver: Receiver) -> None:
    provider = await make_provider(webhook_url="")
    await provider.charge(charge_request())
    await provider.settled()
    assert receiver.requests == [] and len(provider.events) == 1

    provider.set_webhook_url(receiver.url)
    await provider.settled()
    resent = await provider.resend(provider.events[0]["id"])

    assert resent.delivered and resent.is_redelivery
    assert [e["id"] for e in receiver.accepted] == [provider.events[0]["id"]] * 2
    with pytest.raises(ProviderError, match="no such event"):
        await provider.resend("evt_missing")


# ---- off-session charges ------------------------------------------------------------------

@pytest.mark.parametrize(("method", "event_type", "code"), [
    ("pm_card_visa", "payment_intent.succeeded", ""),
    ("pm_card_chargeDeclined", "payment_intent.payment_failed", "card_declined"),
    ("pm_card_chargeDeclinedInsufficientFunds", "payment_intent.payment_failed",
     "insufficient_funds"),
    ("pm_card_authenticationRequired", "payment_intent.payment_failed",
     "authentication_required"),
])
async def test_a_charge_reports_its_outcome_only_by_webhook(
        provider: LocalProvider, receiver: Receiver, method: str, event_type: str,
        code: str) -> None:
    payment_id = await provider.charge(charge_request("po_charge", method, amount_minor=1234))
    assert receiver.requests == []  # not sent inside the call

    await provider.settled()

    assert payment_id.startswith("pi_")
    assert receiver.types() == [event_type]
    event = provider.parse_event(receiver.requests[0][1])
    expected = ProviderEventType.PAYMENT_FAILED if code else ProviderEventType.PAYMENT_SUCCEEDED
    assert (event.type, event.failure_reason) == (expected, code)
    assert (event.session_id, event.payment_order_id) == (payment_id, "po_charge")
    assert (event.amount_minor, event.currency) == (1234, "EUR")


async def test_a_charge_is_idempotent_and_an_unknown_method_is_refused(
        provider: LocalProvider, receiver: Receiver) -> None:
    first = await provider.charge(charge_request("po_idem"))
    again = await provider.charge(charge_request("po_idem"))
    await provider.settled()

    assert again == first
    assert receiver.types() == ["payment_intent.succeeded"]
    with pytest.raises(ProviderError, match="no such payment method"):
        await provider.charge(charge_request("po_bad", "pm_card_unknown"))
    with pytest.raises(ProviderError, match="different parameters"):
        await provider.charge(charge_request("po_idem", amount_minor=1))


async def test_a_pending_charge_waits_for_complete_pending(
        provider: LocalProvider, receiver: Receiver) -> None:
    succeeds = await provider.charge(charge_request("po_pending_ok", "pm_card_pending"))
    fails = await provider.charge(charge_request("po_pending_no", "pm_card_pending"))
    await provider.settled()
    assert receiver.requests == []

    await provider.complete_pending(succeeds, succeed=True)
    await provider.complete_pending(fails, succeed=False)
    await provider.settled()

    outcomes = {provider.parse_event(body).session_id: provider.parse_event(body)
                for _, body in receiver.requests}
    assert outcomes[succeeds].type is ProviderEventType.PAYMENT_SUCCEEDED
    assert (outcomes[fails].type, outcomes[fails].failure_reason) == (
        ProviderEventType.PAYMENT_FAILED, "card_declined")
    with pytest.raises(ProviderError, match="no longer processing"):
        await provider.complete_pending(succeeds, succeed=True)
    visa = await provider.charge(charge_request("po_visa"))
    with pytest.raises(ProviderError, match="no pending charge"):
        await provider.complete_pending(visa, succeed=True)


# ---- refunds ------------------------------------------------------------------------------

async def test_refunds_are_partial_or_full_never_more_and_idempotent_on_their_key(
        provider: LocalProvider, receiver: Receiver) -> None:
    payment_id = await provider.charge(charge_request("po_refund", amount_minor=1000))
    await provider.settled()

    partial = await provider.refund(payment_id, 400, "rf_1")
    same = await provider.refund(payment_id, 400, "rf_1")
    rest = await provider.refund(payment_id, 600, "rf_2")
    with pytest.raises(ProviderError, match="exceeds"):
        await provider.refund(payment_id, 1, "rf_3")
    with pytest.raises(ProviderError, match="different refund"):
        await provider.refund(payment_id, 500, "rf_1")
    await provider.settled()

    assert same == partial and partial.refund_id.startswith("re_")
    assert (partial.amount_minor, rest.amount_minor) == (400, 600)
    assert receiver.types() == ["payment_intent.succeeded", "charge.refunded",
                                "charge.refunded"]
    refunds = [provider.parse_event(body) for _, body in receiver.requests[1:]]
    assert [(e.type, e.amount_minor, e.session_id, e.payment_order_id) for e in refunds] == [
        (ProviderEventType.REFUND_SUCCEEDED, 400, payment_id, "po_refund"),
        (ProviderEventType.REFUND_SUCCEEDED, 600, payment_id, "po_refund")]
    last = receiver.accepted[-1]["data"]["object"]
    assert (last["amount_refunded"], last["refunded"], last["refund"]["id"]) == (
        1000, True, rest.refund_id)


async def test_a_paid_checkout_is_refundable_by_its_session_and_an_unpaid_one_is_not(
        provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession) -> None:
    paid = await provider.create_checkout(checkout_request("po_paid"))
    unpaid = await provider.create_checkout(checkout_request("po_unpaid"))
    failed = await provider.charge(charge_request("po_failed", "pm_card_chargeDeclined"))
    await pay(http, paid.url)

    refund = await provider.refund(paid.session_id, 2500, "rf_full")
    await provider.settled()

    assert refund.amount_minor == 2500
    event = provider.parse_event(receiver.requests[-1][1])
    assert (event.type, event.session_id, event.currency) == (
        ProviderEventType.REFUND_SUCCEEDED, paid.session_id, "USD")
    for not_paid in (unpaid.session_id, failed):
        with pytest.raises(ProviderError, match="not paid"):
            await provider.refund(not_paid, 1, f"rf_{not_paid}")
    with pytest.raises(ProviderError, match="no such payment"):
        await provider.refund("cs_nope", 1, "rf_nope")


# ---- parse_event --------------------------------------------------------------------------

async def test_parse_event_reads_every_event_the_provider_sends(
        provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    paid = await provider.create_checkout(checkout_request("po_a"))
    canceled = await provider.create_checkout(checkout_request("po_b"))
    await pay(http, paid.url, card="4000 0000 0000 0002")
    await pay(http, paid.url)
    await submit(http, f"{canceled.url}/cancel", {})
    charged = await provider.charge(charge_request("po_c"))
    await provider.refund(charged, 300, "rf_c")
    await provider.settled()

    parsed = [(provider.parse_event(json.dumps(e).encode()), e) for e in provider.events]

    assert [(p.type, p.payment_order_id, p.session_id, p.amount_minor, p.currency,
             p.failure_reason) for p, _ in parsed] == [
        (ProviderEventType.PAYMENT_FAILED, "po_a", paid.session_id, 2500, "USD",
         "card_declined"),
        (ProviderEventType.PAYMENT_SUCCEEDED, "po_a", paid.session_id, 2500, "USD", ""),
        (ProviderEventType.CHECKOUT_EXPIRED, "po_b", canceled.session_id, 2500, "USD", ""),
        (ProviderEventType.PAYMENT_SUCCEEDED, "po_c", charged, 1000, "EUR", ""),
        (ProviderEventType.REFUND_SUCCEEDED, "po_c", charged, 300, "EUR", ""),
    ]
    assert all((p.event_id, p.created) == (e["id"], e["created"]) for p, e in parsed)
    other = {"id": "evt_x", "object": "event", "type": "customer.created", "created": 1,
             "data": {"object": {"id": "cus_1"}}}
    assert provider.parse_event(json.dumps(other).encode()).type is ProviderEventType.OTHER


def event_body(**overrides: Any) -> bytes:
    obj = {"id": "pi_1", "object": "payment_intent", "amount": 100, "currency": "usd",
           "metadata": {"payment_order_id": "po_1", "session_id": "pi_1", "org_id": "o"}}
    event: dict[str, Any] = {"id": "evt_1", "object": "event",
                             "type": "payment_intent.succeeded", "created": 1,
                             "data": {"object": obj}}
    for key, value in overrides.items():
        if key in event:
            event[key] = value
        elif value is None:
            obj.pop(key)
        else:
            obj[key] = value
    return json.dumps(event).encode()


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"\xff\xfe", b"[]", b'{"object": "event"}',
    event_body(id=7), event_body(type=None), event_body(created="yesterday"),
    event_body(data={"object": "pi_1"}), event_body(data={}),
    event_body(metadata={}), event_body(metadata="po_1"), event_body(amount=None),
    event_body(amount=True), event_body(amount="100"), event_body(currency="dollars"),
    event_body(currency=None),
    event_body(type="payment_intent.payment_failed"),  # no last_payment_error
])
def test_parse_event_refuses_what_is_not_a_well_formed_event(
        payload: bytes) -> None:
    provider = LocalProvider(secrets=[SECRET], public_url="http://pay.example")
    assert provider.parse_event(event_body()).amount_minor == 100  # the base case parses
    with pytest.raises(ValueError):
        provider.parse_event(payload)
