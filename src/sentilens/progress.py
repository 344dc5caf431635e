"""Progress display shared by every long job: what runs, done/total, rate and ETA (rich).

Quiet is a parameter (``progress_bar(quiet=True)``), and the rule for the rest: bars are drawn by
the main process only (:func:`sentilens.distributed.is_main_process`), and not at all when the
user sets ``SENTILENS_QUIET`` or CI runs without a terminal. Library code never sets the variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sentilens.distributed import is_main_process

T = TypeVar("T")

console = Console(stderr=True)
_active = 0
"""Bars open now (in any thread)."""


def quiet_by_default() -> bool:
    """No bars in processes other than the main one, with ``SENTILENS_QUIET`` set, or in CI without a terminal."""
    return (not is_main_process() or bool(os.environ.get("SENTILENS_QUIET"))
            or not sys.stderr.isatty() and bool(os.environ.get("CI")))


class _RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # noqa: D102 - rich hook
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return f"{speed:.1f} {unit}/s" if speed else f"? {unit}/s"


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    """A rich Progress with description, bar, n/total, rate, elapsed and ETA columns, on stderr (none if quiet)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
    )
    global _active
    # One bar at a time: a job inside a job (the predictor's own batches inside `predict --input`'s
    # file loop) gets a silent bar, and the outer one keeps the rate and ETA that matter to the user.
    with Progress(*columns, console=console, disable=quiet or quiet_by_default() or _active > 0,
                  transient=False) as progress:
        _active += 1
        try:
            yield progress
        finally:
            _active -= 1
