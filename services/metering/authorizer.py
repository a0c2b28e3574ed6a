"""Authorizer: runs the checks of `authorize.py` against the store, the price books, the
quota limiter and the ledger, in the order documented there.

Every answer is recorded under the request id, so a replay gets the same decision and the
same reservation, whatever happened in between; a different payload under the same id is
IDEMPOTENCY_KEY_REUSED. Quota counters are consumed before budgets are checked: a request a
budget or the ledger then refuses still counted against its rate limits (like any attempt).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opentelemetry import trace

from tally.kit.errors import Reason, TallyError, invalid
from tally.kit.log import get_logger
from tally.rating import PriceBook, RatingError

from . import authorize as az
from .ingestion.committer import PriceBooks
from .policies import Budget, Quota, SpendPolicy
from .spend_store import Decide, Replayed, SpendStore

log = get_logger("metering.authorizer")
_tracer = trace.get_tracer("tally.metering.authorizer")

_LEDGER_REFUSALS = {Reason.INSUFFICIENT_CREDITS, Reason.ACCOUNT_READ_ONLY}


class ReservingLedger(Protocol):
    """The ledger as Authorize needs it (the gRPC client implements it)."""

    async def reserve(self, reservation_id: str, org_id: str, amount_micros: int,
                      ttl: timedelta) -> tuple[int, str]:
        """Holds credit (idempotent on reservation_id); returns available after the hold and
        the org's billing state (ACTIVE, THROTTLED).
        Raises TallyError: INSUFFICIENT_CREDITS, ACCOUNT_READ_ONLY, UNAVAILABLE, ..."""
        ...

    async def release(self, reservation_id: str, org_id: str, reason: str) -> None:
        """Frees a hold (idempotent)."""
        ...


class PolicySource(Protocol):
    """Where the org's spend policy, quotas and budgets come from."""

    async def policy_for(self, org_id: str) -> SpendPolicy:
        """The org's spend policy (defaults when never set)."""
        ...

    async def quotas_for(self, org_id: str) -> list[Quota]:
        """The org's live quotas."""
        ...

    async def budgets_of(self, org_id: str) -> list[Budget]:
        """The org's live budgets."""
        ...


class QuotaGate(Protocol):
    """The rate limits of Authorize (quotas.LimiterGate implements it)."""

    async def admit(self, request: az.AuthorizeRequest, quotas: Sequence[Quota],
                    policy: SpendPolicy) -> tuple[az.Answer | None, list[az.Headroom]]:
        """Consumes every applicable quota counter, or none: (a DENY answer or None,
        headroom under each quota)."""
        ...

    async def throttle(self, org_id: str, policy: SpendPolicy) -> az.Answer | None:
        """An ACCOUNT_THROTTLED DENY when a THROTTLED org is past its reduced rate."""
        ...


def reservation_id_for(org_id: str, request_id: str) -> str:
    """The ledger hold of an authorization: derived, so a retry makes the same hold."""
    digest = hashlib.sha256(f"{org_id}\x1f{request_id}".encode()).hexdigest()[:40]
    return f"authz-{digest}"


class Authorizer:
    """May this request run, on which model, at what worst-case cost?"""

    def __init__(self, store: SpendStore, policies: PolicySource, books: PriceBooks,
                 ledger: ReservingLedger, quotas: QuotaGate,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.policies = policies
        self.books = books
        self.ledger = ledger
        self.quotas = quotas
        self.clock = clock
        self._confirms: list[tuple[str, str, az.Answer]] = []
        self._confirming: asyncio.Task[None] | None = None

    async def authorize(self, request: az.AuthorizeRequest) -> az.Answer:
        """The decision for `request`; the same one again for a replay of its id."""
        az.validate(request)
        fingerprint = request.fingerprint()
        earlier = await self.store.authorization(request.org_id, request.request_id)
        if earlier is not None:
            return await self._replay(request, fingerprint, *earlier)
        now = self.clock()
        policy = await self.policies.policy_for(request.org_id)
        refused = az.check_policy(policy, request)
        if refused is not None:
            return await self._record(request, fingerprint, [], lambda _: refused)
        with _tracer.start_as_current_span("metering.price_book") as span:
            book = self.books.history.book_at(now)  # the local copy pricing keeps current
            first = self._estimate(book, request, request.model)
            span.set_attribute("tally.price_book_version", first.price_book_version)
        quotas = await self.policies.quotas_for(request.org_id)
        denied, headroom = await self.quotas.admit(request, quotas, policy)
        if denied is not None:
            return await self._record(request, fingerprint, [], lambda _: denied)
        budgets = await self._budgets_in_force(request, now)

        def decide(states: list[az.BudgetState]) -> az.Answer:
            return self._decide(request, book, first, states, now, headroom)

        return await self._record(request, fingerprint, budgets, decide, then_hold=policy)

    async def _replay(self, request: az.AuthorizeRequest, fingerprint: str, stored_hash: str,
                      state: str, answer: az.Answer) -> az.Answer:
        if stored_hash != fingerprint:
            raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                             f"request_id: {request.request_id!r} was used for another request",
                             field="request_id")
        if state == "PENDING":  # the first call stopped between the budget and the ledger
            return await self._hold(request, answer, None)
        return answer

    async def _record(self, request: az.AuthorizeRequest, fingerprint: str,
                      budgets: Sequence[tuple[Budget, datetime]], decide: Decide, *,
                      then_hold: SpendPolicy | None = None) -> az.Answer:
        """Records the decision; with `then_hold`, makes its ledger hold. A call recorded
        first by a concurrent copy answers as that copy's replay (which holds, if needed)."""
        try:
            answer = await self.store.decide(request, fingerprint, budgets, decide)
        except Replayed:
            earlier = await self.store.authorization(request.org_id, request.request_id)
            assert earlier is not None
            return await self._replay(request, fingerprint, *earlier)
        return answer if then_hold is None else await self._hold(request, answer, then_hold)

    @staticmethod
    def _estimate(book: PriceBook, request: az.AuthorizeRequest, model: str) -> az.Estimate:
        try:
            return az.estimate(book, request, model)
        except RatingError as exc:
            # the rating reason (UNKNOWN_MODEL, UNKNOWN_METER, PRICE_NOT_FOUND) is the kit's
            raise invalid(exc.field or "model", exc.message, Reason(exc.reason.value)) from exc

    async def _budgets_in_force(self, request: az.AuthorizeRequest, now: datetime
                                ) -> list[tuple[Budget, datetime]]:
        found = []
        for budget in await self.policies.budgets_of(request.org_id):
            window = budget.window(now)
            if window is not None and budget.applies_to(request.project_id, request.labels):
                found.append((budget, window[0]))
        return found

    def _decide(self, request: az.AuthorizeRequest, book: PriceBook, first: az.Estimate,
                states: list[az.BudgetState], now: datetime,
                headroom: list[az.Headroom]) -> az.Answer:
        """The budget verdict (under the budgets' row locks) turned into an answer."""
        chosen, decision = first, az.Decision.ALLOW
        verdict = az.judge_budgets(states, first.cost_micros)
        if verdict.allowed and verdict.downgrade:
            cheaper = book.downgrade_for(first.model)
            if cheaper is not None:
                chosen = self._estimate(book, request, cheaper.model)
                decision = az.Decision.DOWNGRADE
                verdict = az.judge_budgets(states, chosen.cost_micros)
        if not verdict.allowed:
            assert verdict.denied_by is not None
            budget = verdict.denied_by
            return az.deny(
                Reason.BUDGET_EXCEEDED,
                f"budget {budget.name!r} ({budget.budget_id}) would exceed its limit of "
                f"{budget.limit_micros} micro-credits", version=first.price_book_version,
                headroom=[*headroom, *az.budget_headroom(states, 0)])
        return az.Answer(
            decision, model=chosen.model,
            reservation_id=(reservation_id_for(request.org_id, request.request_id)
                            if chosen.cost_micros else ""),
            reserved_micros=chosen.cost_micros, price_book_version=chosen.price_book_version,
            expires_at=now + request.ttl,
            message=("budget past its downgrade threshold: use the cheaper model"
                     if decision is az.Decision.DOWNGRADE else ""),
            headroom=(*headroom, *az.budget_headroom(states, chosen.cost_micros)))

    async def _hold(self, request: az.AuthorizeRequest, answer: az.Answer,
                    policy: SpendPolicy | None) -> az.Answer:
        """Makes the ledger hold of an ALLOW/DOWNGRADE; a refusal, or a THROTTLED org past its
        reduced rate, turns it into a DENY (and gives the holds back)."""
        if answer.decision is az.Decision.DENY or not answer.reservation_id:
            return answer
        try:
            available, billing_state = await self.ledger.reserve(
                answer.reservation_id, request.org_id, answer.reserved_micros, request.ttl)
        except TallyError as exc:
            if exc.reason not in _LEDGER_REFUSALS:
                raise  # UNAVAILABLE etc.: the client retries the same request id
            refused = az.deny(exc.reason, exc.message, version=answer.price_book_version,
                              headroom=answer.headroom)
            await self.store.refuse(request.org_id, request.request_id, refused)
            return refused
        if billing_state == "THROTTLED":
            policy = policy or await self.policies.policy_for(request.org_id)
            throttled = await self.quotas.throttle(request.org_id, policy)
            if throttled is not None:
                await self.ledger.release(answer.reservation_id, request.org_id,
                                          "org throttled past its reduced rate")
                refused = replace(throttled, price_book_version=answer.price_book_version,
                                  headroom=answer.headroom)
                await self.store.refuse(request.org_id, request.request_id, refused)
                return refused
        held = replace(answer, headroom=(
            *answer.headroom,
            az.Headroom("balance", "micros", available + answer.reserved_micros, available)))
        self._confirm_later(request.org_id, request.request_id, held)
        return held

    def _confirm_later(self, org_id: str, request_id: str, held: az.Answer) -> None:
        """Marks the authorization HELD off the request's path, many per statement. Losing
        it is harmless: a PENDING authorization's replay makes the same (idempotent) ledger
        hold again, and the sweeper and captures treat PENDING like HELD."""
        self._confirms.append((org_id, request_id, held))
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.create_task(self._flush_confirms(), name="confirm-holds")

    async def _flush_confirms(self) -> None:
        while self._confirms:
            batch, self._confirms = self._confirms, []
            try:
                await self.store.confirm_many(batch)
            except Exception as exc:  # see _confirm_later: they stay PENDING
                log.warning("confirm_holds_failed", count=len(batch), error=repr(exc))

    async def drain(self) -> None:
        """Waits for the confirmations still queued (at shutdown)."""
        if self._confirming is not None:
            await self._confirming

