"""The ledger, step by step through gRPC, never diverges from a plain-Python model of its books.

Hypothesis drives random sequences of grants (promotional and bonus, with or without an expiry
in the far future and a priority), plain debits, reserves, captures below and above the hold,
releases, usage batches (some items capturing a reservation, some event ids repeated from
earlier batches), replays of any earlier request and reuses of an id with another payload.
After every step GetBalance must equal the model: posted, held, available, arrears and every
grant's remaining credit in burn order. Each example uses a fresh org against one database.

State machines are synchronous, so the real server runs in a background thread with its own
event loop and the test talks to it with the synchronous gRPC stub. TALLY_DEEP=1 runs 12,500
steps instead of about 1,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from services.ledger.server import build
from tally.common.v1 import common_pb2
from tally.kit.config import load_kit_config
from tally.kit.errors import Reason, from_rpc_error
from tally.kit.server import start_server
from tally.ledger.v1 import ledger_pb2 as pb
from tally.ledger.v1 import ledger_pb2_grpc
from tests.ledger.support import differing_fields

CREDIT = 1_000_000
DEEP = os.environ.get("TALLY_DEEP") == "1"
MAX_EXAMPLES, STEPS_PER_EXAMPLE = (250, 50) if DEEP else (40, 25)
CALL_TIMEOUT_S = 30.0
HOLD_TTL_S = 3600  # the longest allowed: no hold lapses during a run
# Expiries far enough out that nothing expires, few enough that grants tie on them.
FAR_EXPIRIES = (datetime(2200, 1, 1, tzinfo=UTC), datetime(2300, 1, 1, tzinfo=UTC))
TRANSFER_KIND_OF = {pb.GRANT_KIND_PROMOTIONAL: pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
                    pb.GRANT_KIND_BONUS: pb.TRANSFER_KIND_BONUS}
DEFAULT_PRIORITY = {pb.GRANT_KIND_PROMOTIONAL: 100, pb.GRANT_KIND_BONUS: 200}

amounts = st.integers(1, 40).map(lambda n: n * CREDIT // 4) | st.integers(1, 10 * CREDIT)
costs = st.just(0) | amounts

Outcome = Any  # a response message, or the Reason of a refusal


@contextlib.contextmanager
def ledger_in_thread(db_url: str) -> Iterator[int]:
    """A real ledger server on its own event loop in a background thread; yields its port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ledger-server", daemon=True)
    thread.start()

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    async def start() -> Any:
        config = dataclasses.replace(load_kit_config({}), database_url=db_url,
                                     migrate_on_start=False, db_pool_size=4)
        return await start_server(await build(config), port=0)

    try:
        running = run(start())
        try:
            yield running.port
        finally:
            run(running.stop())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def call(method: Callable[..., Any], request: Message) -> Outcome:
    """The response, or the reason of a Tally refusal (anything else propagates)."""
    try:
        return method(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        error = from_rpc_error(exc)
        if error is None:
            raise
        return error.reason


def describe(outcome: Outcome) -> str:
    return str(outcome) if isinstance(outcome, Reason) else type(outcome).__name__


def expect_refused(outcome: Outcome, reason: Reason, what: str) -> None:
    assert isinstance(outcome, Reason) and outcome is reason, (
        f"{what}: expected {reason}, got {describe(outcome)}: {outcome}")


def expect_applied(outcome: Outcome, what: str) -> Any:
    assert not isinstance(outcome, Reason), f"{what}: expected success, refused with {outcome}"
    return outcome


def expect_same(outcome: Outcome, first: Message, what: str) -> None:
    reply = expect_applied(outcome, what)
    assert reply == first, (
        f"{what}: a replay must return the original result; differs in "
        f"{differing_fields(first, reply)}\n--- original\n{first}--- replay\n{reply}")


# --- the model ------------------------------------------------------------------------------


@dataclass
class Grant:
    grant_id: str
    kind: int
    priority: int
    original_micros: int
    remaining_micros: int
    expires_at: datetime | None
    created: int  # model sequence number: older grants have smaller ones

    def burn_key(self) -> tuple[bool, datetime, int, int]:
        """Soonest expiry first, never-expiring last; then lower priority; then oldest."""
        never = self.expires_at is None
        return (never, self.expires_at or datetime.max.replace(tzinfo=UTC), self.priority,
                self.created)


@dataclass
class Hold:
    reservation_id: str
    amount_micros: int
    state: int = pb.RESERVATION_STATE_HELD
    captured_micros: int = 0
    arrears_micros: int = 0
    settled_by: Message | None = None  # the Capture/Release response that settled it
    # (posted, held, available, arrears) right after the usage batch that captured it
    after_batch: tuple[int, int, int, int] | None = None


@dataclass
class Books:
    """What the org's balance must be, kept in plain integers."""

    is_open: bool = False
    posted_micros: int = 0
    held_micros: int = 0
    arrears_micros: int = 0
    grants: list[Grant] = field(default_factory=list)
    holds: dict[str, Hold] = field(default_factory=dict)
    receipts: dict[str, pb.UsageItemResult] = field(default_factory=dict)  # by event id
    events: list[pb.UsageItem] = field(default_factory=list)  # every item ever accepted
    # idempotency key -> (the request that claimed it, its response)
    committed: dict[str, tuple[Message, Message]] = field(default_factory=dict)

    @property
    def available_micros(self) -> int:
        return self.posted_micros - self.held_micros

    def live_grants(self) -> list[Grant]:
        return sorted((g for g in self.grants if g.remaining_micros > 0), key=Grant.burn_key)

    def burn(self, amount_micros: int) -> None:
        left = amount_micros
        for grant in self.live_grants():
            take = min(grant.remaining_micros, left)
            grant.remaining_micros -= take
            left -= take
        assert left == 0, "model bug: grants do not cover posted credit"
        self.posted_micros -= amount_micros

    def credit(self, grant: Grant) -> None:
        """A new grant, then arrears are paid from available credit first."""
        self.is_open = True
        self.grants.append(grant)
        self.posted_micros += grant.original_micros
        settled = min(self.arrears_micros, self.available_micros)
        if settled > 0:
            self.burn(settled)
            self.arrears_micros -= settled


# --- the machine ----------------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """One org's life: every response and every balance must match the Books."""

    ledger: ClassVar[ledger_pb2_grpc.LedgerServiceStub]

    def __init__(self) -> None:
        super().__init__()
        self.org = uuid.uuid4().hex[:12]
        self.books = Books()
        self.sent: list[Message] = []  # every request a rule made, for replays
        self.counter = 0

    def new_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{self.org}-{prefix}{self.counter}"

    def expect_balance(self, balance: pb.Balance, what: str) -> None:
        b = self.books
        assert (balance.posted_micros, balance.held_micros, balance.available_micros,
                balance.arrears_micros) == (b.posted_micros, b.held_micros,
                                            b.available_micros, b.arrears_micros), (
            f"{what}: (posted, held, available, arrears) should be "
            f"{(b.posted_micros, b.held_micros, b.available_micros, b.arrears_micros)}:\n"
            f"{balance}")
        if b.is_open:  # the automatic billing-state rules follow every balance change
            state = (common_pb2.BILLING_STATE_READ_ONLY if b.arrears_micros > 0
                     else common_pb2.BILLING_STATE_THROTTLED if b.posted_micros <= 0
                     else common_pb2.BILLING_STATE_ACTIVE)
            assert balance.billing_state == state, f"{what}: billing state\n{balance}"

    def already_committed(self, key: str, request: Message, outcome: Outcome) -> bool:
        """Checks a request whose id was used before: same payload replays, other is refused."""
        if key not in self.books.committed:
            return False
        first_request, first_reply = self.books.committed[key]
        if request == first_request:
            expect_same(outcome, first_reply, f"replay of {key}")
        else:
            expect_refused(outcome, Reason.IDEMPOTENCY_KEY_REUSED, f"{key} with another payload")
        return True

    def unopened(self, outcome: Outcome, what: str) -> bool:
        """Before its first credit or usage the org has no accounts to debit or hold."""
        if self.books.is_open:
            return False
        expect_refused(outcome, Reason.INVALID_ARGUMENT, f"{what} on an org with no account")
        return True

    # -- one function per RPC, shared by the rules and by replay ---------------------------

    def send(self, request: Message) -> None:
        handlers = {pb.TransferRequest: self.transfer, pb.ReserveRequest: self.reserve,
                    pb.CaptureRequest: self.capture, pb.ReleaseRequest: self.release,
                    pb.PostUsageBatchRequest: self.post_usage}
        handlers[type(request)](request)

    def transfer(self, request: pb.TransferRequest) -> None:
        key = f"transfer:{request.transfer_id}"
        outcome = call(self.ledger.Transfer, request)
        if self.already_committed(key, request, outcome):
            return
        b = self.books
        if request.kind == pb.TRANSFER_KIND_USAGE:
            if self.unopened(outcome, key):
                return
            if request.amount_micros > b.available_micros:
                expect_refused(outcome, Reason.INSUFFICIENT_CREDITS, key)
                return
            reply = expect_applied(outcome, key)
            b.burn(request.amount_micros)
        else:
            reply = expect_applied(outcome, key)
            spec = request.grant if request.HasField("grant") else None
            grant_kind = (pb.GRANT_KIND_PROMOTIONAL
                          if request.kind == pb.TRANSFER_KIND_PROMOTIONAL_GRANT
                          else pb.GRANT_KIND_BONUS)
            b.credit(Grant(
                f"grant:{request.transfer_id}", grant_kind,
                spec.priority if spec and spec.priority else DEFAULT_PRIORITY[grant_kind],
                request.amount_micros, request.amount_micros,
                spec.expires_at.ToDatetime(UTC) if spec and spec.HasField("expires_at")
                else None,
                self.counter))
            assert reply.transfer.grant_id == f"grant:{request.transfer_id}"
        assert (reply.transfer.transfer_id, reply.transfer.amount_micros) == (
            request.transfer_id, request.amount_micros)
        self.expect_balance(reply.balance_after, f"{key} balance_after")
        b.committed[key] = (request, reply)

    def reserve(self, request: pb.ReserveRequest) -> None:
        key = f"reserve:{request.reservation_id}"
        outcome = call(self.ledger.Reserve, request)
        if self.already_committed(key, request, outcome) or self.unopened(outcome, key):
            return
        b = self.books
        if b.arrears_micros > 0:  # owing usage makes the org READ_ONLY: no new holds
            expect_refused(outcome, Reason.ACCOUNT_READ_ONLY, key)
            return
        if request.amount_micros > b.available_micros:
            expect_refused(outcome, Reason.INSUFFICIENT_CREDITS, key)
            return
        reply = expect_applied(outcome, key)
        b.held_micros += request.amount_micros
        b.holds[request.reservation_id] = Hold(request.reservation_id, request.amount_micros)
        assert (reply.reservation.state, reply.reservation.amount_micros) == (
            pb.RESERVATION_STATE_HELD, request.amount_micros)
        assert reply.available_micros == b.available_micros, key
        b.committed[key] = (request, reply)

    def capture(self, request: pb.CaptureRequest) -> None:
        what = f"capture {request.reservation_id} for {request.actual_micros}"
        outcome = call(self.ledger.Capture, request)
        if self.unopened(outcome, what):
            return
        b = self.books
        hold = b.holds.get(request.reservation_id)
        if hold is None:
            expect_refused(outcome, Reason.RESERVATION_NOT_FOUND, what)
        elif hold.state == pb.RESERVATION_STATE_RELEASED:
            expect_refused(outcome, Reason.RESERVATION_ALREADY_RELEASED, what)
        elif hold.state == pb.RESERVATION_STATE_CAPTURED:
            if request.actual_micros != hold.captured_micros:
                expect_refused(outcome, Reason.RESERVATION_ALREADY_CAPTURED, what)
            elif hold.settled_by is not None:
                expect_same(outcome, hold.settled_by, f"repeated {what}")
            else:  # captured by a usage item: the same actual is a replay of that capture,
                # answered with the balance right after that batch
                reply = expect_applied(outcome, f"repeated {what} (captured by usage)")
                self.expect_reservation(reply.reservation, hold, what)
                after = reply.balance_after
                assert (after.posted_micros, after.held_micros, after.available_micros,
                        after.arrears_micros) == hold.after_batch, f"{what}: {after}"
                hold.settled_by = reply
        else:
            b.held_micros -= hold.amount_micros
            debited = min(max(b.available_micros, 0), request.actual_micros)
            arrears = request.actual_micros - debited
            b.burn(debited)
            b.arrears_micros += arrears
            hold.state = pb.RESERVATION_STATE_CAPTURED
            hold.captured_micros, hold.arrears_micros = request.actual_micros, arrears
            reply = expect_applied(outcome, what)
            hold.settled_by = reply
            self.expect_reservation(reply.reservation, hold, what)
            if debited:
                transfer = (f"capture:{request.reservation_id}", debited)
            elif arrears:
                transfer = (f"capture:{request.reservation_id}:arrears", arrears)
            else:
                transfer = ("", 0)
            assert (reply.transfer.transfer_id, reply.transfer.amount_micros) == transfer, what
            self.expect_balance(reply.balance_after, what)

    def release(self, request: pb.ReleaseRequest) -> None:
        what = f"release {request.reservation_id}"
        outcome = call(self.ledger.Release, request)
        if self.unopened(outcome, what):
            return
        b = self.books
        hold = b.holds.get(request.reservation_id)
        if hold is None:
            expect_refused(outcome, Reason.RESERVATION_NOT_FOUND, what)
        elif hold.state == pb.RESERVATION_STATE_CAPTURED:
            expect_refused(outcome, Reason.RESERVATION_ALREADY_CAPTURED, what)
        elif hold.state == pb.RESERVATION_STATE_RELEASED:
            assert hold.settled_by is not None
            expect_same(outcome, hold.settled_by, f"repeated {what}")
        else:
            b.held_micros -= hold.amount_micros
            hold.state = pb.RESERVATION_STATE_RELEASED
            reply = expect_applied(outcome, what)
            hold.settled_by = reply
            self.expect_reservation(reply.reservation, hold, what)
            assert reply.available_micros == b.available_micros, what

    def post_usage(self, request: pb.PostUsageBatchRequest) -> None:
        key = f"usage-batch:{request.batch_id}"
        outcome = call(self.ledger.PostUsageBatch, request)
        if self.already_committed(key, request, outcome):
            return
        reply = expect_applied(outcome, key)
        b = self.books
        b.is_open = True
        expected: list[pb.UsageItemResult] = []
        captured_here: list[Hold] = []
        debited_total = arrears_total = 0
        for item in request.items:
            if item.event_id in b.receipts:  # charged once, forever: the original receipt
                duplicate = pb.UsageItemResult()
                duplicate.CopyFrom(b.receipts[item.event_id])
                duplicate.is_duplicate = True
                expected.append(duplicate)
                continue
            hold = b.holds.get(item.reservation_id)
            if hold is not None and hold.state == pb.RESERVATION_STATE_HELD:
                b.held_micros -= hold.amount_micros
            else:
                hold = None  # unknown, released or captured: a plain debit
            available = b.available_micros - debited_total
            debited = min(max(available, 0), item.cost_micros)
            arrears = item.cost_micros - debited
            debited_total += debited
            arrears_total += arrears
            usage_transfer = f"usage:{request.batch_id}:{self.org}"
            result = pb.UsageItemResult(
                event_id=item.event_id,
                transfer_id=(usage_transfer if debited
                             else f"{usage_transfer}:arrears" if arrears else ""),
                debited_micros=debited, arrears_micros=arrears,
                balance_after_micros=available - debited)
            expected.append(result)
            b.receipts[item.event_id] = result
            b.events.append(item)
            if hold is not None:
                hold.state = pb.RESERVATION_STATE_CAPTURED
                hold.captured_micros, hold.arrears_micros = item.cost_micros, arrears
                captured_here.append(hold)
        b.burn(debited_total)
        b.arrears_micros += arrears_total
        for hold in captured_here:
            hold.after_batch = (b.posted_micros, b.held_micros, b.available_micros,
                                b.arrears_micros)
        got = list(reply.results)
        assert got == expected, (
            f"{key}: results differ\n--- expected\n{expected}\n--- got\n{got}")
        b.committed[key] = (request, reply)

    def expect_reservation(self, reservation: pb.Reservation, hold: Hold, what: str) -> None:
        assert (reservation.reservation_id, reservation.amount_micros, reservation.state,
                reservation.captured_micros, reservation.arrears_micros) == (
            hold.reservation_id, hold.amount_micros, hold.state, hold.captured_micros,
            hold.arrears_micros), f"{what}: reservation is\n{reservation}"

    # -- rules -----------------------------------------------------------------------------

    def run(self, request: Message) -> None:
        self.sent.append(request)
        self.send(request)

    @initialize()
    def start_with_no_account(self) -> None:
        """The org does not exist until something credits or charges it."""
        expect_refused(call(self.ledger.GetBalance, pb.GetBalanceRequest(org_id=self.org)),
                       Reason.NOT_FOUND, "balance of a new org")

    @rule(kind=st.sampled_from(["PROMOTIONAL", "BONUS"]), amount=amounts,
          spec=st.none() | st.tuples(st.sampled_from([0, 50, 150, 250]),
                                     st.sampled_from([None, *FAR_EXPIRIES])))
    def grant(self, kind: str, amount: int, spec: tuple[int, datetime | None] | None) -> None:
        """spec = (priority, expires_at) of the grant; None sends no GrantSpec (defaults)."""
        grant_kind = pb.GrantKind.Value(f"GRANT_KIND_{kind}")
        request = pb.TransferRequest(
            transfer_id=self.new_id("g"), org_id=self.org, kind=TRANSFER_KIND_OF[grant_kind],
            amount_micros=amount, reason="grant")
        if spec is not None:
            priority, expires_at = spec
            request.grant.grant_kind = grant_kind
            request.grant.priority = priority
            if expires_at is not None:
                request.grant.expires_at.FromDatetime(expires_at)
        self.run(request)

    @rule(amount=amounts)
    def debit(self, amount: int) -> None:
        self.run(pb.TransferRequest(transfer_id=self.new_id("d"), org_id=self.org,
                                    kind=pb.TRANSFER_KIND_USAGE, amount_micros=amount))

    @rule(amount=amounts)
    def reserve_credit(self, amount: int) -> None:
        self.run(pb.ReserveRequest(reservation_id=self.new_id("r"), org_id=self.org,
                                   amount_micros=amount, ttl_seconds=HOLD_TTL_S))

    def any_reservation(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from([*self.books.holds, f"{self.org}-unknown"]),
                         label="reservation_id")

    @rule(data=st.data())
    def capture_credit(self, data: st.DataObject) -> None:
        reservation_id = self.any_reservation(data)
        hold = self.books.holds.get(reservation_id)
        if hold is None:
            actual = data.draw(costs, label="actual_micros")
        else:
            base = hold.amount_micros
            # nothing, below, exactly, above the hold, or what it was captured for already
            actual = data.draw(st.sampled_from(sorted({
                0, base // 2, base, base + base // 2, 3 * base, hold.captured_micros,
            })) | st.integers(0, 3 * base), label="actual_micros")
        self.run(pb.CaptureRequest(reservation_id=reservation_id, org_id=self.org,
                                   actual_micros=actual))

    @rule(data=st.data())
    def release_credit(self, data: st.DataObject) -> None:
        self.run(pb.ReleaseRequest(reservation_id=self.any_reservation(data), org_id=self.org))

    @rule(data=st.data())
    def post_usage_batch(self, data: st.DataObject) -> None:
        items: list[pb.UsageItem] = []
        for _ in range(data.draw(st.integers(1, 4), label="items")):
            taken = {i.event_id for i in items}
            earlier = [e for e in self.books.events if e.event_id not in taken]
            if earlier and data.draw(st.booleans(), label="repeat an earlier event"):
                items.append(data.draw(st.sampled_from(earlier), label="earlier event"))
                continue
            reservation_id = data.draw(st.sampled_from(
                ["", *self.books.holds, f"{self.org}-unknown"]), label="reservation_id")
            items.append(pb.UsageItem(
                event_id=self.new_id("e"), org_id=self.org, reservation_id=reservation_id,
                cost_micros=data.draw(costs, label="cost_micros")))
        self.run(pb.PostUsageBatchRequest(batch_id=self.new_id("b"), items=items))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def replay_an_earlier_request(self, data: st.DataObject) -> None:
        self.send(data.draw(st.sampled_from(self.sent), label="replayed"))

    @precondition(lambda self: self.books.committed)
    @rule(data=st.data())
    def reuse_an_id_with_another_payload(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.books.committed)), label="id")
        original, _ = self.books.committed[key]
        changed = type(original)()
        changed.CopyFrom(original)
        if isinstance(changed, pb.PostUsageBatchRequest):
            changed.items[0].cost_micros += 1
        else:
            assert isinstance(changed, pb.TransferRequest | pb.ReserveRequest)
            changed.amount_micros += 1
        self.run(changed)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def balance_matches_the_books(self) -> None:
        if not self.books.is_open:
            return
        reply = expect_applied(
            call(self.ledger.GetBalance, pb.GetBalanceRequest(org_id=self.org)), "GetBalance")
        self.expect_balance(reply.balance, "GetBalance")
        expected = [(g.grant_id, pb.GrantKind.Name(g.kind), g.priority, g.original_micros,
                     g.remaining_micros, g.expires_at) for g in self.books.live_grants()]
        listed = [(g.grant_id, pb.GrantKind.Name(g.grant_kind), g.priority, g.original_micros,
                   g.remaining_micros,
                   g.expires_at.ToDatetime(UTC) if g.HasField("expires_at") else None)
                  for g in reply.balance.grants]
        assert listed == expected, (
            "grants (id, kind, priority, original, remaining, expires_at) in burn order:\n"
            f"expected {expected}\ngot      {listed}")

    def teardown(self) -> None:
        if self.books.is_open:
            report = self.ledger.VerifyLedger(pb.VerifyLedgerRequest(org_id=self.org),
                                              timeout=CALL_TIMEOUT_S)
            assert report.ok, report.detail


@pytest.fixture
def ledger_stub(db_url: str) -> Iterator[ledger_pb2_grpc.LedgerServiceStub]:
    with ledger_in_thread(db_url) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def test_any_sequence_of_ledger_requests_keeps_the_balance_equal_to_a_reference_model(
    ledger_stub: ledger_pb2_grpc.LedgerServiceStub,
) -> None:
    class Machine(LedgerMachine):
        ledger = ledger_stub

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=MAX_EXAMPLES, stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
