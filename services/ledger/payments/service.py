"""Payments: the flows that span the provider, the price book and the ledger's store.

Purchase and automatic top-up each make a PENDING order first and only then ask the provider
(idempotently on the order id), so a retry after any failure finds the order and finishes it.
Credit is granted by `confirm`, from a webhook whose signature checked out, once per event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TypeVar

from services.ledger import domain as d
from services.ledger.billing.store import BillingStore
from services.ledger.payments import domain as p
from services.ledger.payments.catalog import Catalog
from services.ledger.payments.provider import (
    ChargeRequest,
    CheckoutRequest,
    PaymentProvider,
    ProviderError,
    ProviderUnavailable,
)
from services.ledger.payments.store import MANUAL_PROVIDER, PaymentStore
from tally.kit import metrics, signing
from tally.kit.errors import FieldViolation, Reason, TallyError, invalid
from tally.kit.log import get_logger
from tally.kit.telemetry import current_trace_id

log = get_logger("ledger.payments")

MAX_WEBHOOK_BYTES = 1 << 20
T = TypeVar("T")


class Payments:
    """Purchases, webhooks, manual settlement, refunds and automatic top-up of the ledger."""

    def __init__(self, store: PaymentStore, provider: PaymentProvider, catalog: Catalog,
                 webhook_secrets: Sequence[str], *,
                 clock: Callable[[], float] = time.time,
                 profiles: BillingStore | None = None) -> None:
        if not webhook_secrets:
            raise ValueError("at least one webhook secret is needed")
        self.store = store
        self.provider = provider
        self.catalog = catalog
        self.webhook_secrets = list(webhook_secrets)
        self.clock = clock
        self.profiles = profiles

    # -- purchase --------------------------------------------------------------------------

    async def purchase(self, cmd: p.PurchaseCommand, caller: d.Caller) -> p.PaymentOrder:
        """A PENDING order with its hosted checkout URL; credit comes with the webhook."""
        p.validate_purchase(cmd)
        request_hash = d.fingerprint(cmd)
        order = await self.store.claimed_order(cmd.payment_order_id, request_hash)
        if order is None:
            if self.profiles is not None:
                await self.profiles.check_can_buy(cmd.org_id)
            offer = await self._offer(cmd.package_id, cmd.custom, "", checkout=True)
            order = await self.store.create_order(p.PaymentOrder(
                cmd.payment_order_id, cmd.org_id, p.PaymentOrderKind.CHECKOUT,
                p.PaymentOrderState.PENDING, offer.amount_minor, offer.currency,
                offer.credits_micros, offer.bonus_credits_micros, self.provider.name,
                caller.actor, self.store.ledger.clock(), package_id=offer.package_id,
                price_book_version=offer.price_book_version,
                billing_profile_id=cmd.billing_profile_id), request_hash)
        if order.provider_session_id or order.state is not p.PaymentOrderState.PENDING:
            return order
        session = await self._provider_call(self.provider.create_checkout(CheckoutRequest(
            order.payment_order_id, order.org_id, order.amount_minor, order.currency,
            p.describe(_offer_of(order)), cmd.success_url, cmd.cancel_url)))
        return await self.store.attach_session(order.payment_order_id, session.session_id,
                                               session.url)

    async def _offer(self, package_id: str, custom: p.CustomAmount | None, prefix: str, *,
                     checkout: bool) -> p.Offer:
        if custom is not None:
            return await self.catalog.custom_offer(custom, field=f"{prefix}custom.currency")
        return await self.catalog.package_offer(package_id, field=f"{prefix}package_id",
                                                checkout=checkout)

    @staticmethod
    async def _provider_call(call: Awaitable[T]) -> T:
        try:
            return await call
        except ProviderError as exc:
            raise TallyError(Reason.UNAVAILABLE, f"payment provider: {exc}") from exc

    # -- webhooks --------------------------------------------------------------------------

    async def confirm(self, provider: str, payload: bytes, signature_header: str
                      ) -> tuple[bool, p.PaymentOrder | None]:
        """Verifies a webhook (HMAC over "<t>.<body>", constant time, 5-minute tolerance,
        any current secret) and acts on its event once. Forged or stale: refused, logged,
        nothing written."""
        if provider != self.provider.name:
            raise TallyError(Reason.NOT_FOUND, f"provider: no provider {provider!r}",
                             field="provider")
        if len(payload) > MAX_WEBHOOK_BYTES:
            raise invalid("payload", f"larger than {MAX_WEBHOOK_BYTES} bytes")
        try:
            self.provider.verify_webhook(payload, signature_header, self.webhook_secrets,
                                         int(self.clock()))
        except signing.SignatureError as exc:
            log.warning("webhook_refused", provider=provider, why=str(exc),
                        payload_bytes=len(payload))
            metrics.PAYMENT_WEBHOOKS.labels(provider, "REFUSED").inc()
            raise TallyError(Reason.WEBHOOK_SIGNATURE_INVALID,
                             f"signature_header: {exc}", field="signature_header") from exc
        try:
            event = self.provider.parse_event(payload)
        except ValueError as exc:
            raise invalid("payload", f"not a {provider} event: {exc}") from exc
        first, order, outcome = await self.store.apply_event(
            provider, event, payload,
            d.Caller(actor=f"provider:{provider}", trace_id=current_trace_id()))
        log.info("webhook_processed", provider=provider, event_id=event.event_id,
                 type=event.type.value, payment_order_id=event.payment_order_id,
                 first_time=first, outcome=outcome.value)
        metrics.PAYMENT_WEBHOOKS.labels(provider,
                                        outcome.value if first else "DUPLICATE").inc()
        return first, order

    # -- manual settlement -----------------------------------------------------------------

    async def record_manual(self, cmd: p.ManualPaymentCommand, caller: d.Caller
                            ) -> p.PaymentOrder:
        """A PENDING MANUAL order: nothing is credited until someone else approves it."""
        p.validate_manual_payment(cmd)
        return await self.store.create_order(p.PaymentOrder(
            cmd.payment_order_id, cmd.org_id, p.PaymentOrderKind.MANUAL,
            p.PaymentOrderState.PENDING, cmd.amount_minor, cmd.currency, cmd.credits_micros,
            cmd.bonus_credits_micros, MANUAL_PROVIDER, caller.actor,
            self.store.ledger.clock(), manual_method=cmd.method,
            reference=cmd.reference.strip()), d.fingerprint(cmd))

    async def approve(self, order_id: str, caller: d.Caller
                      ) -> tuple[p.PaymentOrder, d.Balance]:
        """Credits a manual payment (four eyes: not by its recorder)."""
        d.raise_if([d.check_id("payment_order_id", order_id)])
        return await self.store.approve(order_id, caller)

    # -- refunds ---------------------------------------------------------------------------

    async def refund(self, refund_id: str, order_id: str, amount_micros: int, reason: str,
                     caller: d.Caller) -> tuple[p.RefundPlan, d.Transfer, p.PaymentOrder]:
        """Reverses unspent purchased credit, then has the provider return the money in
        proportion. If the provider cannot be reached the refund stands and its money is sent
        by `retry_refunds` (the provider call is idempotent on the refund id)."""
        d.raise_if([d.check_id("refund_id", refund_id),
                    d.check_id("payment_order_id", order_id),
                    d.check_amount("amount_micros", amount_micros, allow_zero=True),
                    None if reason.strip() else FieldViolation("reason", "is required")])
        plan, transfer, order = await self.store.refund(
            refund_id, order_id, amount_micros, reason.strip(), caller)
        await self._send_refunds(refund_id)
        return plan, transfer, order

    async def retry_refunds(self) -> int:
        """Sends the money of refunds the provider has not confirmed yet."""
        return await self._send_refunds("")

    async def _send_refunds(self, refund_id: str) -> int:
        pending = await self.store.pending_provider_refunds(refund_id)
        for pending_id, order, amount_minor in pending:
            try:
                money = await self.provider.refund(order.provider_session_id, amount_minor,
                                                   pending_id)
            except ProviderError as exc:
                log.warning("provider_refund_failed", refund_id=pending_id,
                            payment_order_id=order.payment_order_id, why=str(exc))
                await self.store.provider_refund_failed(pending_id, str(exc))
                continue
            await self.store.provider_refund_done(pending_id, money.refund_id)
        return len(pending)

    # -- automatic top-up ------------------------------------------------------------------

    async def set_auto_top_up(self, request_id: str, config: p.AutoTopUp, caller: d.Caller
                              ) -> p.AutoTopUp:
        """Validates and stores an org's configuration; its amount must be on sale now."""
        d.raise_if([d.check_id("request_id", request_id)])
        p.validate_auto_top_up(config)
        if config.enabled:
            await self._offer(config.package_id, config.custom, "auto_top_up.", checkout=False)
        return await self.store.set_auto_top_up(request_id, config, caller)

    async def top_up(self, config: p.AutoTopUp, caller: d.Caller) -> p.TopUpDecision:
        """Starts one automatic top-up of an org if its rules allow it now."""
        async def price(current: p.AutoTopUp) -> p.Offer:
            return await self._offer(current.package_id, current.custom, "auto_top_up.",
                                     checkout=False)

        decision, order = await self.store.open_top_up(config.org_id, price,
                                                        self.provider.name, caller)
        metrics.TOP_UPS.labels(decision.value).inc()
        if order is not None:
            await self.charge(order, config.payment_method_id, caller)
        return decision

    async def charge(self, order: p.PaymentOrder, payment_method_id: str, caller: d.Caller
                     ) -> None:
        """Hands a top-up order to the provider; an outright refusal fails the order now (no
        webhook will come), anything else is settled by the webhook."""
        try:
            payment_id = await self.provider.charge(ChargeRequest(
                order.payment_order_id, order.org_id, order.amount_minor, order.currency,
                payment_method_id, f"automatic top-up: {p.describe(_offer_of(order))}"))
        except ProviderUnavailable as exc:
            # nothing was charged that the same key would not replay: resume_top_ups asks
            # again later, and the order stays PENDING (credit comes only by webhook)
            log.warning("top_up_charge_unavailable", org_id=order.org_id,
                        payment_order_id=order.payment_order_id, why=str(exc))
            return
        except ProviderError as exc:
            log.warning("top_up_charge_refused", org_id=order.org_id,
                        payment_order_id=order.payment_order_id, why=str(exc))
            await self.store.fail_order(order.payment_order_id, exc.code or str(exc), caller)
            return
        await self.store.attach_session(order.payment_order_id, payment_id, "")

    async def resume_top_ups(self, caller: d.Caller, older_than: timedelta) -> int:
        """Charges top-up orders opened but never handed to the provider (a stop in between);
        the provider's idempotency on the order id makes a doubled charge impossible."""
        orders = await self.store.unstarted_top_ups(older_than)
        for order in orders:
            config = await self.store.get_auto_top_up(order.org_id)
            await self.charge(order, config.payment_method_id, caller)
        return len(orders)


def _offer_of(order: p.PaymentOrder) -> p.Offer:
    return p.Offer(order.amount_minor, order.currency, order.credits_micros,
                   order.bonus_credits_micros, order.package_id, order.price_book_version)
