"""Envoy's rate-limit question (ShouldRateLimit) answered with Authorize's rules, in plain
Python: a mesh refuses a request before it reaches a model when Authorize would refuse it for
a quota, for a throttled or read-only account, or because the org's credit or a budget is
exhausted.

A descriptor is one question, its entries name who is asking (keys in `KEYS`; `org_id` is
required). Each descriptor:
1. its quotas, counted in the same limiter and counters as Authorize (`LimiterGate.admit`):
   hits consume the rps/rpd counters like Authorize's requests do (`hits_addend` of them),
   the tpm counters by the descriptor's `tokens` estimate; a refusal is QUOTA_EXCEEDED with
   the limiter's retry-after;
2. its budgets (HARD and SOFT_DOWNGRADE, the ones Authorize's `judge_budgets` can deny by):
   exhausted when spent plus held has reached the limit (BUDGET_EXCEEDED, until the period
   ends);
3. the org's credit: its billing state (ACCOUNT_READ_ONLY; a THROTTLED org's reduced rate,
   ACCOUNT_THROTTLED) and its credit lease: when the lease has no free credit the lease
   manager is asked for more, exactly as Authorize does, and a ledger that has none is
   INSUFFICIENT_CREDITS.

No reservation and no authorization record is made: the mesh's answer holds no credit, and
the request that passes still calls Authorize (its gateway, or the service behind the mesh)
for its hold. The order and the counting are Authorize's, so for the same descriptors and the
same quotas the OK / OVER_LIMIT sequence is Authorize's quota outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

from tally.kit.errors import FieldViolation, Reason, TallyError, invalid_fields
from tally.limits import DAY_US, MINUTE_US, SECOND_US
from tally.rating import RatingError

from ..ingestion.committer import PriceBooks
from ..policies import Budget, BudgetEnforcement, Quota, QuotaKind, SpendPolicy
from . import domain as az
from .authorizer import Credit, PolicySource
from .lease import LeaseFigures

DOMAIN: Final = "tally"
"""The rate-limit domain metering answers for (Envoy's `domain` of the filter)."""

KEYS: Final = {
    "org_id": "org the request is billed to (required)",
    "project_id": "project (project and environment quotas, project budgets)",
    "environment": "environment within the project (environment quotas)",
    "api_key_id": "API key id (api-key quotas)",
    "user_id": "end user (informational)",
    "model": "public model or alias requested (checked against the price book)",
    "tokens": "estimated tokens of the request (tokens-per-minute quotas; default 0)",
}
"""Descriptor entry keys; `label.<name>` entries are labels (label budgets)."""
LABEL_PREFIX: Final = "label."
MAX_ENTRIES: Final = 32
MAX_DESCRIPTORS: Final = 16
MAX_VALUE_LENGTH: Final = 128
MAX_HITS: Final = 1_000_000

_PERIOD_OF: Final = {QuotaKind.REQUESTS_PER_SECOND: SECOND_US,
                     QuotaKind.LONG_CONTEXT_REQUESTS_PER_SECOND: SECOND_US,
                     QuotaKind.TOKENS_PER_MINUTE: MINUTE_US,
                     QuotaKind.REQUESTS_PER_DAY: DAY_US}


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One question of a ShouldRateLimit call."""

    org_id: str
    project_id: str = ""
    environment: str = ""
    api_key_id: str = ""
    user_id: str = ""
    model: str = ""
    tokens: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    hits: int = 1


def descriptor(index: int, entries: Sequence[tuple[str, str]], hits: int) -> Descriptor:
    """The descriptor's entries as a question; INVALID_ARGUMENT naming every bad entry."""
    where = f"descriptors[{index}]"
    problems: list[FieldViolation] = []
    values: dict[str, str] = {}
    labels: dict[str, str] = {}
    if not entries or len(entries) > MAX_ENTRIES:
        problems.append(FieldViolation(f"{where}.entries", f"must have 1..{MAX_ENTRIES} entries"))
    for j, (key, value) in enumerate(entries):
        at = f"{where}.entries[{j}]"
        if key not in KEYS and not (key.startswith(LABEL_PREFIX) and len(key) > len(LABEL_PREFIX)):
            problems.append(FieldViolation(f"{at}.key", f"unknown descriptor key {key!r}; "
                                           f"known: {', '.join(KEYS)}, label.<name>"))
        elif (key[len(LABEL_PREFIX):] in labels if key.startswith(LABEL_PREFIX)
              else key in values):
            problems.append(FieldViolation(f"{at}.key", f"{key!r} is given twice"))
        elif len(value) > MAX_VALUE_LENGTH:
            problems.append(FieldViolation(f"{at}.value", f"at most {MAX_VALUE_LENGTH} chars"))
        elif key.startswith(LABEL_PREFIX):
            labels[key[len(LABEL_PREFIX):]] = value
        else:
            values[key] = value
    if not values.get("org_id") and not any(p.field.endswith(".entries") for p in problems):
        problems.append(FieldViolation(f"{where}.entries", "an org_id entry is required"))
    if hits > MAX_HITS:
        problems.append(FieldViolation(f"{where}.hits_addend", f"at most {MAX_HITS}"))
    tokens = values.pop("tokens", "0")
    if not tokens.isdigit() or len(tokens) > 12:
        problems.append(FieldViolation(f"{where}.entries", "tokens must be an integer >= 0"))
    if problems:
        raise invalid_fields(problems)
    # 0 is "not set" in Envoy's request: one hit, as for Authorize's one request
    return Descriptor(tokens=int(tokens), labels=labels, hits=max(hits, 1), **values)


@dataclass(frozen=True, slots=True)
class Status:
    """The answer for one descriptor."""

    reason: str = ""
    """Empty = OK; else the reason Authorize would DENY with."""
    message: str = ""
    retry_after_ms: int = 0
    """How long until the limit resets (0: unknown, or not until something changes)."""
    limit: int = 0
    """The tightest quota that applied: its limit ...,"""
    period_us: int = 0
    """... per this period (0: no quota applied) ..."""
    remaining: int = 0
    """... and what is left under it."""
    limit_name: str = ""

    @property
    def over_limit(self) -> bool:
        """Whether the mesh should refuse the request."""
        return bool(self.reason)


@dataclass(frozen=True, slots=True)
class Verdict:
    """ShouldRateLimit's answer: one status per descriptor."""

    statuses: tuple[Status, ...]

    @property
    def refusal(self) -> Status | None:
        """The first descriptor refused (its reason is the request's), or None."""
        return next((s for s in self.statuses if s.over_limit), None)


class QuotaCounter(Protocol):
    """Authorize's quota gate (quotas.LimiterGate)."""

    async def admit(self, request: az.AuthorizeRequest, quotas: Sequence[Quota],
                    policy: SpendPolicy, hits: int = 1
                    ) -> tuple[az.Answer | None, list[az.Headroom]]:
        """Consumes every applicable quota or none."""
        ...

    async def throttle(self, org_id: str, policy: SpendPolicy) -> az.Answer | None:
        """ACCOUNT_THROTTLED past a THROTTLED org's rate."""
        ...


class Leases(Protocol):
    """The org's credit lease as metering stores it (lease_store.LeaseStore)."""

    async def lease_of(self, org_id: str) -> LeaseFigures | None:
        """The lease row, None before the org's first."""
        ...


class BudgetUsage(Protocol):
    """Budgets' spent and held per period (store.SpendStore)."""

    async def budget_usage(self, keys: Sequence[tuple[str, datetime]]
                           ) -> dict[tuple[str, datetime], tuple[int, int]]:
        """(spent, reserved) per (budget, period start) found."""
        ...


class ModelCatalog(Protocol):
    """Whether a model name resolves in the price book in force."""

    def knows(self, model: str) -> bool:
        """True when `model` (or the alias) is priced now."""
        ...


class PricedModels:
    """ModelCatalog over the local copy of pricing's books."""

    def __init__(self, books: PriceBooks,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.books = books
        self.clock = clock

    def knows(self, model: str) -> bool:
        """True when `model` resolves in the book in force now."""
        try:
            self.books.history.book_at(self.clock()).resolve_model(model)
        except RatingError:
            return False
        return True


_LEDGER_REFUSALS = {Reason.INSUFFICIENT_CREDITS, Reason.ACCOUNT_READ_ONLY}


class RateLimitChecker:
    """Answers ShouldRateLimit with Authorize's quota, budget and credit rules."""

    def __init__(self, policies: PolicySource, quotas: QuotaCounter, leases: Leases,
                 credit: Credit, budgets: BudgetUsage, models: ModelCatalog,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.policies = policies
        self.quotas = quotas
        self.leases = leases
        self.credit = credit
        self.budgets = budgets
        self.models = models
        self.clock = clock

    async def check(self, domain: str, descriptors: Sequence[Descriptor]) -> Verdict:
        """One status per descriptor (validated first, so a bad call counts nothing)."""
        problems = []
        if domain != DOMAIN:
            problems.append(FieldViolation("domain", f"must be {DOMAIN!r}, got {domain!r}"))
        if not 1 <= len(descriptors) <= MAX_DESCRIPTORS:
            problems.append(FieldViolation("descriptors", f"must have 1..{MAX_DESCRIPTORS}"))
        for i, d in enumerate(descriptors):
            if d.model and not self.models.knows(d.model):
                problems.append(FieldViolation(f"descriptors[{i}].entries",
                                               f"model {d.model!r} is not in the price book"))
        if problems:
            raise invalid_fields(problems)
        return Verdict(tuple([await self._one(d) for d in descriptors]))

    async def _one(self, d: Descriptor) -> Status:
        policy = await self.policies.policy_for(d.org_id)
        quotas = await self.policies.quotas_for(d.org_id)
        question = az.AuthorizeRequest(
            request_id="ratelimit", org_id=d.org_id, model=d.model, project_id=d.project_id,
            environment=d.environment, user_id=d.user_id, api_key_id=d.api_key_id,
            labels=d.labels, estimated_input_tokens=d.tokens)
        denied, headroom = await self.quotas.admit(question, quotas, policy, d.hits)
        tightest = _tightest(headroom, quotas)
        if denied is not None:
            return _refused(denied, tightest)
        refused = await self._budget_exhausted(d) or await self._credit_refusal(d, policy)
        return _refused(refused, tightest) if refused is not None else tightest

    async def _budget_exhausted(self, d: Descriptor) -> az.Answer | None:
        now = self.clock()
        found: list[tuple[Budget, datetime, datetime]] = []
        for budget in await self.policies.budgets_of(d.org_id):
            window = budget.window(now)
            if (window is not None and budget.enforcement is not BudgetEnforcement.ALERT_ONLY
                    and budget.applies_to(d.project_id, d.labels)):
                found.append((budget, *window))
        if not found:
            return None
        usage = await self.budgets.budget_usage([(b.budget_id, start) for b, start, _ in found])
        for budget, start, end in found:
            spent, held = usage.get((budget.budget_id, start), (0, 0))
            if spent + held >= budget.limit_micros:
                return az.deny(
                    Reason.BUDGET_EXCEEDED,
                    f"budget {budget.name!r} ({budget.budget_id}) has reached its limit of "
                    f"{budget.limit_micros} micro-credits",
                    retry_after_ms=max(1, int((end - now).total_seconds() * 1000)))
        return None

    async def _credit_refusal(self, d: Descriptor, policy: SpendPolicy) -> az.Answer | None:
        lease = await self.leases.lease_of(d.org_id)
        if lease is not None and lease.billing_state == "READ_ONLY":
            return az.deny(Reason.ACCOUNT_READ_ONLY, f"org {d.org_id} is read-only")
        if lease is None or lease.free_micros <= 0 or lease.expires_at <= self.clock():
            try:
                lease, added = await self.credit.ensure(d.org_id, 1)
            except TallyError as exc:
                if exc.reason not in _LEDGER_REFUSALS:
                    raise
                return az.deny(exc.reason, exc.message)
            if lease.free_micros <= 0 and added <= 0:
                return az.deny(Reason.INSUFFICIENT_CREDITS,
                               f"org {d.org_id} has no available credit")
        if lease.billing_state == "THROTTLED":
            return await self.quotas.throttle(d.org_id, policy)
        return None


def _tightest(headroom: Sequence[az.Headroom], quotas: Sequence[Quota]) -> Status:
    """An OK status describing the quota with the least room left (none: no quota applied)."""
    by_scope = {f"quota:{q.quota_id}": q for q in quotas}
    counted = [(h, by_scope[h.scope]) for h in headroom if h.scope in by_scope]
    if not counted:
        return Status()
    room, quota = min(counted, key=lambda hq: hq[0].remaining)
    return Status(limit=quota.limit, period_us=_PERIOD_OF[quota.kind],
                  remaining=max(room.remaining, 0),
                  limit_name=f"{quota.kind.value}:{quota.quota_id}")


def _refused(answer: az.Answer, tightest: Status) -> Status:
    return Status(reason=answer.deny_reason, message=answer.message,
                  retry_after_ms=answer.retry_after_ms, limit=tightest.limit,
                  period_us=tightest.period_us, remaining=0, limit_name=tightest.limit_name)
