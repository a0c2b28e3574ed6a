"""What verifying callers and auditing them adds to Authorize.

``python -m bench.auth [--quick]`` prints one JSON object:

- ``authorize_off``: Authorize against a metering server in development mode (no
  credentials verified, nothing audited), at 1 and 64 callers (``calls``, ``qps``,
  ``p50_ms``, ``p99_ms``).
- ``authorize_on``: the same against a metering server that verifies an API key on every
  call from its local credentials cache (following accounts' WatchCredentials) and audits
  every call (Authorize is a mutation) to accounts in batches.
- ``added``: on minus off, p50 and p99 at 1 caller, the QPS share kept at 64 callers, and
  the CPU ms per decision added (all processes) at 1 and 64 callers. Each figure set carries
  ``cpu_ms_per_decision`` per process (client, each server, PostgreSQL backends, total).
- ``guard_cpu_us_per_call``: CPU time of the guard's own work per call (verify the key,
  check the policy, queue the audit record), measured in this process over many calls with
  ``time.process_time`` — what the server spends, without the network's noise.
- ``audited_records``: audit records of the bench org accounts holds after the run.
- ``baseline``: the raw gRPC figures of the same run; ``targets``: added p50 <= 0.1 ms.

Pricing, ledger, accounts and metering each run in a ``spawn``ed child (uvloop) on a fresh
``tally_bench_auth_<pid>`` database. Off and on run one after the other against the same
pricing and ledger, so their difference is the guard's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.authorize import ORG, _measured, _port, prepare, serving
from bench.baseline import _machine, measure_unary, run_baseline, run_in_loop
from bench.harness import bench_database, database_label, database_server_url
from tally.accounts.v1 import accounts_pb2
from tally.common.v1 import common_pb2
from tally.kit.audit import Auditor
from tally.kit.auth import CredentialCache, Guard
from tally.kit.config import load_kit_config
from tally.kit.log import configure_logging
from tally.metering.v1 import metering_pb2
from tally.sdk.client import TallyClient

BENCH_DATA_DIR: Final = Path(".tally") / "bench-auth"
TARGET_ADDED_P50_MS: Final = 0.1
_START_TIMEOUT_S: Final = 60.0
AUTHORIZE: Final = "/tally.metering.v1.MeteringService/Authorize"


async def make_key(accounts: str) -> str:
    """The bench org in accounts, and a developer key of it (its secret)."""
    async with TallyClient({"accounts": accounts}, actor="service:bench") as client:
        await client.accounts.CreateOrg(accounts_pb2.CreateOrgRequest(
            org_id=ORG, name="Bench", region="local", seat_limit=10,
            owner_subject="owner@bench.test"))
        created = await client.accounts.CreateApiKey(accounts_pb2.CreateApiKeyRequest(
            request_id="bench-key", org_id=ORG, role=accounts_pb2.ROLE_DEVELOPER,
            name="bench"))
    secret: str = created.secret
    return secret


async def measure(target: str, run: str, quick: bool, credential: str | None,
                  database_url: str) -> dict[str, Any]:
    """Authorize at 1 and 64 callers, every call a fresh request, with CPU ms per decision
    of each process (client, servers, PostgreSQL backends)."""
    calls_1, calls_64 = (300, 1_000) if quick else (3_000, 10_000)
    ids = itertools.count()
    async with TallyClient({"metering": target}, actor="service:bench",
                           credential=credential) as client:

        async def one() -> None:
            reply = await client.metering.Authorize(metering_pb2.AuthorizeRequest(
                request_id=f"bench-{run}-{next(ids)}",
                context=common_pb2.RequestContext(org_id=ORG, project_id="p1"),
                model="gpt-4.1-mini", estimated_input_tokens=1_000, max_output_tokens=200),
                timeout=30)
            assert reply.decision == metering_pb2.DECISION_ALLOW, reply

        # the guard's cache may still be loading right after start-up
        for _ in range(200):
            try:
                await one()
                break
            except Exception:  # retried until the cache has the key
                await asyncio.sleep(0.05)
        await measure_unary(one, calls_1 // 10, 1, warmup=0)
        single = await _measured(database_url, calls_1,
                                 lambda: measure_unary(one, calls_1, 1, warmup=0))
        await measure_unary(one, calls_64 // 10, 64, warmup=0)
        many = await _measured(database_url, calls_64,
                               lambda: measure_unary(one, calls_64, 64, warmup=0))
    return {"1_caller": single, "64_callers": many}


async def count_audited(database_url: str) -> int:
    """Audit records of the bench org that reached accounts (proof the audit was on)."""
    import asyncpg

    from tally.kit import db

    conn = await asyncpg.connect(db.asyncpg_url(database_url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM accounts.audit_log WHERE org_id = $1", ORG)
    finally:
        await conn.close()
    return count


class _Peer:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


async def guard_cpu(secret: str, calls: int) -> float:
    """CPU microseconds per call of the guard's own work, with a key in its cache."""
    from hashlib import sha256

    cache = CredentialCache()
    update = accounts_pb2.WatchCredentialsResponse(revision=1, is_snapshot=True, keys=[
        accounts_pb2.KeyCredential(
            key=accounts_pb2.ApiKey(key_id="k", org_id=ORG, role=accounts_pb2.ROLE_DEVELOPER),
            secret_sha256=sha256(secret.encode()).hexdigest())])
    cache.apply(update)

    async def discard(batch: Sequence[Any], uses: Any) -> None:
        return None

    guard = Guard(cache, auditor=Auditor("metering", discard, max_queue=calls + 1,
                                         batch_size=calls + 1))
    metadata = {"authorization": f"Bearer {secret}", "user-agent": "bench"}
    request = metering_pb2.AuthorizeRequest(
        request_id="bench-cpu", context=common_pb2.RequestContext(org_id=ORG, project_id="p1"),
        model="gpt-4.1-mini", estimated_input_tokens=1_000, max_output_tokens=200)
    peer = _Peer()
    import grpc

    started = time.process_time()
    for _ in range(calls):
        principal = await guard.verify(metadata, None)
        guard.check(principal, AUTHORIZE, request)
        guard.record(AUTHORIZE, principal, peer, request, grpc.StatusCode.OK)
    return round((time.process_time() - started) / calls * 1e6, 2)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="counts / 10, for CI smoke")
    args = parser.parse_args(argv)
    configure_logging("bench", "warning")
    baseline = run_baseline(quick=args.quick)
    server_url = database_server_url(BENCH_DATA_DIR)
    trust = {"TALLY_AUTH_MODE": "trust"}
    with bench_database(server_url, "tally_bench_auth",
                        ["pricing", "ledger", "metering", "accounts"]) as database_url:
        base = dataclasses.replace(load_kit_config({}), database_url=database_url,
                                   migrate_on_start=False)
        with (serving("pricing", base, trust) as pricing, serving("ledger", base, trust) as ledger,
              serving("accounts", base, trust) as accounts):
            config = dataclasses.replace(base, pricing_port=_port(pricing),
                                         ledger_port=_port(ledger),
                                         accounts_port=_port(accounts))
            run_in_loop(prepare(database_url, ledger))
            secret = run_in_loop(make_key(accounts))
            with serving("metering", config, trust) as metering:
                off = run_in_loop(measure(metering, "off", args.quick, None, database_url))
            with serving("metering", config, {"TALLY_AUTH_MODE": "enforce", "TALLY_AUDIT": "true",
                                              "TALLY_ACCOUNTS_ADDRESS": accounts}) as metering:
                on = run_in_loop(measure(metering, "on", args.quick, secret, database_url))
            audited = run_in_loop(count_audited(database_url))
    cpu = run_in_loop(guard_cpu(secret, 2_000 if args.quick else 20_000))
    added_p50 = round(on["1_caller"]["p50_ms"] - off["1_caller"]["p50_ms"], 3)
    added_p99 = round(on["1_caller"]["p99_ms"] - off["1_caller"]["p99_ms"], 3)
    print(json.dumps({
        "authorize_off": off,
        "authorize_on": on,
        "added": {"p50_ms_1_caller": added_p50, "p99_ms_1_caller": added_p99,
                  "qps_64_share_kept": round(on["64_callers"]["qps"]
                                             / off["64_callers"]["qps"], 3),
                  "cpu_ms_per_decision_1_caller": round(
                      on["1_caller"]["cpu_ms_per_decision"]["total"]
                      - off["1_caller"]["cpu_ms_per_decision"]["total"], 3),
                  "cpu_ms_per_decision_64_callers": round(
                      on["64_callers"]["cpu_ms_per_decision"]["total"]
                      - off["64_callers"]["cpu_ms_per_decision"]["total"], 3)},
        "guard_cpu_us_per_call": cpu,
        "audited_records": audited,
        "baseline": baseline,
        "targets": {"added_p50_ms": {"target": TARGET_ADDED_P50_MS, "measured": added_p50,
                                     "pass": added_p50 <= TARGET_ADDED_P50_MS}},
        "database": database_label(BENCH_DATA_DIR),
        "machine": _machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
