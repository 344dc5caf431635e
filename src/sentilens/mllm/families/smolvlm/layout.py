"""One SmolVLM image's visual tokens (layout text + kept tokens) and the pixel-shuffle token filter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sentilens.mllm.pruning import (
    FlatUnits,
    Strategy,
    TiledTokenFilter,
    UnitInputs,
    choose,
    encoder_layers,
    keep_count,
    layer_indices,
)


@dataclass
class SmolVisual:
    """One image's span in the language model's input: token ids (layout text and image tokens), the
    projected visual tokens for the image-token slots, and how many of those there are."""

    ids: Tensor
    features: Tensor

    @property
    def count(self) -> int:
        return self.features.shape[0]


class ShuffleTokenFilter(TiledTokenFilter):
    """SmolVLM's filter (module docstring): received attention per patch, averaged over each pixel-shuffle
    block, one ``ceil(r N)`` budget over every tile of the image; ``last`` keeps each image's
    :class:`~sentilens.mllm.pruning.Selection` (kept token indices over the image's tiles, per-token scores)."""

    family = "smolvlm"

    def __init__(self, tower, keep_ratio: float, strategy: Strategy):
        super().__init__(tower, keep_ratio, strategy, layer_indices(strategy.layers, len(encoder_layers(tower)), -1))

    @torch.no_grad()
    def choose(self, tiles: list[int], pixels: list[Tensor], groups: Tensor,
               features: list[Tensor] | None = None) -> list[Tensor]:
        """Kept token indices of each image (over its tiles, in order): ``tiles`` the tile counts, ``pixels``
        each image's real tiles (seeds of ``random``), ``groups`` the patches of each token of a tile,
        ``features`` each image's ``(tokens, s^2 Dv)`` pixel-shuffled rows (for a strategy that chooses by them)."""
        per_tile = groups.shape[0]
        if not self.strategy.scored:
            token_scores = self.strategy.batch_unit_scores([UnitInputs(  # the call's images chosen together
                p, n * per_tile, keep_count(n * per_tile, self.keep_ratio), None if features is None else features[i])
                for i, (p, n) in enumerate(zip(pixels, tiles, strict=True))])
        else:
            patch_scores = self.tile_scores()  # (all tiles, patches)
            block = patch_scores[:, groups].mean(dim=-1)  # (all tiles, tokens per tile)
            token_scores = [t.reshape(-1) for t in torch.split(block, tiles)]
        self.last, kept = [], []
        for i, scores in enumerate(token_scores):
            selection = choose(FlatUnits(scores.numel()), scores, keep_count(scores.numel(), self.keep_ratio),
                               self.strategy, None if features is None else features[i])
            kept.append(selection.kept)
            self.last.append(selection)
        return kept
