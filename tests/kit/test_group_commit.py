"""GroupCommit: what queues while a group runs goes together next, each request answered on
its own, and a failing group never fails a request that would have succeeded alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tally.kit.group_commit import GroupCommit


class Recorder:
    """An `apply` that holds each group until released, and records the groups."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.gate = asyncio.Event()
        self.applying = asyncio.Event()

    async def __call__(self, requests: Sequence[str]) -> list[str | Exception]:
        self.groups.append(list(requests))
        self.applying.set()
        await self.gate.wait()
        if "boom" in requests and len(requests) > 1:
            raise RuntimeError("the whole group failed")
        return [ValueError(r) if r.startswith("refuse") else r.upper() for r in requests]


async def queue_behind(apply: Recorder, commit: GroupCommit[str, str], first: str,
                       *queued: str) -> tuple[asyncio.Task[str], list[asyncio.Task[str]]]:
    """Submits `first`, waits until its group is being applied, then queues `queued`."""
    running = asyncio.create_task(commit.submit(first))
    await apply.applying.wait()
    waiting = [asyncio.create_task(commit.submit(r)) for r in queued]
    await asyncio.sleep(0)  # they reach the queue
    return running, waiting


async def test_requests_queued_meanwhile_go_together_in_arrival_order() -> None:
    apply = Recorder()
    commit = GroupCommit("test", apply, max_size=100)
    first, rest = await queue_behind(apply, commit, "a", "b", "c", "d")
    apply.gate.set()
    assert await asyncio.gather(first, *rest) == ["A", "B", "C", "D"]
    assert apply.groups == [["a"], ["b", "c", "d"]]


async def test_a_refusal_is_its_request_answer_only() -> None:
    apply = Recorder()
    apply.gate.set()
    commit = GroupCommit("test", apply, max_size=100)
    results = await asyncio.gather(*(commit.submit(r) for r in ("a", "refuse-b", "c")),
                                   return_exceptions=True)
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], ValueError)


async def test_a_failing_group_is_retried_request_by_request() -> None:
    apply = Recorder()
    commit = GroupCommit("test", apply, max_size=100)
    first, queued = await queue_behind(apply, commit, "a", "b", "boom", "c")
    apply.gate.set()
    assert await first == "A"
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert results == ["B", "BOOM", "C"]  # alone, "boom" applies fine too
    assert apply.groups == [["a"], ["b", "boom", "c"], ["b"], ["boom"], ["c"]]


async def test_groups_keep_to_their_size() -> None:
    apply = Recorder()
    commit = GroupCommit("test", apply, max_size=5, size=len)
    first, queued = await queue_behind(apply, commit, "x", "aa", "ab", "ac", "aaaaaaa")
    apply.gate.set()
    await asyncio.gather(first, *queued)
    # "ac" would pass 5; a request bigger than a group goes alone
    assert apply.groups == [["x"], ["aa", "ab"], ["ac"], ["aaaaaaa"]]


async def test_lanes_share_groups_within_and_never_wait_for_each_other() -> None:
    apply = Recorder()
    commit = GroupCommit("test", apply, max_size=100, key=lambda r: r[0])
    first, queued = await queue_behind(apply, commit, "a1", "a2", "a3")
    # lane "a" is inside its first transaction (held at the gate); lane "b" starts its own
    apply.applying.clear()
    other = asyncio.gather(commit.submit("b1"), commit.submit("b2"))
    await apply.applying.wait()
    assert apply.groups[-1] == ["b1", "b2"] and not first.done()
    apply.gate.set()
    assert await other == ["B1", "B2"]
    assert await asyncio.gather(first, *queued) == ["A1", "A2", "A3"]
    assert apply.groups[0] == ["a1"] and ["a2", "a3"] in apply.groups


async def test_a_caller_that_gave_up_is_left_out() -> None:
    apply = Recorder()
    commit = GroupCommit("test", apply, max_size=100)
    first, (gone, kept) = await queue_behind(apply, commit, "a", "gone", "kept")
    gone.cancel()
    apply.gate.set()
    assert await asyncio.gather(first, kept) == ["A", "KEPT"]
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert apply.groups == [["a"], ["kept"]]


async def test_a_cancelled_drain_cancels_whoever_waits_on_it() -> None:
    apply = Recorder()
    commit = GroupCommit("test", apply, max_size=1)
    first, (queued,) = await queue_behind(apply, commit, "a", "b")
    (drain,) = commit._drains
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await queued
