"""Authorizer: runs the checks of `domain.py` against the store, the price books, the
quota limiter and the org's credit lease, in the order documented there.

The common case is one statement in metering's database (SpendStore.hold: replay check,
budgets, lease, the authorization with its holds; group-committed per org). A budget that
asks for more than a plain ALLOW (downgrade, deny) is decided under its lock
(SpendStore.decide), and only a request the lease cannot cover waits for the ledger (the
lease manager extends the lease, or the ledger's answer is the DENY).

Every answer is recorded under the request id, so a replay gets the same decision and the
same reservation, whatever happened in between; a different payload under the same id is
IDEMPOTENCY_KEY_REUSED. Quota counters are consumed before budgets are checked: a request a
budget or the ledger then refuses still counted against its rate limits (like any attempt).

A replay consumes no quota: for an org with quotas the recorded answer is looked up before
the limiter, and copies of one request id arriving at a replica while it is being decided
wait for that decision (one per replica) and then replay it. Copies that reach different
replicas at the same instant, before either has recorded, can each consume one unit (at most
one per replica); the answer is still the one recorded first.

A DENY for credit (INSUFFICIENT_CREDITS) carries the headroom an ALLOW does: each quota,
each budget (with nothing held) and the balance, i.e. what the org can spend: the lease's
free credit plus what the ledger could still lease (as of its last answer to metering, see
migration 0006_authz_balance).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace

from tally.kit.errors import Reason, TallyError, invalid
from tally.kit.log import get_logger
from tally.rating import PriceBook, RatingError

from ..ingestion.committer import PriceBooks
from ..policies import Budget, Quota, SpendPolicy
from . import domain as az
from .lease import LeaseFigures
from .store import Decide, Decided, Hold, NeedsCredit, Outcome, Replayed, SpendStore

log = get_logger("metering.authorizer")
_tracer = trace.get_tracer("tally.metering.authorizer")

_LEDGER_REFUSALS = {Reason.INSUFFICIENT_CREDITS, Reason.ACCOUNT_READ_ONLY}


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


class Credit(Protocol):
    """The org's credit lease as Authorize needs it (spend.lease_manager.LeaseManager)."""

    async def ensure(self, org_id: str, needed_micros: int) -> tuple[LeaseFigures, int]:
        """Extends the lease in the ledger so `needed_micros` fits; (the lease after, what the
        ledger added). Raises TallyError: ACCOUNT_READ_ONLY, UNAVAILABLE..."""
        ...

    def held(self, org_id: str, micros: int, free_micros: int) -> None:
        """A request now holds `micros` of the lease, which has `free_micros` left."""
        ...


_MAX_EXTENSIONS = 4  # a request waits for at most this many lease extensions


class Authorizer:
    """May this request run, on which model, at what worst-case cost?"""

    def __init__(self, store: SpendStore, policies: PolicySource, books: PriceBooks,
                 credit: Credit, quotas: QuotaGate,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.policies = policies
        self.books = books
        self.credit = credit
        self.quotas = quotas
        self.clock = clock
        self._deciding: dict[tuple[str, str], asyncio.Event] = {}

    async def authorize(self, request: az.AuthorizeRequest) -> az.Answer:
        """The decision for `request`; the same one again for a replay of its id."""
        az.validate(request)
        key = (request.org_id, request.request_id)
        while (deciding := self._deciding.get(key)) is not None:
            await deciding.wait()  # a copy being decided here: then this one is its replay
        self._deciding[key] = done = asyncio.Event()
        try:
            return await self._authorize(request)
        finally:
            del self._deciding[key]
            done.set()

    async def _authorize(self, request: az.AuthorizeRequest) -> az.Answer:
        fingerprint = request.fingerprint()
        now = self.clock()
        policy = await self.policies.policy_for(request.org_id)
        refused = az.check_policy(policy, request)
        if refused is not None:
            return await self._record(request, fingerprint, refused)
        if trace.get_current_span().is_recording():
            with _tracer.start_as_current_span("metering.price_book") as span:
                book = self.books.history.book_at(now)  # the local copy pricing keeps current
                first = self._estimate(book, request, request.model)
                span.set_attribute("tally.price_book_version", first.price_book_version)
        else:  # an untraced call: its child span would not be sampled (parent-based)
            book = self.books.history.book_at(now)
            first = self._estimate(book, request, request.model)
        quotas = await self.policies.quotas_for(request.org_id)
        if quotas:  # a replay must not count against them
            earlier = await self.store.recorded(request.org_id, request.request_id)
            if earlier is not None:
                return self._replayed(request, fingerprint, earlier)
        denied, headroom = await self.quotas.admit(request, quotas, policy)
        if denied is not None:
            return await self._record(request, fingerprint, denied)
        budgets = await self._budgets_in_force(request, now)
        plain = az.Answer(
            az.Decision.ALLOW, model=first.model,
            reservation_id=(reservation_id_for(request.org_id, request.request_id)
                            if first.cost_micros else ""),
            reserved_micros=first.cost_micros, price_book_version=first.price_book_version,
            expires_at=now + request.ttl, headroom=tuple(headroom))
        hold = Hold(request, fingerprint, plain,
                    [(b, start, az.allow_cap(b)) for b, start in budgets])

        def decide(states: list[az.BudgetState]) -> az.Answer:
            return self._decide(request, book, first, states, now, headroom)

        for _ in range(_MAX_EXTENSIONS + 1):
            try:
                decided = await self._decide_once(hold, budgets, decide)
            except Replayed:
                return await self._replay(request, fingerprint)
            except NeedsCredit as short:
                refusal = await self._more_credit(request, short.needed_micros, plain, budgets)
                if refusal is not None:
                    return await self._record(request, fingerprint, refusal)
                continue
            return await self._settle(request, decided, policy)
        raise TallyError(Reason.UNAVAILABLE, "the credit lease is contended: retry the request")

    async def _decide_once(self, hold: Hold, budgets: Sequence[tuple[Budget, datetime]],
                           decide: Decide) -> Decided:
        """The single statement; the budgets' locking path when a budget asks for more than
        a plain ALLOW. Raises Replayed, NeedsCredit."""
        result = await self.store.hold(hold)
        if result.outcome is Outcome.HELD:
            assert result.decided is not None
            return result.decided
        if result.outcome is Outcome.REPLAY:
            raise Replayed(hold.request.request_id)
        if result.outcome is Outcome.LEASE:
            raise NeedsCredit(hold.answer.reserved_micros)
        return await self.store.decide(hold.request, hold.request_hash, budgets, decide)

    async def _more_credit(self, request: az.AuthorizeRequest, needed: int,
                           plain: az.Answer, budgets: Sequence[tuple[Budget, datetime]]
                           ) -> az.Answer | None:
        """Extends the org's lease for `needed`: None to try again, or the refusal when the
        ledger cannot (INSUFFICIENT_CREDITS, ACCOUNT_READ_ONLY), with the headroom under
        every limit it met (the balance's when the ledger answered with figures)."""
        try:
            lease, added = await self.credit.ensure(request.org_id, needed)
        except TallyError as exc:
            if exc.reason not in _LEDGER_REFUSALS:
                raise  # UNAVAILABLE etc.: the client retries the same request id
            return az.deny(exc.reason, exc.message, version=plain.price_book_version,
                           headroom=await self._refused_headroom(plain, budgets, None))
        spendable = lease.spendable_micros
        if lease.free_micros >= needed or added > 0 or spendable >= needed:
            # room now, or the ledger had credit this extension did not take (another
            # request's, sized before concurrent holds took what it added): try again
            return None
        return az.deny(Reason.INSUFFICIENT_CREDITS,
                       f"amount_micros: {needed} micro-credits needed, {spendable} available",
                       version=plain.price_book_version,
                       headroom=await self._refused_headroom(plain, budgets, spendable))

    async def _refused_headroom(self, plain: az.Answer, budgets: Sequence[tuple[Budget, datetime]],
                                spendable: int | None) -> list[az.Headroom]:
        """The quotas' headroom, each budget's with nothing held, and the balance (what the
        org can spend, when known)."""
        room = [*plain.headroom, *az.budget_headroom(
            await self.store.budget_states(budgets) if budgets else [], 0)]
        if spendable is not None:
            room.append(az.Headroom("balance", "micros", spendable, spendable))
        return room

    async def _settle(self, request: az.AuthorizeRequest, decided: Decided,
                      policy: SpendPolicy) -> az.Answer:
        """A recorded answer: a THROTTLED org past its reduced rate gives its holds back."""
        answer = decided.answer
        if answer.decision is az.Decision.DENY or not answer.reserved_micros:
            return answer
        if decided.billing_state == "THROTTLED":
            throttled = await self.quotas.throttle(request.org_id, policy)
            if throttled is not None:
                refused = replace(throttled, price_book_version=answer.price_book_version,
                                  headroom=answer.headroom)
                await self.store.refuse(request.org_id, request.request_id, refused)
                return refused
        self.credit.held(request.org_id, answer.reserved_micros, decided.lease_free)
        return answer

    async def _replay(self, request: az.AuthorizeRequest, fingerprint: str) -> az.Answer:
        earlier = await self.store.authorization(request.org_id, request.request_id)
        assert earlier is not None  # recorded, and nothing deletes authorizations
        return self._replayed(request, fingerprint, earlier)

    @staticmethod
    def _replayed(request: az.AuthorizeRequest, fingerprint: str,
                  earlier: tuple[str, str, az.Answer]) -> az.Answer:
        stored_hash, _, answer = earlier
        if stored_hash != fingerprint and stored_hash != request.legacy_fingerprint():
            raise TallyError(Reason.IDEMPOTENCY_KEY_REUSED,
                             f"request_id: {request.request_id!r} was used for another request",
                             field="request_id")
        return answer

    async def _record(self, request: az.AuthorizeRequest, fingerprint: str,
                      refused: az.Answer) -> az.Answer:
        """Records a DENY decided before any hold (or answers the earlier call's replay)."""
        try:
            decided = await self.store.decide(request, fingerprint, [], lambda _: refused)
        except Replayed:
            return await self._replay(request, fingerprint)
        return decided.answer

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
