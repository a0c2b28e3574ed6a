"""The rules of Authorize, in plain Python: what a valid question is, what the worst case
costs, which limits it meets and what the answer is. No grpc, no SQL: `authorizer.py`
orchestrates the store, the limiter and the ledger around these rules.

Order of checks (each later one is only reached if every earlier one passes):
1. the request's own fields (INVALID_ARGUMENT naming every bad field);
2. the org's spend policy: context length and upload size (CONTEXT_TOO_LONG, UPLOAD_TOO_LARGE);
3. the price of the worst case: estimated input plus max output tokens, and any other
   estimated meters, under the book in force now (UNKNOWN_MODEL, PRICE_NOT_FOUND);
4. quotas, all counters at once (QUOTA_EXCEEDED with a retry-after);
5. budgets, counting spent plus reserved plus this estimate (BUDGET_EXCEEDED, or DOWNGRADE
   past a SOFT_DOWNGRADE budget's threshold): in one statement while every budget stays
   within `allow_cap`, else under the budgets' row locks with `judge_budgets`;
6. the hold for the estimate on the org's credit lease (spend/lease.py), extended from the
   ledger when it cannot cover it (INSUFFICIENT_CREDITS, ACCOUNT_READ_ONLY on the ledger's
   answer), and for a THROTTLED org its spend policy's reduced rate (ACCOUNT_THROTTLED; the
   holds are given back). A request that costs nothing makes no hold and so meets no
   billing state.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from tally.kit.errors import FieldViolation, Reason, invalid_fields
from tally.kit.money import INT64_MAX
from tally.rating import Meter, PriceBook, UsageMode, rate_total

from ..policies import Budget, BudgetEnforcement, SpendPolicy

DEFAULT_TTL: Final = timedelta(seconds=300)
MAX_TTL: Final = timedelta(seconds=3600)
MAX_ID_LENGTH: Final = 128
MAX_ESTIMATED_QUANTITIES: Final = 20


class Decision(enum.StrEnum):
    """Authorize's three answers."""

    ALLOW = "ALLOW"
    DOWNGRADE = "DOWNGRADE"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """May this AI request run, on which model, at what worst-case cost?"""

    request_id: str
    org_id: str
    model: str
    project_id: str = ""
    environment: str = ""
    user_id: str = ""
    api_key_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    operation: str = ""
    mode: UsageMode = UsageMode.ONLINE
    estimated_input_tokens: int = 0
    max_output_tokens: int = 0
    upload_bytes: int = 0
    context_tokens: int = 0
    ttl: timedelta = DEFAULT_TTL
    region: str = ""
    estimated_quantities: tuple[tuple[Meter | None, int], ...] = ()

    def fingerprint(self) -> str:
        """Hash of the request's meaning: the same id with another one is key reuse. (A
        repr of plain values, not JSON: this runs on every Authorize.)"""
        body = (self.org_id, self.model, self.project_id, self.environment, self.user_id,
                self.api_key_id, sorted(self.labels.items()), self.operation, self.mode.value,
                self.estimated_input_tokens, self.max_output_tokens, self.upload_bytes,
                self.context_tokens, self.ttl.total_seconds(), self.region,
                sorted((m.value if m else "", q) for m, q in self.estimated_quantities))
        return "v2:" + hashlib.sha256(repr(body).encode()).hexdigest()[:61]

    def legacy_fingerprint(self) -> str:
        """The fingerprint authorizations were recorded with before v2 (their replays)."""
        body = [self.org_id, self.model, self.project_id, self.environment, self.user_id,
                self.api_key_id, sorted(self.labels.items()), self.operation, self.mode.value,
                self.estimated_input_tokens, self.max_output_tokens, self.upload_bytes,
                self.context_tokens, self.ttl.total_seconds(), self.region,
                sorted((m.value if m else "", q) for m, q in self.estimated_quantities)]
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def validate(request: AuthorizeRequest) -> None:
    """Raises INVALID_ARGUMENT naming every bad field of the request."""
    problems: list[FieldViolation] = []

    def bad(name: str, message: str) -> None:
        problems.append(FieldViolation(name, message))

    if not request.request_id or len(request.request_id) > MAX_ID_LENGTH:
        bad("request_id", f"must be 1..{MAX_ID_LENGTH} characters")
    if not request.org_id or len(request.org_id) > MAX_ID_LENGTH:
        bad("context.org_id", f"must be 1..{MAX_ID_LENGTH} characters")
    if not request.model:
        bad("model", "is required")
    for name in ("estimated_input_tokens", "max_output_tokens", "upload_bytes",
                 "context_tokens"):
        if getattr(request, name) < 0:
            bad(name, "must be >= 0")
    if not timedelta(0) < request.ttl <= MAX_TTL:
        bad("reservation_ttl_seconds", f"must be 0 (default) or 1..{int(MAX_TTL.total_seconds())}")
    if len(request.estimated_quantities) > MAX_ESTIMATED_QUANTITIES:
        bad("estimated_quantities", f"at most {MAX_ESTIMATED_QUANTITIES} entries")
    seen: set[Meter] = set()
    for i, (meter, quantity) in enumerate(request.estimated_quantities):
        if meter is None:
            bad(f"estimated_quantities[{i}].meter", "is not a known meter")
        elif meter in seen or meter in (Meter.INPUT_TOKENS, Meter.OUTPUT_TOKENS):
            bad(f"estimated_quantities[{i}].meter", f"{meter} is given twice")
        else:
            seen.add(meter)
        if quantity < 0:
            bad(f"estimated_quantities[{i}].quantity", "must be >= 0")
    if problems:
        raise invalid_fields(problems)


@dataclass(frozen=True, slots=True)
class Headroom:
    """Room left under one limit after the decision."""

    scope: str
    unit: str
    limit: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Answer:
    """What Authorize answers (and replays for the same request id)."""

    decision: Decision
    model: str = ""
    reservation_id: str = ""
    reserved_micros: int = 0
    deny_reason: str = ""
    retry_after_ms: int = 0
    message: str = ""
    price_book_version: int = 0
    expires_at: datetime | None = None
    headroom: tuple[Headroom, ...] = ()


def deny(reason: Reason, message: str, *, retry_after_ms: int = 0, version: int = 0,
         headroom: Sequence[Headroom] = ()) -> Answer:
    """A DENY answer with a stable reason."""
    return Answer(Decision.DENY, deny_reason=reason.value, message=message,
                  retry_after_ms=retry_after_ms, price_book_version=version,
                  headroom=tuple(headroom))


def check_policy(policy: SpendPolicy, request: AuthorizeRequest) -> Answer | None:
    """A DENY when the request breaks the org's per-request guard rails, else None."""
    if policy.max_context_tokens and request.context_tokens > policy.max_context_tokens:
        return deny(Reason.CONTEXT_TOO_LONG,
                    f"context_tokens: {request.context_tokens} exceeds the org's limit of "
                    f"{policy.max_context_tokens}")
    if policy.max_upload_bytes and request.upload_bytes > policy.max_upload_bytes:
        return deny(Reason.UPLOAD_TOO_LARGE,
                    f"upload_bytes: {request.upload_bytes} exceeds the org's limit of "
                    f"{policy.max_upload_bytes}")
    return None


@dataclass(frozen=True, slots=True)
class Estimate:
    """The worst-case price of a request on one model."""

    model: str
    cost_micros: int
    price_book_version: int


def estimate(book: PriceBook, request: AuthorizeRequest, model: str) -> Estimate:
    """Prices estimated input plus max output (plus other estimated meters) under `book`,
    rounded up to the next micro-credit (a hold must cover the charge). Raises RatingError
    for an unknown model or a missing price."""
    entry = book.resolve_model(model)
    quantities: dict[Meter, int] = {Meter.INPUT_TOKENS: request.estimated_input_tokens,
                                    Meter.OUTPUT_TOKENS: request.max_output_tokens}
    quantities.update((m, q) for m, q in request.estimated_quantities if m is not None)
    cost, carry = rate_total(book, entry.model, request.mode, request.region,
                             {m: q for m, q in quantities.items() if q})
    version = int(book.version) if str(book.version).isdigit() else 0
    return Estimate(entry.model, cost + (1 if carry else 0), version)


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget with what it has spent and holds in the period of the request."""

    budget: Budget
    period_start: datetime
    spent_micros: int
    reserved_micros: int

    @property
    def committed(self) -> int:
        """Spent plus held: what parallel requests cannot overshoot together."""
        return self.spent_micros + self.reserved_micros


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """What the budgets say about one estimate."""

    allowed: bool
    downgrade: bool
    denied_by: Budget | None = None


def judge_budgets(states: Sequence[BudgetState], cost_micros: int) -> BudgetVerdict:
    """HARD and SOFT_DOWNGRADE budgets deny what would take them past their limit;
    SOFT_DOWNGRADE asks to downgrade from its threshold on; ALERT_ONLY never blocks."""
    downgrade = False
    for state in states:
        budget = state.budget
        after = state.committed + cost_micros
        if budget.enforcement is BudgetEnforcement.ALERT_ONLY:
            continue
        if after > budget.limit_micros:
            return BudgetVerdict(False, False, budget)
        if (budget.enforcement is BudgetEnforcement.SOFT_DOWNGRADE
                and after * 100 >= budget.limit_micros * budget.downgrade_at_percent):
            downgrade = True
    return BudgetVerdict(True, downgrade)


def allow_cap(budget: Budget) -> int:
    """The most a budget may have spent plus held after a request that it answers with a plain
    ALLOW (judge_budgets' rule as one bound: Authorize's single statement checks it, and a
    request past it is decided by judge_budgets under the budget's lock)."""
    if budget.enforcement is BudgetEnforcement.ALERT_ONLY:
        return INT64_MAX
    if budget.enforcement is BudgetEnforcement.SOFT_DOWNGRADE:
        # after * 100 < limit * percent, in integers
        below_threshold = -(-budget.limit_micros * budget.downgrade_at_percent // 100) - 1
        return min(budget.limit_micros, below_threshold)
    return budget.limit_micros


def budget_headroom(states: Sequence[BudgetState], cost_micros: int) -> list[Headroom]:
    """Room left under each budget once `cost_micros` is held."""
    return [Headroom(f"budget:{s.budget.budget_id}", "micros", s.budget.limit_micros,
                     s.budget.limit_micros - s.committed - cost_micros) for s in states]


def crossed_thresholds(budget: Budget, spent_before: int, spent_after: int) -> list[int]:
    """Alarm thresholds (percent) that `spent_after` reaches and `spent_before` did not."""
    return [t for t in budget.alarm_thresholds_percent
            if spent_before * 100 < budget.limit_micros * t <= spent_after * 100]
