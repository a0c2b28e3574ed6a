"""Automatic top-up: follows the ledger's BALANCE_CHANGED events and starts a top-up for an
org whose available credit is below its threshold.

Events are read from the outbox after a cursor kept in the database, so a restart (or another
replica) resumes where the last one stopped. They only say which orgs to look at: the balance
compared with the threshold is the one in the accounts now, and whether to top up is decided
again under a lock on the org's configuration, so a burst of events crossing the threshold
opens one order; a unique index makes a second in-flight order impossible even across
replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Final

from services.ledger import domain as d
from services.ledger.payments.service import Payments
from services.ledger.payments.store import TOP_UP_CURSOR, PaymentStore
from services.ledger.store import LedgerStore
from tally.kit.background import Signal, background_run
from tally.kit.log import get_logger
from tally.kit.telemetry import WORK_ITEMS

log = get_logger("ledger.top_up")

CALLER: Final = d.Caller(actor="service:auto-top-up")
RESUME_AFTER: Final = timedelta(seconds=30)
MIN_STEP_S: Final = 0.2


class TopUpWorker:
    """One pass (`step`) reads a page of events and acts on the orgs in it."""

    def __init__(self, payments: Payments, store: PaymentStore, ledger: LedgerStore, *,
                 poll_s: float = 0.2, page: int = 1000) -> None:
        self.payments = payments
        self.store = store
        self.ledger = ledger
        self.poll_s = poll_s
        self.page = page

    async def step(self) -> int:
        """Acts on the next page of events; returns how many were read. The cursor moves only
        after the page was acted on, so a failure (pricing unreachable, say) retries it."""
        after = await self.store.cursor(TOP_UP_CURSOR)
        # The events say which orgs' balances moved; what each balance is now is read from the
        # accounts (an org's events need not arrive in the order its transactions committed).
        orgs, last, read = await self.ledger.orgs_changed_after(
            after, [d.OutboxEventType.BALANCE_CHANGED], self.page)
        if not orgs:
            return 0
        configs = await self.store.enabled_top_ups(orgs)
        available = await self.store.available_now(list(configs))
        for org, config in configs.items():
            await self.store.note_threshold(org, available[org], CALLER)
            if available[org] < config.threshold_micros:
                decision = await self.payments.top_up(config, CALLER)
                log.info("top_up_considered", org_id=org, decision=decision.value,
                         available_micros=available[org])
        await self.store.advance(TOP_UP_CURSOR, last)
        return read

    async def run(self, stop: asyncio.Event, wake: Signal | None = None) -> None:
        """Steps until `stop`; when caught up, waits for `wake` (the outbox's new events) or
        `poll_s`. Failures are logged and retried."""
        while not stop.is_set():
            ticket = wake.ticket() if wake is not None else None  # taken before looking
            read = 0
            try:
                with background_run("top_up") as span:  # exported only when it read events
                    await self.payments.resume_top_ups(CALLER, RESUME_AFTER)
                    read = await self.step()
                    span.set_attribute(WORK_ITEMS, read)
            except Exception:
                log.exception("top_up_step_failed")
            if read < self.page:
                waiters = [asyncio.ensure_future(e.wait())
                           for e in (stop, *((ticket,) if ticket is not None else ()))]
                await asyncio.wait(waiters, timeout=self.poll_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                # woken by a stream of events: at most one step per MIN_STEP_S covers them
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), MIN_STEP_S)
