"""Rules of payments, in plain Python: what an order costs and grants, how a provider event
moves it, what a refund may take back, and when an automatic top-up is due.

The store locks rows and writes; these functions decide. Money arrives only from a provider
event that the webhook endpoint verified (or from an approved manual payment): nothing here
trusts a return value of the provider.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Final

from services.ledger import domain as d
from services.ledger.payments.provider import ProviderEvent, ProviderEventType
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid
from tally.kit.money import INT64_MAX, MICROS_PER_CREDIT, format_credits

MAX_TOP_UPS_PER_DAY: Final = 24
MAX_REFERENCE_LENGTH: Final = 200
MAX_URL_LENGTH: Final = 2000
_CURRENCY: Final = re.compile(r"^[A-Z]{3}$")


class PaymentOrderState(enum.StrEnum):
    """Lifecycle of an order (proto PaymentOrderState)."""

    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    REFUNDED = "REFUNDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"


PAID: Final = frozenset({PaymentOrderState.SUCCEEDED, PaymentOrderState.PARTIALLY_REFUNDED,
                         PaymentOrderState.REFUNDED})
"""States of an order whose money arrived (and whose credit was granted)."""


class PaymentOrderKind(enum.StrEnum):
    """How an order came about (proto PaymentOrderKind)."""

    CHECKOUT = "CHECKOUT"
    MANUAL = "MANUAL"
    AUTO_TOP_UP = "AUTO_TOP_UP"


class ManualPaymentMethod(enum.StrEnum):
    """How a manual payment was made (proto ManualPaymentMethod)."""

    BANK_TRANSFER = "BANK_TRANSFER"
    INVOICE = "INVOICE"


@dataclass(frozen=True, slots=True)
class Offer:
    """What an order costs and what it grants, fixed when the order is made."""

    amount_minor: int
    currency: str
    credits_micros: int
    bonus_credits_micros: int
    package_id: str = ""
    price_book_version: int = 0
    manual_settlement_only: bool = False


@dataclass(frozen=True, slots=True)
class CustomAmount:
    """A custom purchase: an amount of money instead of a package."""

    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    """A request to buy credit, and its outcome (proto PaymentOrder)."""

    payment_order_id: str
    org_id: str
    kind: PaymentOrderKind
    state: PaymentOrderState
    amount_minor: int
    currency: str
    credits_micros: int
    bonus_credits_micros: int
    provider: str
    created_by: str
    created_at: datetime
    package_id: str = ""
    price_book_version: int = 0
    billing_profile_id: str = ""
    provider_session_id: str = ""
    checkout_url: str = ""
    failure_reason: str = ""
    manual_method: ManualPaymentMethod | None = None
    reference: str = ""
    approved_by: str = ""
    credit_transfer_id: str = ""
    refunded_minor: int = 0
    refunded_micros: int = 0
    bonus_forfeited_micros: int = 0
    settled_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PurchaseCommand:
    """Purchase: buy a package or a custom amount through hosted checkout."""

    payment_order_id: str
    org_id: str
    package_id: str = ""
    custom: CustomAmount | None = None
    billing_profile_id: str = ""
    success_url: str = ""
    cancel_url: str = ""


@dataclass(frozen=True, slots=True)
class ManualPaymentCommand:
    """RecordManualPayment: money received outside checkout, credited on approval."""

    payment_order_id: str
    org_id: str
    amount_minor: int
    currency: str
    credits_micros: int
    bonus_credits_micros: int
    reference: str
    method: ManualPaymentMethod | None


@dataclass(frozen=True, slots=True)
class AutoTopUp:
    """An org's automatic top-up configuration (proto AutoTopUp)."""

    org_id: str
    enabled: bool
    threshold_micros: int
    max_per_day: int
    package_id: str = ""
    custom: CustomAmount | None = None
    billing_profile_id: str = ""
    payment_method_id: str = ""
    updated_at: datetime | None = None
    updated_by: str = ""


# --- ids of what a payment writes ----------------------------------------------------------


def purchase_transfer_id(payment_order_id: str) -> str:
    """The PURCHASE transfer that credits an order: one per order, whatever the webhooks do."""
    return f"purchase:{payment_order_id}"


def bonus_transfer_id(payment_order_id: str) -> str:
    """The BONUS transfer of an order's bonus credit."""
    return f"bonus:{payment_order_id}"


def top_up_order_id(org_id: str, attempt: int) -> str:
    """Automatic top-up orders are numbered per org, so a retried start reuses its id."""
    return f"topup:{org_id}:{attempt}"


# --- validation ----------------------------------------------------------------------------


def check_currency(name: str, value: str) -> FieldViolation | None:
    """An ISO 4217 code in upper case."""
    return None if _CURRENCY.match(value) else FieldViolation(name, "must be an ISO 4217 code "
                                                                    "such as USD")


def check_url(name: str, value: str) -> FieldViolation | None:
    """Empty, or an http(s) URL."""
    if not value:
        return None
    if len(value) > MAX_URL_LENGTH or not value.startswith(("http://", "https://")):
        return FieldViolation(name, f"must be an http(s) URL of at most {MAX_URL_LENGTH} chars")
    return None


def validate_purchase(cmd: PurchaseCommand) -> None:
    """Every problem of a Purchase, each naming its field."""
    problems: list[FieldViolation | None] = [
        d.check_id("payment_order_id", cmd.payment_order_id), d.check_id("org_id", cmd.org_id),
        check_url("success_url", cmd.success_url), check_url("cancel_url", cmd.cancel_url)]
    problems += _amount_problems(cmd.package_id, cmd.custom, "")
    d.raise_if(problems)


def _amount_problems(package_id: str, custom: CustomAmount | None, prefix: str
                     ) -> list[FieldViolation | None]:
    if custom is None:
        if not package_id:
            return [FieldViolation(f"{prefix}package_id", "a package_id or a custom amount "
                                                          "is required")]
        return [d.check_id(f"{prefix}package_id", package_id)]
    return [d.check_amount(f"{prefix}custom.amount_minor", custom.amount_minor),
            check_currency(f"{prefix}custom.currency", custom.currency)]


def validate_manual_payment(cmd: ManualPaymentCommand) -> None:
    """Every problem of a RecordManualPayment."""
    reference = cmd.reference.strip()
    d.raise_if([
        d.check_id("payment_order_id", cmd.payment_order_id), d.check_id("org_id", cmd.org_id),
        d.check_amount("amount_minor", cmd.amount_minor),
        check_currency("currency", cmd.currency),
        d.check_amount("credits_micros", cmd.credits_micros),
        d.check_amount("bonus_credits_micros", cmd.bonus_credits_micros, allow_zero=True),
        None if reference and len(reference) <= MAX_REFERENCE_LENGTH else FieldViolation(
            "reference", f"is required (at most {MAX_REFERENCE_LENGTH} chars)"),
        None if cmd.method is not None else FieldViolation(
            "method", "must be BANK_TRANSFER or INVOICE"),
    ])


def validate_auto_top_up(config: AutoTopUp) -> None:
    """A configuration that can run: when enabled, a threshold, an amount and a daily cap."""
    problems: list[FieldViolation | None] = [d.check_id("auto_top_up.org_id", config.org_id)]
    if config.enabled:
        problems += [
            d.check_amount("auto_top_up.threshold_micros", config.threshold_micros),
            *_amount_problems(config.package_id, config.custom, "auto_top_up."),
            None if 1 <= config.max_per_day <= MAX_TOP_UPS_PER_DAY else FieldViolation(
                "auto_top_up.max_per_day", f"must be 1..{MAX_TOP_UPS_PER_DAY}"),
            None if config.payment_method_id else FieldViolation(
                "auto_top_up.payment_method_id", "is required when enabled"),
        ]
    elif config.threshold_micros < 0 or config.max_per_day < 0:
        problems.append(FieldViolation("auto_top_up", "numbers must not be negative"))
    if config.payment_method_id:
        problems.append(d.check_id("auto_top_up.payment_method_id", config.payment_method_id))
    d.raise_if(problems)


# --- offers --------------------------------------------------------------------------------


def custom_offer(custom: CustomAmount, price_per_credit_minor: str | None, version: int,
                 field: str = "custom.currency") -> Offer:
    """Credits for a custom amount of money: amount / price per credit, rounded down to whole
    micro-credits (exact rational arithmetic; the customer never gets a fraction of a micro
    and never loses more than one)."""
    if price_per_credit_minor is None:
        raise invalid(field, f"{custom.currency} is not sold as a custom amount")
    try:
        price = Fraction(Decimal(price_per_credit_minor))
    except (InvalidOperation, ValueError):
        raise invalid(field, f"the price book's price for {custom.currency} is not a "
                             "decimal") from None
    if price <= 0:
        raise invalid(field, f"the price book's price for {custom.currency} is not positive")
    credits = int(Fraction(custom.amount_minor) * MICROS_PER_CREDIT / price)  # floor (> 0)
    if credits <= 0:
        raise invalid("custom.amount_minor", "buys less than one micro-credit")
    if credits > INT64_MAX:
        raise invalid("custom.amount_minor", "buys more credit than int64 holds")
    return Offer(custom.amount_minor, custom.currency, credits, 0, "", version)


def describe(offer: Offer) -> str:
    """What the customer sees on the checkout page."""
    credits = format_credits(offer.credits_micros)
    if offer.bonus_credits_micros:
        return f"{credits} credits + {format_credits(offer.bonus_credits_micros)} bonus"
    return f"{credits} credits"


# --- provider events -----------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """What a verified provider event did to its order (stored with the event)."""

    CREDITED = "CREDITED"
    """The order succeeded now: its credit was granted."""
    ALREADY_PAID = "ALREADY_PAID"
    """The order had already been credited (another event about the same payment)."""
    FAILED = "FAILED"
    """An off-session charge failed: the order failed."""
    ATTEMPT_FAILED = "ATTEMPT_FAILED"
    """A card was refused at checkout: the order stays open for another try."""
    CANCELED = "CANCELED"
    """The checkout expired or was canceled."""
    IGNORED = "IGNORED"
    """Nothing to do (a stale failure after success, a refund the ledger recorded, ...)."""
    MISMATCH = "MISMATCH"
    """The event's amount or currency is not the order's: nothing was credited."""


def outcome_of(order: PaymentOrder, event: ProviderEvent) -> Outcome:
    """How `event` moves `order`. Events may come late, twice or out of order: success wins
    over any failure, and nothing is credited twice (ALREADY_PAID)."""
    kind = event.type
    if kind is ProviderEventType.PAYMENT_SUCCEEDED:
        if (event.amount_minor, event.currency) != (order.amount_minor, order.currency):
            return Outcome.MISMATCH
        # The provider has the money: credit it even if a (stale) failure or expiry came first.
        return Outcome.ALREADY_PAID if order.state in PAID else Outcome.CREDITED
    if order.state is not PaymentOrderState.PENDING:
        return Outcome.IGNORED
    if kind is ProviderEventType.PAYMENT_FAILED:
        return (Outcome.FAILED if order.kind is PaymentOrderKind.AUTO_TOP_UP
                else Outcome.ATTEMPT_FAILED)
    if kind is ProviderEventType.CHECKOUT_EXPIRED:
        return Outcome.CANCELED
    return Outcome.IGNORED


# --- manual settlement ---------------------------------------------------------------------


def check_approver(order: PaymentOrder, approver: str) -> None:
    """Four eyes: whoever recorded a manual payment cannot approve it."""
    if order.kind is not PaymentOrderKind.MANUAL:
        raise invalid("payment_order_id", "is not a manual payment")
    if approver == order.created_by:
        raise TallyError(Reason.PERMISSION_DENIED,
                         "context.actor: the approver must differ from the recorder "
                         f"({order.created_by})", field="context.actor")


# --- refunds -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefundPlan:
    """What one refund takes back, and the order's totals after it."""

    reversed_micros: int
    provider_refund_minor: int
    bonus_forfeited_micros: int
    state_after: PaymentOrderState


def check_refundable(order: PaymentOrder) -> None:
    """Only an order whose money arrived, and that is not wholly refunded, can be refunded."""
    if order.state not in (PaymentOrderState.SUCCEEDED, PaymentOrderState.PARTIALLY_REFUNDED):
        raise TallyError(Reason.PAYMENT_NOT_COMPLETED,
                         f"payment_order_id: order is {order.state}, not SUCCEEDED",
                         field="payment_order_id", metadata={"state": order.state.value})


def plan_refund(order: PaymentOrder, requested_micros: int, purchased_unspent: int,
                bonus_unspent: int, available_micros: int) -> RefundPlan:
    """Refunds only purchased credit that is unspent (left in the order's grant) and not held.

    Money and bonus follow the credit in proportion, computed on the running totals so that
    refunds in several parts add up exactly to the whole: after a refund, the order's money
    refunded is floor(amount * credits_refunded / credits) and its bonus forfeited is
    floor(bonus * credits_refunded / credits), capped by the bonus still unspent.
    """
    check_refundable(order)
    refundable = max(0, min(purchased_unspent, available_micros))
    amount = requested_micros or refundable
    if amount == 0 or amount > refundable:
        raise TallyError(
            Reason.REFUND_EXCEEDS_UNSPENT,
            f"amount_micros: {amount} micro-credits asked, {refundable} of the order's "
            "purchased credit is unspent and not held",
            field="amount_micros", metadata={"unspent_micros": str(refundable)})
    total = order.refunded_micros + amount
    money_total = order.amount_minor * total // order.credits_micros
    bonus_total = order.bonus_credits_micros * total // order.credits_micros
    bonus = min(bonus_total - order.bonus_forfeited_micros, bonus_unspent,
                max(0, available_micros - amount))
    state = (PaymentOrderState.REFUNDED if total == order.credits_micros
             else PaymentOrderState.PARTIALLY_REFUNDED)
    return RefundPlan(amount, money_total - order.refunded_minor, max(bonus, 0), state)


# --- automatic top-up ----------------------------------------------------------------------


class TopUpDecision(enum.StrEnum):
    """What the top-up rules say for an org whose credit may have dropped."""

    START = "START"
    NOT_BELOW = "NOT_BELOW"
    IN_FLIGHT = "IN_FLIGHT"
    DAILY_LIMIT = "DAILY_LIMIT"
    DISABLED = "DISABLED"


def top_up_decision(config: AutoTopUp | None, available_micros: int, in_flight: bool,
                    started_today: int) -> TopUpDecision:
    """Top up when available credit is below the threshold, at most one order at a time and
    at most max_per_day a UTC day. Decided on values read under the config row's lock."""
    if config is None or not config.enabled:
        return TopUpDecision.DISABLED
    if available_micros >= config.threshold_micros:
        return TopUpDecision.NOT_BELOW
    if in_flight:
        return TopUpDecision.IN_FLIGHT
    if started_today >= config.max_per_day:
        return TopUpDecision.DAILY_LIMIT
    return TopUpDecision.START
