"""Opt-in wall-clock time per stage of a prediction (the sweep's latency split).

A caller that wants the split wraps its ``predict`` call in :func:`record_stages`; the prediction
code marks its stages with :func:`stage` (``"image"``: decoding and preprocessing the image files,
``"vision"``: vision tower + token scoring + projector, ``"lm"``: the language model's prefill) and
the pruning method's own work with :func:`selection` (``"select"``, inside the other stages: see
:data:`SELECT`). Outside :func:`record_stages` a stage costs nothing. Inside it, CUDA work is
synchronised at each boundary of the coarse stages, so a stage's time is the work it queued, not just
its launch; a ``"select"`` span on a GPU is timed by CUDA events instead (read once, when the record
closes), since it opens inside every scored tower layer and a synchronisation there would change the
very timings the sweep measures. A stage opened inside itself counts once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

SELECT = "select"
"""The stage of a pruning method's own token selection: what it adds to a prediction to choose the tokens.
Timed (:func:`selection` marks it): the scores a method computes itself (``unit_scores``: DivPrune's max-min
greedy, the DPPs' MAP with CDPruner's text relevance, ``random``'s draw), the ranking and the pick under the
budget (:func:`sentilens.mllm.pruning.select.choose`, VisionZip's merge groups, ``+merge``'s contextual tokens,
``downsample``'s pooling); for an attention-scored method the scoring the tower's pass does on top of its own
attention (on a CLS tower the hooked CLS-row logits of each scored layer and the closing softmax; on a tower
without CLS the column sums of the received attention, or on a GPU the separate received-attention pass); for
an LM-stage method the choice at layer K (its priorities from that layer's queries and keys, and the top-k).
Not timed: the tower's and the language model's own work, and masking the dropped tokens out of later layers."""

_active: ContextVar[_Record | None] = ContextVar("sentilens_stage_times", default=None)


class _Record:
    """One :func:`record_stages`: seconds per stage, the stages open now, and pending CUDA event pairs."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.open: set[str] = set()
        self.events: list[tuple[str, object, object]] = []

    def close(self) -> None:
        if self.events:
            import torch

            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.times[name] += start.elapsed_time(end) / 1000
            self.events = []


def _cuda_active() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _synchronize() -> None:
    import torch

    if _cuda_active():
        torch.cuda.synchronize()


@contextmanager
def record_stages() -> Iterator[dict[str, float]]:
    """Collect seconds per stage name for everything run inside (the dict is complete when the block ends)."""
    record = _Record()
    token = _active.set(record)
    try:
        yield record.times
    finally:
        _active.reset(token)
        record.close()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the time inside toward ``name`` when a :func:`record_stages` is active."""
    record = _active.get()
    if record is None or name in record.open:
        yield
        return
    record.open.add(name)
    if name == SELECT and _cuda_active():
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            record.events.append((name, start, end))
            record.open.discard(name)
        return
    _synchronize()
    started = time.perf_counter()
    try:
        yield
    finally:
        _synchronize()
        record.times[name] += time.perf_counter() - started
        record.open.discard(name)


def selection() -> AbstractContextManager[None]:
    """The :data:`SELECT` stage: a pruning method choosing its tokens (what is timed: :data:`SELECT`)."""
    return stage(SELECT)
