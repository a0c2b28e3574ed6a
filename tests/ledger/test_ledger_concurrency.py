"""64 clients hammer one small balance with every request sent three times at once.

Real ledger server, real PostgreSQL. One org starts with 20 credits; 64 asyncio workers run
10,000 mixed operations (plain debits, reserves, captures below and above the hold, releases,
occasional small grants) so the balance keeps crossing zero. Each operation goes out three times
concurrently with the same ids, the way a client retrying on a timeout sends it. A sampler reads
the balance throughout. Afterwards the ledger's own totals are checked against a model built only
from the successful responses.

About 2.5 minutes on 2 cores: every request costs several ms of CPU across grpc.aio, the ledger
and PostgreSQL, and all of them queue on one org's row. (A server in its own process, or fewer
or more channels, measured no faster.)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tally.kit.errors import Reason, TallyError
from tally.kit.server import RunningServer
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient
from tests.ledger.support import differing_fields

CREDIT = 1_000_000
ORG = "acme"
SEED = 20_251_104
WORKERS = 64
OPERATIONS = 10_000
COPIES = 3  # every operation is sent this many times at once, with the same ids
INITIAL_MICROS = 20 * CREDIT
CHANNELS = 4  # each carries WORKERS / CHANNELS workers
RESERVATION_TTL_S = 60
CALL_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 900.0  # the whole load: it stops by itself or fails
SAMPLE_INTERVAL_S = 0.005
MAX_SAMPLES = 100_000

# Refusals the load is built to provoke; any other error fails the test.
EXPECTED_REFUSALS: dict[str, set[Reason]] = {
    "debit": {Reason.INSUFFICIENT_CREDITS},
    # captures beyond their hold leave arrears, and arrears make the org READ_ONLY until a
    # top-up settles them (the automatic billing-state rules)
    "reserve": {Reason.INSUFFICIENT_CREDITS, Reason.ACCOUNT_READ_ONLY},
    "capture": {Reason.RESERVATION_EXPIRED},  # a hold a worker kept past its 60 s ttl
    "release": set(),
    "grant": set(),
}

Outcome = Any  # a response message, or the Reason of a refusal
_NO_CREDIT = {Reason.INSUFFICIENT_CREDITS, Reason.ACCOUNT_READ_ONLY}


@dataclass
class Operation:
    """One logical request and what each of its concurrent copies got back."""

    kind: str
    key: str  # the client-chosen id the copies share
    request: Any
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def successes(self) -> list[Any]:
        return [o for o in self.outcomes if not isinstance(o, Reason)]

    @property
    def result(self) -> Any | None:
        """The applied result, if any copy was applied."""
        found = self.successes
        return found[0] if found else None


@dataclass
class Run:
    operations: list[Operation] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    samples: int = 0
    bad_samples: list[str] = field(default_factory=list)


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def send_copies(run: Run, op: Operation, call: Callable[[Any], Awaitable[Any]]) -> None:
    """Sends op.request COPIES times at once; records each copy's response or refusal."""
    replies = await asyncio.gather(*(call(op.request) for _ in range(COPIES)),
                                   return_exceptions=True)
    for reply in replies:
        if isinstance(reply, TallyError):
            op.outcomes.append(reply.reason)
            if reply.reason not in EXPECTED_REFUSALS[op.kind]:
                run.unexpected.append(f"{op.kind} {op.key}: {reply!r}")
        elif isinstance(reply, BaseException):
            op.outcomes.append(Reason.INTERNAL)
            run.unexpected.append(f"{op.kind} {op.key}: {reply!r}")
        else:
            op.outcomes.append(reply)
    run.operations.append(op)


async def worker(run: Run, tally: TallyClient, index: int, operations: int
                 ) -> list[pb.Reservation]:
    """Runs `operations` random operations; returns the reservations it still holds."""
    rng = random.Random(SEED * 1_000 + index)
    ledger = tally.ledger
    holding: list[pb.Reservation] = []

    def call(method: Any) -> Callable[[Any], Awaitable[Any]]:
        return lambda request: method(request, timeout=CALL_TIMEOUT_S)

    for n in range(operations):
        key = f"w{index}-{n}"
        roll = rng.random()
        if roll < 0.10:
            op = Operation("grant", f"grant-{key}", pb.TransferRequest(
                transfer_id=f"grant-{key}", org_id=ORG,
                kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
                amount_micros=rng.randint(CREDIT // 2, 4 * CREDIT), reason="top-up"))
            await send_copies(run, op, call(ledger.Transfer))
        elif roll < 0.40 or (roll >= 0.88 and not holding):
            op = Operation("debit", f"debit-{key}", pb.TransferRequest(
                transfer_id=f"debit-{key}", org_id=ORG, kind=pb.TRANSFER_KIND_USAGE,
                amount_micros=rng.randint(10_000, CREDIT)))
            await send_copies(run, op, call(ledger.Transfer))
        elif roll < 0.70 or not holding:
            op = Operation("reserve", f"res-{key}", pb.ReserveRequest(
                reservation_id=f"res-{key}", org_id=ORG,
                amount_micros=rng.randint(CREDIT // 10, 2 * CREDIT),
                ttl_seconds=RESERVATION_TTL_S))
            await send_copies(run, op, call(ledger.Reserve))
            if op.result is not None:
                holding.append(op.result.reservation)
        elif roll < 0.88:
            hold = holding.pop(rng.randrange(len(holding)))
            # nothing, below the hold, exactly it, or above it (the excess may become arrears)
            actual = rng.choice([
                0,
                rng.randint(0, hold.amount_micros),
                rng.randint(0, hold.amount_micros),
                hold.amount_micros,
                rng.randint(hold.amount_micros, 3 * hold.amount_micros),
                rng.randint(hold.amount_micros, 3 * hold.amount_micros),
            ])
            op = Operation("capture", hold.reservation_id, pb.CaptureRequest(
                reservation_id=hold.reservation_id, org_id=ORG, actual_micros=actual))
            await send_copies(run, op, call(ledger.Capture))
        else:
            hold = holding.pop(rng.randrange(len(holding)))
            op = Operation("release", hold.reservation_id, pb.ReleaseRequest(
                reservation_id=hold.reservation_id, org_id=ORG, reason="request failed"))
            await send_copies(run, op, call(ledger.Release))
    return holding


async def sampler(run: Run, tally: TallyClient, done: asyncio.Event) -> None:
    """Reads the balance until the workers finish: never below zero, always posted - held."""
    while not done.is_set() and run.samples < MAX_SAMPLES:
        balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id=ORG),
                                                 timeout=CALL_TIMEOUT_S)).balance
        run.samples += 1
        if (balance.available_micros < 0 or balance.held_micros < 0
                or balance.arrears_micros < 0
                or balance.posted_micros - balance.held_micros != balance.available_micros):
            run.bad_samples.append(str(balance))
        await asyncio.sleep(SAMPLE_INTERVAL_S)


async def all_transfers(tally: TallyClient) -> list[pb.Transfer]:
    found: list[pb.Transfer] = []
    token = ""
    while True:
        page = await tally.ledger.ListTransactions(pb.ListTransactionsRequest(
            org_id=ORG, page_size=1000, page_token=token))
        found += page.transfers
        token = page.next_page_token
        if not token:
            return found


def divergence(op: Operation) -> str | None:
    """How the copies of `op` disagreed, if they did.

    Every applied copy must return exactly the same message (a replay returns the original
    result), and the refusals of one operation must agree. A refusal writes nothing, not even
    the idempotency claim (it rolls back with the transaction), so a copy that ran after a
    refusal is a fresh attempt and may be applied if credit arrived meanwhile: that one mix,
    INSUFFICIENT_CREDITS (or ACCOUNT_READ_ONLY, while arrears were owed) then applied, is counted
    and reported, not failed.
    """
    applied = op.successes
    refused = {o for o in op.outcomes if isinstance(o, Reason)}
    for other in applied[1:]:
        if other != applied[0]:
            return f"{op.kind}: {', '.join(differing_fields(applied[0], other))}"
    # Retries of a refusal are fresh attempts: "no credit" and "read-only" may alternate.
    if len(refused) > 1 and not refused <= _NO_CREDIT:
        return f"{op.kind}: refused with {sorted(refused)}"
    if applied and refused and not refused <= _NO_CREDIT:
        return f"{op.kind}: applied and refused with {sorted(refused)}"
    return None


@pytest.mark.slow
async def test_64_clients_10000_mixed_requests_each_sent_three_times_never_overdraw(
    ledger_server: RunningServer,
) -> None:
    address = {"ledger": f"127.0.0.1:{ledger_server.port}"}
    clients = [TallyClient(address, actor=f"user:load-{i}") for i in range(CHANNELS)]
    try:
        tally = clients[0]
        seed_grant = await tally.ledger.Transfer(pb.TransferRequest(
            transfer_id="seed", org_id=ORG, kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=INITIAL_MICROS, reason="starting balance"))
        run = Run()
        done = asyncio.Event()
        started = time.monotonic()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            sampling = asyncio.create_task(sampler(run, tally, done))
            try:
                still_held = await asyncio.gather(*(
                    worker(run, clients[i % CHANNELS], i, count)
                    for i, count in enumerate(split_evenly(OPERATIONS, WORKERS))))
            finally:
                done.set()
                await sampling
        load_seconds = time.monotonic() - started
        assert len(run.operations) == OPERATIONS

        # Free what the workers still hold, so nothing is in flight at the end.
        for hold in (h for held in still_held for h in held):
            op = Operation("release", hold.reservation_id, pb.ReleaseRequest(
                reservation_id=hold.reservation_id, org_id=ORG, reason="end of test"))
            op.outcomes.append(await tally.ledger.Release(op.request))
            run.operations.append(op)

        sent = Counter(op.kind for op in run.operations)
        applied = Counter(op.kind for op in run.operations if op.result is not None)
        refused = Counter(f"{op.kind}:{o}" for op in run.operations for o in op.outcomes
                          if isinstance(o, Reason))
        applied_after_refusal = Counter(
            op.kind for op in run.operations
            if op.result is not None and len(op.successes) < len(op.outcomes))
        print(f"\nload: {load_seconds:.1f}s for {OPERATIONS} operations x {COPIES} copies; "
              f"{run.samples} balance samples\nsent {dict(sent)}\napplied {dict(applied)}\n"
              f"refused copies {dict(refused)}\n"
              f"applied after an earlier copy was refused {dict(applied_after_refusal)}")

        assert not run.unexpected, f"{len(run.unexpected)} unexpected errors: {run.unexpected[:5]}"
        assert run.samples >= 20, "the sampler must have read the balance during the load"
        assert not run.bad_samples, f"a balance broke an invariant: {run.bad_samples[:3]}"
        for kind in ("grant", "debit", "reserve", "capture", "release"):
            assert applied[kind] > 0, f"the load never applied a {kind}"
        assert refused["debit:INSUFFICIENT_CREDITS"] > 0, "the load never ran out of credit"

        # The ledger's own check: hash chains, balance = sum of entries, zero sum overall.
        verified = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest())
        assert verified.ok, verified.detail

        # The model: what the successful responses say was applied, each exactly once.
        grants = debits = captured = capture_arrears = 0
        expected: dict[str, int] = {"seed": seed_grant.transfer.amount_micros}
        grant_ids = {"seed"}
        for op in run.operations:
            result = op.result
            if result is None:
                continue
            if op.kind in ("grant", "debit"):
                assert result.transfer.amount_micros == op.request.amount_micros
                expected[result.transfer.transfer_id] = result.transfer.amount_micros
                if op.kind == "grant":
                    grants += result.transfer.amount_micros
                    grant_ids.add(op.key)
                else:
                    debits += result.transfer.amount_micros
            elif op.kind == "capture":
                reservation = result.reservation
                assert reservation.state == pb.RESERVATION_STATE_CAPTURED
                assert reservation.captured_micros == op.request.actual_micros
                captured += reservation.captured_micros
                capture_arrears += reservation.arrears_micros
                if reservation.captured_micros > reservation.arrears_micros:
                    expected[f"capture:{op.key}"] = (reservation.captured_micros
                                                     - reservation.arrears_micros)
                if reservation.arrears_micros:
                    expected[f"capture:{op.key}:arrears"] = reservation.arrears_micros

        transfers = await all_transfers(tally)
        listed = Counter(t.transfer_id for t in transfers)
        assert [tid for tid, n in listed.items() if n > 1] == [], "a transfer is listed twice"
        # arrears are settled from the next grant by a follow-up entry "<grant id>:settle-arrears"
        settled = {t.transfer_id: t.amount_micros for t in transfers
                   if t.transfer_id.endswith(":settle-arrears")}
        assert {tid.removesuffix(":settle-arrears") for tid in settled} <= grant_ids
        posted = {t.transfer_id: t.amount_micros for t in transfers
                  if t.transfer_id not in settled}
        missing, extra = expected.keys() - posted.keys(), posted.keys() - expected.keys()
        assert not missing, f"applied but not in the ledger: {sorted(missing)[:5]}"
        assert not extra, f"in the ledger but never applied: {sorted(extra)[:5]}"
        assert posted == expected, "a transfer's amount differs from its response"

        balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id=ORG))).balance
        assert balance.held_micros == 0
        assert balance.available_micros == balance.posted_micros >= 0
        # every credit still sits in a grant, was spent, or paid arrears off
        assert (balance.posted_micros - balance.arrears_micros
                == INITIAL_MICROS + grants - debits - captured)
        assert balance.arrears_micros == capture_arrears - sum(settled.values())
        assert sum(g.remaining_micros for g in balance.grants) == balance.posted_micros

        # Last, because it is a broken contract rather than lost or created credit: every copy
        # of an applied operation got the identical answer.
        divergent = Counter(why for op in run.operations if (why := divergence(op)))
        assert not divergent, (
            f"{divergent.total()} operations got different answers to identical copies "
            f"(kind: fields that differ -> count): {dict(divergent)}")
    finally:
        for client in clients:
            await client.close()
