"""What the families' reducers share: the base of the tiled families' filters (LLaVA-1.5's is
:class:`sentilens.mllm.families.llava.vision.TokenFilter`).

A reducer is built for one keep ratio and one parsed strategy; it captures the tower's attention
during the family's own tower pass (none for a strategy that reads no attention), chooses each
image's tokens with :func:`sentilens.mllm.pruning.select.choose`, and keeps each image's
:class:`~sentilens.mllm.pruning.select.Selection` of the latest call in ``last`` (for heatmaps).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from sentilens.mllm.pruning.attention import AttentionScorer
from sentilens.mllm.pruning.select import Selection, keep_count
from sentilens.mllm.pruning.strategy import Strategy


def parsed(strategy: Strategy | str) -> Strategy:
    from sentilens.mllm.pruning import parse_strategy

    return parse_strategy(strategy) if isinstance(strategy, str) else strategy


class TiledTokenFilter:
    """What the filters of the tiled families share (LLaVA-NeXT's
    :class:`~sentilens.mllm.families.llava_next.layout.AnyResTokenFilter`, SmolVLM's
    :class:`~sentilens.mllm.families.smolvlm.layout.ShuffleTokenFilter`): an :class:`AttentionScorer` on the
    tower's chosen ``layers``, entered by the family's own tower pass over every tile (:meth:`capture`; no
    scoring without attention), one ``ceil(r N)`` budget per image chosen by the subclass's ``choose``, and
    ``last``, each image's :class:`Selection` of the latest call."""

    family = ""
    """The family's name (``llava-next``...), which the strategy checks it supports."""

    def __init__(self, tower: nn.Module, keep_ratio: float, strategy: Strategy, layers: Sequence[int]):
        strategy.check(self.family)
        keep_count(1, keep_ratio)
        self.strategy = strategy
        self.keep_ratio = keep_ratio
        self.scorer = AttentionScorer(tower, layers)
        self.last: list[Selection] = []

    @contextmanager
    def capture(self) -> Iterator[TiledTokenFilter]:
        with self.scorer.capture() if self.strategy.scored else nullcontext():
            yield self

    def tile_scores(self) -> torch.Tensor:
        """``(all tiles of the batch, patches)`` float32 scores of the latest captured tower pass."""
        if self.scorer.scores is None:
            raise RuntimeError(f"the {self.family} filter chose before the tower ran under its capture")
        return self.scorer.scores.float().cpu()
