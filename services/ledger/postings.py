"""Postings: the ledger's rules for usage debits, as a plan, in plain Python.

A usage batch is one debit per org (OrgUsageDebit). Given the orgs' positions as the unit of
work locked and loaded them (OrgPosition: balances, hash-chain head, billing state, open
grants) and the reservations the events settle, `plan_usage` decides everything the
transaction writes — entries (one USAGE transfer per org per batch, plus one for the part that
became arrears, each hashed once), balance changes, grant burns, reservation captures, billing
state transitions and outbox rows — without a database. `services.ledger.usage_work` loads,
locks and writes it.

`debit_org_usage` is the one place an org's usage meets its credit: a credit lease (a
reservation metering holds for the org) is consumed there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

from services.ledger import domain as d
from tally.kit.errors import Reason, TallyError, invalid
from tally.kit.money import INT64_MAX

TRANSFER_COLUMNS: Final = (
    "transfer_id", "kind", "debit_account_id", "credit_account_id", "org_id", "amount_micros",
    "actor", "reason", "trace_id", "user_id", "labels", "grant_id", "reservation_id",
    "reverses_transfer_id", "payment_order_id", "created_at", "prev_hash", "entry_hash",
    "org_posted_after", "org_held_after", "org_arrears_after", "hash_version",
)
"""A transfer row as the store writes it (then `org_billing_state_after`)."""

ARREARS_REASON: Final = "usage beyond available credit"


@dataclass(slots=True)
class OrgPosition:
    """An org's locked accounts as the transaction found them; the plan moves them on."""

    org_id: str
    posted_micros: int
    held_micros: int
    owed_micros: int  # arrears: usage credit did not cover
    billing_state: d.BillingState
    pinned: bool
    last_hash: str
    grants: list[d.Grant] = field(default_factory=list)  # open, loaded when posted > 0
    moved: bool = False  # posted, held or owed changed

    @property
    def available_micros(self) -> int:
        return self.posted_micros - self.held_micros


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation an event may settle: HELD, unexpired, of the org."""

    reservation_id: str
    org_id: str
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Stamp:
    """Who and when, the same for every entry of one transaction."""

    now: datetime
    actor: str
    trace_id: str = ""
    user_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def now_iso(self) -> str:
        return self.now.isoformat()

    @property
    def labels_json(self) -> str:
        return json.dumps(dict(self.labels)) if self.labels else "{}"


@dataclass(slots=True)
class UsagePlan:
    """What one usage transaction writes."""

    # transfer rows in TRANSFER_COLUMNS (their billing state after is the org's at the end)
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    revenue_micros: dict[str, int] = field(default_factory=dict)  # system account -> credit
    burned: dict[str, d.Grant] = field(default_factory=dict)  # grant id -> grant as burned
    # (reservation id, org, captured cost, its arrears, the transfer that carries it)
    captures: list[tuple[str, str, int, int, str]] = field(default_factory=list)
    # (org, previous state, state, cause)
    state_changes: list[tuple[str, d.BillingState, d.BillingState, str]] = field(
        default_factory=list)
    # (org, type, attributes): balances are the org's as the transaction leaves it
    outbox: list[tuple[str, d.OutboxEventType, dict[str, str]]] = field(default_factory=list)
    results: list[list[d.OrgUsageResult]] = field(default_factory=list)
    debited_micros: int = 0
    arrears_micros: int = 0


class LeasePayer(Protocol):
    """The credit leases a usage transaction locked (the ledger's leases module)."""

    def take(self, org_id: str, lease_id: str, cost: int) -> int:
        """Charges `cost` to the org's lease `lease_id`; returns what its hold pays."""
        ...


class NoLeases:
    """No lease pays anything (a transaction whose debits name none)."""

    def take(self, org_id: str, lease_id: str, cost: int) -> int:
        return 0


def plan_usage(positions: Mapping[str, OrgPosition], holds: Mapping[str, Hold],
               batches: Sequence[tuple[str, Sequence[d.OrgUsageDebit]]], stamp: Stamp,
               leases: LeasePayer | None = None) -> UsagePlan:
    """The plan of usage batches (batch id, its org debits) applied in order to `positions`
    (every org of every debit, locked). Raises TallyError if an org's arrears would pass
    int64 (nothing is written then)."""
    plan = UsagePlan()
    free = dict(holds)  # a reservation is captured once, by the first event naming it
    payer = leases or NoLeases()
    for batch_id, debits in batches:
        results = []
        for debit in debits:
            results.append(debit_org_usage(positions[debit.org_id], debit, batch_id, free,
                                           stamp, plan, payer))
        plan.results.append(results)
    touched = sorted({e[4] for e in plan.entries} | {c[1] for c in plan.captures})
    for org in touched:
        follow_the_money(positions[org], plan)
    for org in touched:
        if positions[org].moved:
            plan.outbox.append((org, d.OutboxEventType.BALANCE_CHANGED, {}))
    return plan


def debit_org_usage(position: OrgPosition, debit: d.OrgUsageDebit, batch_id: str,
                    holds: dict[str, Hold], stamp: Stamp, plan: UsagePlan,
                    leases: LeasePayer | None = None) -> d.OrgUsageResult:
    """One org's usage in one batch: its credit lease pays first, then frees the holds its
    events settle, debits what the available credit covers (burning grants in burn order)
    and records the rest as arrears. Usage already happened, so it is never refused. Adds
    its entries and the rest to `plan`."""
    org = debit.org_id
    if debit.lease_id and leases is not None:
        # what the lease's hold pays is no longer held: available = posted - held stays
        # exact when the debit below takes it from posted
        paid = leases.take(org, debit.lease_id, debit.amount_micros)
        if paid:
            position.held_micros -= paid
            position.moved = True
    captured: list[tuple[Hold, d.UsageCapture]] = []
    for capture in debit.captures:
        hold = holds.pop(capture.reservation_id, None)
        if hold is not None and hold.org_id == org:
            position.held_micros -= hold.amount_micros
            position.moved = True
            captured.append((hold, capture))
    available = position.available_micros
    amount = debit.amount_micros
    debited, arrears = d.split_debit(available, amount)
    if arrears and position.owed_micros + arrears > INT64_MAX:
        raise invalid("org_debits", f"the arrears of org {org!r} would pass int64")
    transfer_id = arrears_transfer_id = ""
    sink = d.system_account(d.AccountKind.REVENUE, org) if amount else ""
    if debited:
        _burn(position, debited, plan)
        position.posted_micros -= debited
        transfer_id = d.usage_transfer_id(batch_id, org)
        plan.entries.append(_entry(position, transfer_id, d.credit_account(org), sink, debited, "",
                              stamp))
    if arrears:
        position.owed_micros += arrears
        arrears_transfer_id = d.usage_arrears_transfer_id(batch_id, org)
        plan.entries.append(_entry(position, arrears_transfer_id, d.arrears_account(org), sink,
                              arrears, ARREARS_REASON, stamp))
        plan.outbox.append((org, d.OutboxEventType.ARREARS_RECORDED,
                            {"arrears_micros": str(arrears), "batch_id": batch_id}))
    if amount:
        position.moved = True
        plan.revenue_micros[sink] = plan.revenue_micros.get(sink, 0) + amount
    covered = max(available, 0)
    for hold, capture in captured:
        # the event's part of the arrears, as its receipt splits the org's debit in order
        before = min(covered, capture.cost_before_micros)
        paid = min(covered - before, capture.cost_micros)
        owed = capture.cost_micros - paid
        carried_by = transfer_id if paid or not owed else arrears_transfer_id
        plan.captures.append((hold.reservation_id, org, capture.cost_micros, owed, carried_by))
    plan.debited_micros += debited
    plan.arrears_micros += arrears
    return d.OrgUsageResult(org, transfer_id, arrears_transfer_id, debited, arrears, available,
                            position.available_micros)


def _burn(position: OrgPosition, amount: int, plan: UsagePlan) -> None:
    grants = position.grants
    if len(grants) == 1 and grants[0].remaining_micros >= amount:  # the usual case
        taken = [(grants[0], amount)]
    else:
        taken = d.allocate(grants, amount)
    if sum(t for _, t in taken) != amount:
        # posted credit is always the sum of open grants; anything else is a bug
        raise TallyError(Reason.INTERNAL, f"grants of {position.org_id} do not cover {amount}")
    for grant, take in taken:
        grant.remaining_micros -= take
        plan.burned[grant.grant_id] = grant


def _entry(position: OrgPosition, transfer_id: str, debit: str, credit: str, amount: int,
           reason: str, stamp: Stamp) -> tuple[Any, ...]:
    """A USAGE transfer row chained to the org's head (the hash computed once)."""
    org = position.org_id
    prev = position.last_hash
    entry_hash = d.chain_hash(prev, d.canonical_entry(
        transfer_id, "USAGE", debit, credit, org, amount, stamp.actor, reason, stamp.now_iso,
        trace_id=stamp.trace_id, user_id=stamp.user_id, labels=stamp.labels, grant_id="",
        reservation_id="", reverses_transfer_id="", payment_order_id="",
        org_posted_after=position.posted_micros, org_held_after=position.held_micros,
        org_arrears_after=position.owed_micros))
    position.last_hash = entry_hash
    return (transfer_id, "USAGE", debit, credit, org, amount, stamp.actor, reason,
            stamp.trace_id, stamp.user_id, stamp.labels_json, "", "", "", "", stamp.now,
            prev, entry_hash, position.posted_micros, position.held_micros,
            position.owed_micros, d.HASH_VERSION)


def follow_the_money(position: OrgPosition, plan: UsagePlan) -> None:
    """Moves an unpinned org to the state its balances call for (d.automatic_billing_state)."""
    if position.pinned or not position.moved:
        return
    state, cause = d.automatic_billing_state(position.posted_micros, position.owed_micros)
    if state is position.billing_state:
        return
    previous = position.billing_state
    position.billing_state = state
    plan.state_changes.append((position.org_id, previous, state, cause))
    plan.outbox.append((position.org_id, d.OutboxEventType.BILLING_STATE_CHANGED,
                        {"previous_state": previous.value, "cause": cause}))


def state_change_id() -> str:
    """Request id of an automatic billing-state transition."""
    return f"auto:{uuid.uuid4()}"
