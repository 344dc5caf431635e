"""The reducers the families run: LLaVA-1.5's :class:`TokenFilter` and the base of the tiled families' filters.

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

from sentilens.errors import SentilensError
from sentilens.mllm.pruning.attention import AttentionScorer, encoder_layers
from sentilens.mllm.pruning.select import Selection, keep_count, reduce_image
from sentilens.mllm.pruning.strategy import Strategy
from sentilens.mllm.pruning.top_attention import feature_layer_index, layer_indices


def parsed(strategy: Strategy | str) -> Strategy:
    from sentilens.mllm.pruning import parse_strategy

    return parse_strategy(strategy) if isinstance(strategy, str) else strategy


class TokenFilter:
    """The reducer of :mod:`sentilens.mllm.inputs`: ``filter(features, pixel_values) -> [(k_i, Dv), ...]``.

    :func:`sentilens.mllm.inputs.visual_tokens` enters :meth:`capture` around the tower forward
    that produces ``features``, so the scores come from that very pass; called on pixels the
    tower did not just see, the filter runs the tower itself once.
    """

    def __init__(self, tower: nn.Module, keep_ratio: float, strategy: Strategy | str = "all",
                 vision_feature_layer: int | Sequence[int] = -2):
        self.strategy = parsed(strategy)
        keep_count(1, keep_ratio)
        self.keep_ratio = keep_ratio
        num_layers = len(encoder_layers(tower))
        layers = layer_indices(self.strategy.layers, num_layers, vision_feature_layer)
        key_layer = None
        if "features" in self.strategy.needs:
            first = vision_feature_layer if isinstance(vision_feature_layer, int) else vision_feature_layer[-1]
            key_layer = feature_layer_index(first, num_layers)
        self.scorer = AttentionScorer(tower, layers, keep_keys_of=key_layer)
        self.last: list[Selection] = []
        self.native_positions = self.strategy.native_positions
        """Whether :func:`sentilens.mllm.inputs.build_inputs` gives the kept tokens their r = 1 positions."""

    @contextmanager
    def capture(self) -> Iterator[TokenFilter]:
        """Score during the caller's own tower forward (no second tower pass; none at all without attention)."""
        with self.scorer.capture() if self.strategy.scored else nullcontext():
            yield self

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        strategy = self.strategy
        if not strategy.scored:
            self.last = [reduce_image(features[i], strategy.unit_scores(pixel_values[i], features.shape[1])
                                      .to(features.device), self.keep_ratio, strategy)
                         for i in range(features.shape[0])]
            return [selection.tokens for selection in self.last]
        scorer = self.scorer
        seen = scorer.pixel_values
        fresh = (scorer.scores is not None and seen is not None and seen.shape == pixel_values.shape
                 and torch.equal(seen, pixel_values.to(device=seen.device, dtype=seen.dtype)))
        if not fresh:
            tower = scorer.tower
            scorer.score(pixel_values.to(device=tower.device, dtype=tower.dtype))
        scores = scorer.scores
        if scores.shape != features.shape[:2]:
            raise SentilensError(f"token filtering scores {scores.shape[1]} patches per image but the features have "
                                 f"{features.shape[1]} rows (a CLIP tower needs vision_feature_select_strategy "
                                 f"'default', which drops the CLS feature)")
        self.last = [
            reduce_image(features[i], scores[i], self.keep_ratio, strategy,
                         None if scorer.keys is None else scorer.keys[i])
            for i in range(features.shape[0])
        ]
        return [selection.tokens for selection in self.last]


def make_reducer(llava: nn.Module, keep_ratio: float, strategy: Strategy | str = "all") -> TokenFilter:
    """The filter for a ``LlavaForConditionalGeneration``."""
    strategy = parsed(strategy)
    strategy.check("llava")
    return TokenFilter(llava.model.vision_tower, keep_ratio, strategy, llava.config.vision_feature_layer)


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
