"""The Prometheus series move with what the services do: golden signals per RPC and status,
usage outcomes, Authorize decisions, credits debited, batches, sealed outbox events; and the
endpoint serves them over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import asyncpg
import pytest

from tally.kit import db, metrics, outbox
from tally.kit.errors import TallyError
from tally.metering.v1 import metering_pb2 as mpb
from tests.metering.conftest import Suite
from tests.metering.test_authorize import ask
from tests.metering.test_ingestion import usage

METERING = "tally.metering.v1.MeteringService"


def rpcs(method: str, code: str) -> float:
    return metrics.sample("tally_rpc_requests_total",
                          {"service": METERING, "method": method, "code": code})


async def test_every_rpc_is_counted_by_status_and_timed(suite: Suite) -> None:
    await suite.fund("acme", 100)
    ok, bad = rpcs("Authorize", "OK"), rpcs("Authorize", "INVALID_ARGUMENT")
    timed = metrics.sample("tally_rpc_duration_seconds_count",
                           {"service": METERING, "method": "Authorize"})
    await suite.client.metering.Authorize(ask("m-1"))
    await suite.client.metering.Authorize(ask("m-2"))
    with pytest.raises(TallyError):
        await suite.client.metering.Authorize(ask(""))
    assert rpcs("Authorize", "OK") == ok + 2
    assert rpcs("Authorize", "INVALID_ARGUMENT") == bad + 1
    assert metrics.sample("tally_rpc_duration_seconds_count",
                          {"service": METERING, "method": "Authorize"}) == timed + 3


async def test_authorize_decisions_are_counted_by_result_and_reason(suite: Suite) -> None:
    await suite.fund("acme", 1)
    allowed = metrics.sample("tally_authorize_decisions_total",
                             {"decision": "ALLOW", "reason": ""})
    short = metrics.sample("tally_authorize_decisions_total",
                           {"decision": "DENY", "reason": "INSUFFICIENT_CREDITS"})
    await suite.client.metering.Authorize(ask("small"))
    await suite.client.metering.Authorize(ask("huge", input_tokens=50_000_000))
    assert metrics.sample("tally_authorize_decisions_total",
                          {"decision": "ALLOW", "reason": ""}) == allowed + 1
    assert metrics.sample("tally_authorize_decisions_total",
                          {"decision": "DENY", "reason": "INSUFFICIENT_CREDITS"}) == short + 1


async def test_usage_outcomes_and_the_credits_they_debit_are_counted(suite: Suite) -> None:
    await suite.fund("acme", 100)
    before = {s: metrics.sample("tally_usage_events_total", {"status": s})
              for s in ("ACCEPTED", "DUPLICATE", "REJECTED")}
    debited = metrics.sample("tally_ledger_credits_debited_micros_total")
    batches = metrics.sample("tally_ledger_batch_items_count")
    bad = usage("u-bad")
    del bad.quantities[:]
    reply = await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(
        events=[usage("u-1"), usage("u-2"), bad]))
    await suite.client.metering.RecordUsage(mpb.RecordUsageRequest(events=[usage("u-1")]))
    after = {s: metrics.sample("tally_usage_events_total", {"status": s}) for s in before}
    assert {s: after[s] - before[s] for s in before} == {
        "ACCEPTED": 2, "DUPLICATE": 1, "REJECTED": 1}
    cost = sum(r.receipt.cost_micros for r in reply.results[:2])
    assert metrics.sample("tally_ledger_credits_debited_micros_total") == debited + cost
    assert metrics.sample("tally_ledger_batch_items_count") > batches


async def test_sealing_an_outbox_counts_the_events_and_their_lag(suite: Suite) -> None:
    sealed = metrics.sample("tally_outbox_sealed_events_total", {"table": "ledger.outbox"})
    await suite.fund("acme", 100)  # a balance change: a ledger outbox event
    pool = await asyncpg.create_pool(db.asyncpg_url(suite.db_url), min_size=1, max_size=1)
    try:
        # the ledger's own sealer may hold the sealing lock: seal until nothing is left open
        while await pool.fetchval("SELECT count(*) FROM ledger.outbox WHERE sequence IS NULL"):
            await outbox.seal(pool, "ledger.outbox")
            await asyncio.sleep(0)
    finally:
        await pool.close()
    assert metrics.sample("tally_outbox_sealed_events_total",
                          {"table": "ledger.outbox"}) >= sealed + 1
    assert metrics.sample("tally_outbox_seal_lag_seconds", {"table": "ledger.outbox"}) >= 0


def test_the_endpoint_serves_the_registry_over_http() -> None:
    port = metrics.serve(0, "127.0.0.1")  # bound, then read back: no port race
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read().decode()
    assert "# TYPE tally_rpc_requests_total counter" in body
    assert "tally_authorize_decisions_total" in body
