"""Progress of long CLI runs (reconciling many months, exporting many days of snapshots): a
bar with "done/total" on standard error, so it never mixes with CSV or JSON on standard
output, and only when standard error is a terminal (rich draws nothing otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Advance(Protocol):
    def __call__(self, description: str = "") -> None: ...


@contextmanager
def steps(label: str, total: int, console: Console | None = None) -> Iterator[Advance]:
    """A bar of `total` steps; the yielded function marks one done (and may say which)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console or Console(stderr=True),
                  transient=False) as progress:
        task = progress.add_task(label, total=total)

        def advance(description: str = "") -> None:
            progress.update(task, advance=1,
                            description=f"{label} {description}".rstrip())

        yield advance
