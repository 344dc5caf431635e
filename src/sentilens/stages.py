"""Opt-in wall-clock time per stage of a prediction (the sweep's latency split).

A caller that wants the split wraps its ``predict`` call in :func:`record_stages`; the prediction
code marks its stages with :func:`stage` (``"image"``: decoding and preprocessing the image files,
``"vision"``: vision tower + token scoring + projector, ``"lm"``: the language model's prefill).
Outside :func:`record_stages` a stage costs nothing. Inside it, CUDA work is synchronised at each
stage boundary, so a stage's time is the work it queued, not just its launch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_active: ContextVar[dict[str, float] | None] = ContextVar("sentilens_stage_times", default=None)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def record_stages() -> Iterator[dict[str, float]]:
    """Collect seconds per stage name for everything run inside (the dict fills as stages end)."""
    times: dict[str, float] = defaultdict(float)
    token = _active.set(times)
    try:
        yield times
    finally:
        _active.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the time inside toward ``name`` when a :func:`record_stages` is active."""
    times = _active.get()
    if times is None:
        yield
        return
    _synchronize()
    started = time.perf_counter()
    try:
        yield
    finally:
        _synchronize()
        times[name] += time.perf_counter() - started
