"""`python -m examples.gateway.load --rps N --seconds S`: what Tally adds to a model call.

Drives chat completions at a fixed rate with the official `openai` client, twice from the same
process: straight at the fake upstream model (without Tally), then through the gateway
(Authorize -> upstream -> usage -> receipt). Prints one JSON object: latency percentiles of
both, and the difference, which is the latency Tally adds per request.

The gateway at --gateway-url (default: the one `tally up --with-gateway` starts) must know
--api-key; without one, the example creates an org and a key in accounts (development mode)
and funds the org with a promotional grant, then waits until the gateway has the key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit.config import load_kit_config
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.sdk.client import TallyClient

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "In one sentence: what does a credit lease hold?"}]


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `samples`, in milliseconds, 3 decimals."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[rank] * 1000, 3)


async def drive(client: openai.AsyncOpenAI, rps: float, seconds: float) -> dict[str, Any]:
    """Opens one request every 1/rps seconds for `seconds`; their latencies."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    phases: dict[str, list[float]] = {}

    async def one() -> None:
        started = time.perf_counter()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4.1-mini", messages=MESSAGES, max_tokens=32)
        except openai.APIStatusError as exc:
            failures[str(exc.status_code)] = failures.get(str(exc.status_code), 0) + 1
            return
        latencies.append(time.perf_counter() - started)
        for part in filter(None, raw.headers.get("server-timing", "").split(",")):
            name, _, duration = part.strip().partition(";dur=")
            phases.setdefault(name, []).append(float(duration) / 1000)

    count = max(1, int(rps * seconds))
    start = time.perf_counter()
    tasks = []
    for i in range(count):
        delay = start + i / rps - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    if not latencies:
        return {"requests": count, "ok": 0, "failures": failures}
    report: dict[str, Any] = {
        "requests": count, "ok": len(latencies), "failures": failures,
        "achieved_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3)}
    if phases:  # the gateway's Server-Timing: Tally's share (authorize, usage) and the model's
        report["phases_p50_ms"] = {name: percentile(spent, 50) for name, spent in phases.items()}
    return report


async def provision(org: str) -> str:
    """A funded org and an API key for it (development mode: trusted calls)."""
    async with TallyClient.from_config(load_kit_config(), actor="user:load") as tally:
        await tally.accounts.CreateOrg(apb.CreateOrgRequest(
            org_id=org, name=org, region="local", seat_limit=3, owner_subject=f"{org}@load"))
        key = await tally.accounts.CreateApiKey(apb.CreateApiKeyRequest(
            request_id=f"{org}-key", org_id=org, role=apb.ROLE_DEVELOPER, name="load"))
        await tally.ledger.Transfer(lpb.TransferRequest(
            transfer_id=f"{org}-grant", org_id=org, kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=10_000 * 1_000_000, reason="load example"))
        return key.secret


async def wait_for_key(client: openai.AsyncOpenAI, timeout_s: float = 10.0) -> None:
    """Until the gateway has learned the key from accounts' credentials feed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES,
                                                 max_tokens=1)
            return
        except openai.AuthenticationError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs and the difference."""
    api_key = args.api_key or await provision(f"org-load-{uuid.uuid4().hex[:8]}")
    through = openai.AsyncOpenAI(base_url=args.gateway_url, api_key=api_key, max_retries=0)
    direct = openai.AsyncOpenAI(base_url=args.upstream_url, api_key="unused", max_retries=0)
    await wait_for_key(through)
    await drive(direct, args.rps, min(args.seconds, 1.0))  # warm both paths up
    await drive(through, args.rps, min(args.seconds, 1.0))
    without = await drive(direct, args.rps, args.seconds)
    with_tally = await drive(through, args.rps, args.seconds)
    report: dict[str, Any] = {"rps": args.rps, "seconds": args.seconds,
                              "without_tally": without, "with_tally": with_tally}
    if "p50_ms" in without and "p50_ms" in with_tally:
        report["added_by_tally_ms"] = {
            "p50": round(with_tally["p50_ms"] - without["p50_ms"], 3),
            "p99": round(with_tally["p99_ms"] - without["p99_ms"], 3)}
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    port = os.environ.get("TALLY_GATEWAY_PORT") or "8090"
    upstream = os.environ.get("TALLY_GATEWAY_UPSTREAM_PORT") or "8091"
    parser = argparse.ArgumentParser(prog="python -m examples.gateway.load",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rps", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True, help="length of each run")
    parser.add_argument("--gateway-url", default=f"http://127.0.0.1:{port}/v1")
    parser.add_argument("--upstream-url", default=f"http://127.0.0.1:{upstream}/v1",
                        help="the model without Tally (the gateway's fake upstream)")
    parser.add_argument("--api-key", default=os.environ.get("TALLY_GATEWAY_API_KEY", ""),
                        help="a Tally API key the gateway knows (default: make one)")
    args = parser.parse_args(argv)
    if args.rps <= 0 or args.seconds <= 0:
        parser.error("--rps and --seconds must be > 0")
    return args


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse())), indent=2))
