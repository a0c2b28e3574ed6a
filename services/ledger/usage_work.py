"""The unit of work of usage debits per org: claims, locks, loads and writes what
`services.ledger.postings` plans. SQL only; the rules are in postings.

One transaction per group of PostUsageBatch calls (tally.kit.group_commit):
1. claim every batch id (a replay waits for the original, then answers its stored results);
2. lock the orgs' credit and arrears accounts in the global account order (opening those of
   new orgs), the reservations the events settle, and the open grants of orgs with credit;
3. plan in Python (postings.plan_usage);
4. write: the entries (COPY), the accounts, the grants, the captured reservations, the
   revenue shards (a relative update, last: they are the highest in the lock order), one
   results row per batch and the outbox rows — then commit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.ledger import domain as d
from services.ledger import leases
from services.ledger import postings as p
from services.ledger.store import LedgerStore, Work, _sort_claims, time_ordered_uuids
from tally.kit import metrics
from tally.kit.errors import TallyError

OrgOutcome = list[d.OrgUsageResult] | TallyError
UsageOutcome = list[d.UsageResult] | list[d.OrgUsageResult] | TallyError


async def post_usage_batches(store: LedgerStore, batches: Sequence[d.UsageBatch]
                             ) -> list[UsageOutcome]:
    """A group of PostUsageBatch calls: those of org debits in one transaction here, those of
    per-event items (the older form) in one of LedgerStore.post_usage_batches."""
    by_org = [i for i, b in enumerate(batches) if b.org_debits]
    if len(by_org) == len(batches):
        return list(await post_org_debits(store, batches))
    outcomes: list[UsageOutcome | None] = [None] * len(batches)
    per_event = [i for i, b in enumerate(batches) if not b.org_debits]
    for i, outcome in zip(per_event, await store.post_usage_batches(
            [batches[i] for i in per_event]), strict=True):
        outcomes[i] = outcome
    if by_org:
        for i, org_outcome in zip(by_org, await post_org_debits(
                store, [batches[i] for i in by_org]), strict=True):
            outcomes[i] = org_outcome
    return [o for o in outcomes if o is not None]


async def post_org_debits(store: LedgerStore, batches: Sequence[d.UsageBatch]
                          ) -> list[OrgOutcome]:
    """Debits batches of org debits in one transaction; one answer per batch (its results,
    or its refusal: bad input, an id used for another request)."""
    started = time.perf_counter()
    outcomes: list[OrgOutcome | None] = [None] * len(batches)
    for i, batch in enumerate(batches):
        try:
            d.validate_org_debits(batch.batch_id, batch.org_debits)
        except TallyError as refused:
            outcomes[i] = refused
    valid = [b for b, o in zip(batches, outcomes, strict=True) if o is None]
    plan = None
    if valid:
        async with store.pool.acquire() as conn, conn.transaction():
            work = Work(conn, store.clock(), valid[0].caller)
            applied, replayed = _sort_claims(await work.claim_many([
                (f"usage-batch:{b.batch_id}", b.fingerprint()) if outcomes[i] is None
                else None for i, b in enumerate(batches)]), outcomes)
            if applied:
                group = [batches[i] for i in applied]
                try:
                    plan = await _apply(work, group)
                finally:
                    await work.settle()
                for i, results in zip(applied, plan.results, strict=True):
                    outcomes[i] = results
            if replayed:
                stored = await _stored_results(work, [batches[i].batch_id for i in replayed])
                for i in replayed:
                    outcomes[i] = stored[batches[i].batch_id]
    for batch in batches:
        metrics.LEDGER_BATCH_ITEMS.observe(len(batch.org_debits))
    metrics.LEDGER_COMMIT_SECONDS.observe(time.perf_counter() - started)
    if plan is not None:
        metrics.CREDITS_DEBITED.inc(plan.debited_micros)
        metrics.ARREARS_RECORDED.inc(plan.arrears_micros)
    return [o for o in outcomes if o is not None]


async def _apply(work: Work, batches: Sequence[d.UsageBatch]) -> p.UsagePlan:
    orgs = sorted({o.org_id for b in batches for o in b.org_debits})
    await work.lock(orgs=orgs, open_missing=True)
    holds = await _capturable_holds(work, batches)
    accounts = work.accounts
    positions: dict[str, p.OrgPosition] = {}
    funded = []
    for org in orgs:
        credit = accounts[d.credit_account(org)]
        positions[org] = p.OrgPosition(
            org, credit.balance, credit.held, -accounts[d.arrears_account(org)].balance,
            credit.billing_state, credit.pinned, credit.last_hash,
            moved=credit.dirty)  # opened now: its state is decided by the rules at once
        if credit.balance > 0:
            funded.append(org)
    await work.preload_grants(funded)
    for org in funded:
        positions[org].grants = work.grants[org]
    caller = work.caller
    stamp = p.Stamp(work.now, caller.actor, caller.trace_id, caller.user_id, caller.labels)
    leased = await leases.UsageLeases.lock_ids(
        work, (o.lease_id for b in batches for o in b.org_debits))
    plan = p.plan_usage(positions, holds, [(b.batch_id, b.org_debits) for b in batches], stamp,
                        leased)
    await _write(work, positions, plan, batches)
    await leased.write()
    return plan


async def _capturable_holds(work: Work, batches: Sequence[d.UsageBatch]) -> dict[str, p.Hold]:
    """HELD, unexpired reservations the events name, locked (others mean a plain debit)."""
    owner = {c.reservation_id: o.org_id for b in batches for o in b.org_debits
             for c in o.captures}
    if not owner:
        return {}
    rows = await work.conn.fetch(
        "SELECT r.reservation_id, r.org_id, r.amount_micros FROM unnest($1::text[]) AS u(id) "
        "JOIN ledger.reservations r ON r.reservation_id = u.id "
        "WHERE r.state = 'HELD' AND r.expires_at > $2 "
        "ORDER BY r.reservation_id FOR UPDATE OF r", sorted(owner), work.now)
    return {r[0]: p.Hold(r[0], r[1], r[2]) for r in rows if owner[r[0]] == r[1]}


async def _write(work: Work, positions: dict[str, p.OrgPosition], plan: p.UsagePlan,
                 batches: Sequence[d.UsageBatch]) -> None:
    """Writes the plan through the unit of work's statements (Work.flush), then the revenue
    shards and the batches' results."""
    conn, accounts, now = work.conn, work.accounts, work.now
    for org, position in positions.items():
        if not position.moved:
            continue
        credit = accounts[d.credit_account(org)]
        credit.balance, credit.held = position.posted_micros, position.held_micros
        credit.last_hash, credit.billing_state = position.last_hash, position.billing_state
        credit.dirty = True
        arrears = accounts[d.arrears_account(org)]
        if arrears.balance != -position.owed_micros:
            arrears.balance, arrears.dirty = -position.owed_micros, True
    work.entries = plan.entries
    work.dirty_grants = plan.burned
    actor = work.caller.actor
    work.state_changes = [(p.state_change_id(), org, previous.value, state.value, cause, actor,
                           now) for org, previous, state, cause in plan.state_changes]
    if len(plan.outbox) > 1:
        work.event_ids.extend(time_ordered_uuids(len(plan.outbox)))
    for org, kind, attributes in plan.outbox:
        work.emit(org, kind, **attributes)
    if plan.captures:
        # the org's balances after the whole group (written to the accounts above)
        await work.mark_captured([(c[0], c[2], c[3], c[4], *work.balance(c[1]))
                                  for c in plan.captures])
        work.settled.extend((c[0], c[1]) for c in plan.captures)
    await work.flush(follow_the_money=False)
    if plan.revenue_micros:
        sinks = sorted(plan.revenue_micros)
        await conn.execute(
            "UPDATE ledger.accounts a SET balance_micros = a.balance_micros + u.credit "
            "FROM unnest($1::text[], $2::bigint[]) AS u(id, credit) WHERE a.account_id = u.id",
            sinks, [plan.revenue_micros[s] for s in sinks])
    await conn.executemany(
        "INSERT INTO ledger.usage_batch_results (batch_id, org_ids, transfer_ids, "
        "arrears_transfer_ids, debited_micros, arrears_micros, available_before_micros, "
        "balance_after_micros, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [(b.batch_id, [r.org_id for r in results], [r.transfer_id for r in results],
          [r.arrears_transfer_id for r in results], [r.debited_micros for r in results],
          [r.arrears_micros for r in results], [r.available_before_micros for r in results],
          [r.balance_after_micros for r in results], now)
         for b, results in zip(batches, plan.results, strict=True)])


async def _stored_results(work: Work, batch_ids: Sequence[str]
                          ) -> dict[str, list[d.OrgUsageResult]]:
    """The results of batches applied earlier, as they were first answered."""
    stored: dict[str, list[d.OrgUsageResult]] = {}
    for r in await work.conn.fetch(
            "SELECT * FROM ledger.usage_batch_results WHERE batch_id = ANY($1::text[])",
            list(set(batch_ids))):
        stored[r["batch_id"]] = [
            d.OrgUsageResult(org, transfer, arrears_transfer, debited, arrears, before, after,
                             is_duplicate=True)
            for org, transfer, arrears_transfer, debited, arrears, before, after in zip(
                r["org_ids"], r["transfer_ids"], r["arrears_transfer_ids"],
                r["debited_micros"], r["arrears_micros"], r["available_before_micros"],
                r["balance_after_micros"], strict=True)]
    return stored
