"""The in-process limiter: exact for one replica, the default when there is no Redis.

Decisions run without an await between reading and writing the counters, so on one event
loop each is atomic; all of a decision's limits are checked before any is consumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

from .model import (
    EMPTY_WINDOW,
    Limit,
    RollingStep,
    Verdict,
    Window,
    calendar_step,
    rolling_step,
)

PRUNE_EVERY: Final = 100_000
"""Counters seen since the last prune after which idle ones are dropped (bounded memory)."""


def wall_clock_us() -> int:
    """Microseconds since the Unix epoch (calendar windows are UTC-aligned)."""
    return time.time_ns() // 1000


class InProcessLimiter:
    """Counters in a dict: rolling ones as [backlog, last_us, base slot, *window counts],
    calendar ones as [window, count]."""

    def __init__(self, clock_us: Callable[[], int] = wall_clock_us) -> None:
        self.clock_us = clock_us
        self._state: dict[str, list[int]] = {}
        self._idle_at: dict[str, int] = {}
        self._writes = 0

    async def acquire(self, limits: Sequence[Limit]) -> Verdict:
        """The verdict on one decision; counters change only when it is allowed."""
        return self.decide(limits, self.clock_us())

    def decide(self, limits: Sequence[Limit], now_us: int) -> Verdict:
        """`acquire` at a given time (synchronous: also the Redis limiter's local fallback)."""
        if len(limits) == 1:
            return self._decide_one(limits[0], now_us)
        state = self._state
        updates: list[tuple[str, list[int], int]] = []
        if_consumed: list[int] = []
        if_not: list[int] = []
        denied: list[int] = []
        retry = 0
        for index, limit in enumerate(limits):
            held = state.get(limit.key)
            if limit.window is Window.ROLLING:
                step = _rolling(limit, held, now_us)
                fits, left, left_before, wait = (step.fits, step.left, step.left_before,
                                                 step.retry_us)
                updates.append((limit.key, [step.backlog, now_us, step.slot, *step.window],
                                step.idle_at_us))
            else:
                window, count = held if held else (-1, 0)
                fits, window, after, left, left_before, wait = calendar_step(
                    limit, window, count, now_us)
                updates.append((limit.key, [window, after], (window + 1) * limit.period_us))
            if not fits and limit.hard:
                denied.append(index)
                retry = max(retry, wait)
            if_consumed.append(left)
            if_not.append(left_before)
        if denied:
            return Verdict(False, tuple(if_not), retry, tuple(denied))
        for key, held_after, idle_at in updates:
            state[key] = held_after
            self._idle_at[key] = idle_at
        self._count_writes(len(updates), now_us)
        return Verdict(True, tuple(if_consumed))

    def _decide_one(self, limit: Limit, now_us: int) -> Verdict:
        """`decide` for the common single-limit decision, without the bookkeeping lists."""
        key = limit.key
        held = self._state.get(key)
        if limit.window is Window.ROLLING:
            step = _rolling(limit, held, now_us)
            fits, left, left_before, wait = step.fits, step.left, step.left_before, step.retry_us
            held_after, idle_at = [step.backlog, now_us, step.slot, *step.window], step.idle_at_us
        else:
            window, count = held if held else (-1, 0)
            fits, first, second, left, left_before, wait = calendar_step(
                limit, window, count, now_us)
            held_after, idle_at = [first, second], (first + 1) * limit.period_us
        if not fits and limit.hard:
            return Verdict(False, (left_before,), wait, (0,))
        self._state[key] = held_after
        self._idle_at[key] = idle_at
        self._count_writes(1, now_us)
        return Verdict(True, (left,))

    def _count_writes(self, count: int, now_us: int) -> None:
        self._writes += count
        if self._writes >= PRUNE_EVERY:
            self._prune(now_us)

    def _prune(self, now_us: int) -> None:
        """Drops counters that are back to their idle state (an absent counter is idle)."""
        idle = [key for key, at in self._idle_at.items() if at <= now_us]
        for key in idle:
            del self._state[key], self._idle_at[key]
        self._writes = 0

    def __len__(self) -> int:
        return len(self._state)

    async def close(self) -> None:
        """Nothing to release."""


def _rolling(limit: Limit, held: list[int] | None, now_us: int) -> RollingStep:
    if held is None:
        return rolling_step(limit, 0, now_us, 0, EMPTY_WINDOW, now_us)
    return rolling_step(limit, held[0], held[1], held[2], held[3:], now_us)
