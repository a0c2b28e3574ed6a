"""Group commit of holds: concurrent Reserve calls share one transaction, each decided in
arrival order on the balance the ones before it left, and each answered on its own."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from services.ledger import domain as d
from services.ledger.store import LedgerStore
from tally.kit import metrics
from tally.kit.errors import Reason, TallyError
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient
from tests.ledger.support import fund

CREDIT = 1_000_000
METERING = d.Caller(actor="svc:metering")
TTL = timedelta(seconds=60)


def hold(reservation_id: str, org: str, amount: int) -> d.ReserveCommand:
    return d.ReserveCommand(reservation_id, org, amount, TTL, METERING)


def refusal(outcome: object) -> Reason | None:
    return outcome.reason if isinstance(outcome, TallyError) else None


async def test_holds_of_a_group_are_decided_in_order_and_answered_alone(
    pool: asyncpg.Pool,
) -> None:
    store = LedgerStore(pool)
    await fund(store, "acme", 5 * CREDIT)
    await fund(store, "frozen", CREDIT)
    await store.set_billing_state("freeze", "frozen", d.BillingState.READ_ONLY, "test", METERING)
    earlier = await store.reserve("r0", "acme", CREDIT, TTL, METERING)
    outcomes = await store.reserve_many([
        hold("r1", "acme", 2 * CREDIT),
        hold("r0", "acme", CREDIT),  # a replay of a committed hold
        hold("r2", "acme", 3 * CREDIT),  # more than the 2 left
        hold("r3", "acme", 2 * CREDIT),
        hold("r1", "acme", 2 * CREDIT),  # sent twice at once
        hold("r1", "acme", 7),  # and once for something else
        hold("r4", "nobody", CREDIT),
        hold("r5", "frozen", CREDIT),
        hold("", "acme", 0),
        hold("r2", "acme", 3 * CREDIT),  # its first copy was refused: so is this one
    ])
    r1, r0, r2, r3, r1_again, r1_reused, r4, r5, bad, r2_again = outcomes
    assert r0 == earlier
    assert not isinstance(r1, TallyError) and r1[1] == 2 * CREDIT  # available after it
    assert refusal(r2) is Reason.INSUFFICIENT_CREDITS
    assert isinstance(r2, TallyError) and r2.metadata["available_micros"] == str(2 * CREDIT)
    assert not isinstance(r3, TallyError) and r3[1] == 0
    assert r1_again == r1
    assert refusal(r1_reused) is Reason.IDEMPOTENCY_KEY_REUSED
    assert refusal(r4) is Reason.INVALID_ARGUMENT and "org_id" in str(r4)
    assert refusal(r5) is Reason.ACCOUNT_READ_ONLY
    assert refusal(bad) is Reason.INVALID_ARGUMENT
    assert r2_again == r2
    balance = await store.get_balance("acme")
    assert (balance.held_micros, balance.available_micros) == (5 * CREDIT, 0)
    # a refused hold leaves nothing: its id is free once credit arrives
    await fund(store, "acme", 3 * CREDIT)
    made, available, _ = await store.reserve("r2", "acme", 3 * CREDIT, TTL, METERING)
    assert (made.amount_micros, available) == (3 * CREDIT, 0)
    assert await pool.fetchval("SELECT count(*) FROM ledger.reservations") == 4


async def test_64_callers_sending_each_hold_three_times_never_hold_more_than_the_credit(
    tally: TallyClient,
) -> None:
    """64 callers on one org with credit for 40 holds of 1 credit ask for 100 holds, each
    three times at once: exactly 40 are made, each once, and they shared transactions."""
    await tally.ledger.Transfer(pb.TransferRequest(
        transfer_id="fund", org_id="hot", kind=pb.TRANSFER_KIND_PROMOTIONAL_GRANT,
        amount_micros=40 * CREDIT))
    groups_before = metrics.sample("tally_group_commit_size_count", {"group": "ledger.reserve"})
    holds_before = metrics.sample("tally_group_commit_size_sum", {"group": "ledger.reserve"})
    pending = asyncio.Queue[str]()
    for n in range(100):
        for _ in range(3):
            pending.put_nowait(f"hold-{n}")
    answers: dict[str, set[str]] = {}

    async def caller() -> None:
        while not pending.empty():
            reservation_id = pending.get_nowait()
            try:
                reply = await tally.ledger.Reserve(pb.ReserveRequest(
                    reservation_id=reservation_id, org_id="hot", amount_micros=CREDIT,
                    ttl_seconds=60))
                answer = f"held, {reply.available_micros} left"
            except TallyError as exc:
                assert exc.reason is Reason.INSUFFICIENT_CREDITS
                answer = "refused"
            answers.setdefault(reservation_id, set()).add(answer)

    await asyncio.gather(*(caller() for _ in range(64)))
    held = [r for r, a in answers.items() if any(x.startswith("held") for x in a)]
    assert len(held) == 40
    # a hold and its copies got one answer (a copy arriving after a refusal may be held:
    # a refusal keeps nothing, so the id was asked afresh; never twice held)
    assert all(len({x for x in a if x.startswith("held")}) <= 1 for a in answers.values())
    balance = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id="hot"))).balance
    assert (balance.held_micros, balance.available_micros) == (40 * CREDIT, 0)
    groups = metrics.sample("tally_group_commit_size_count",
                            {"group": "ledger.reserve"}) - groups_before
    holds = metrics.sample("tally_group_commit_size_sum",
                           {"group": "ledger.reserve"}) - holds_before
    assert holds >= 300 and groups < holds  # the calls did share transactions
