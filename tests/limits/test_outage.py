"""The Redis limiter when Redis is unreachable: the configured policy answers, says so in the
verdict, and Redis is used again once it is back."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from tally.kit import infra, metrics
from tally.limits import SECOND_US, Limit, OutagePolicy, RedisLimiter


def qps(amount: int, *, hard: bool = True) -> Limit:
    return Limit("{org}:qps" if hard else "{org}:soft", amount, SECOND_US, hard=hard)


async def test_hard_limits_fail_closed_by_default() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{infra.free_port()}/0", probe_interval_s=2.0)
    errors = metrics.sample("tally_limiter_backend_errors_total", {"backend": "redis"})
    degraded = metrics.sample("tally_limiter_degraded_decisions_total",
                              {"backend": "redis", "policy": "deny"})
    try:
        verdict = await limiter.acquire([qps(100), qps(100, hard=False)])
        assert not verdict.allowed and verdict.degraded
        assert metrics.sample("tally_limiter_backend_errors_total",
                              {"backend": "redis"}) == errors + 1
        assert metrics.sample("tally_limiter_degraded_decisions_total",
                              {"backend": "redis", "policy": "deny"}) == degraded + 1
        assert verdict.denied_by == (0,) and verdict.retry_after_us == 2 * SECOND_US
        assert limiter.degraded
    finally:
        await limiter.close()


async def test_soft_limits_fail_open_onto_local_counters() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{infra.free_port()}/0")
    try:
        verdicts = [await limiter.acquire([qps(2, hard=False)]) for _ in range(3)]
        assert all(v.allowed and v.degraded for v in verdicts)
        assert [v.remaining for v in verdicts] == [(1,), (0,), (-1,)]
    finally:
        await limiter.close()


async def test_the_local_policy_enforces_hard_limits_per_replica() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{infra.free_port()}/0",
                           on_outage=OutagePolicy.LOCAL)
    try:
        verdicts = [await limiter.acquire([qps(3)]) for _ in range(5)]
        assert [v.allowed for v in verdicts] == [True, True, True, False, False]
        assert all(v.degraded for v in verdicts)
    finally:
        await limiter.close()


async def test_an_outage_is_logged_once_and_redis_is_used_again_when_back(
        tmp_path: Path) -> None:
    port = infra.free_port()
    server = infra.start_embedded_redis(tmp_path / "first", port=port)
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", probe_interval_s=0.0)
    try:
        shared = await limiter.acquire([qps(5)])
        assert shared.allowed and not shared.degraded and shared.remaining == (4,)
        server.stop()
        with capture_logs() as logs:
            down = [await limiter.acquire([qps(5)]) for _ in range(3)]
        assert all(v.degraded and not v.allowed for v in down)
        assert [e["event"] for e in logs].count("limiter_redis_unavailable") == 1
        server = infra.start_embedded_redis(tmp_path / "second", port=port)
        with capture_logs() as logs:
            back = await limiter.acquire([qps(5)])
        assert back.allowed and not back.degraded
        assert "limiter_redis_recovered" in [e["event"] for e in logs]
        # a restarted Redis lost the script and the counters: both are rebuilt
        assert back.remaining == (4,)
    finally:
        await limiter.close()
        server.stop()
