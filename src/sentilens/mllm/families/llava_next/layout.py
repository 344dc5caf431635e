"""LLaVA-NeXT's row layout: an image's slots, the newline budget rule and the any-resolution filter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sentilens.mllm.pruning import (
    Strategy,
    TiledTokenFilter,
    UnitInputs,
    choose,
    encoder_layers,
    keep_count,
    layer_indices,
)

NEWLINE = -1
"""A newline slot in an image's layout (patch slots hold the row of the image's flattened tile features)."""


def choose_slots(layout: Tensor, priority: Tensor, budget: int, base_patches: int) -> Tensor:
    """The kept slots (sorted, reading order) of one image: exactly ``budget`` tokens under the newline rule of
    the module docstring. ``priority`` ``(N,)``: higher is kept first (newline entries are ignored);
    ``base_patches``: the first slots, the base tile, which have no newlines."""
    n = len(layout)
    if budget >= n:
        return torch.arange(n)
    is_patch = layout != NEWLINE
    newline_at = (~is_patch).nonzero().flatten().tolist()
    row = torch.full((n,), -1, dtype=torch.long)
    start = base_patches
    for r, end in enumerate(newline_at):
        row[start:end + 1] = r
        start = end + 1
    order = torch.sort(torch.where(is_patch, priority.float(), float("-inf")), descending=True, stable=True).indices
    order = order[: int(is_patch.sum())].tolist()
    rows = row.tolist()
    taken = [False] * n
    count_in_row = [0] * len(newline_at)
    left = budget
    for slot in order:
        r = rows[slot]
        cost = 1 if r < 0 or count_in_row[r] else 2
        if cost > left:
            continue
        taken[slot] = True
        if r >= 0:
            count_in_row[r] += 1
            taken[newline_at[r]] = True
        left -= cost
        if left == 0:
            break
    if left == 1:  # every patch that costs 1 is taken: open the best closed row, give back one patch
        opener = next(s for s in order if not taken[s])
        givable = [s for s in order if taken[s] and (rows[s] < 0 or count_in_row[rows[s]] > 1)]
        give = givable[-1]
        taken[give] = False
        if rows[give] >= 0:
            count_in_row[rows[give]] -= 1
        taken[opener] = True
        count_in_row[rows[opener]] += 1
        taken[newline_at[rows[opener]]] = True
    return torch.tensor([s for s in range(n) if taken[s]], dtype=torch.long)


@dataclass
class RowUnits:
    """One image's slots (:meth:`LlavaNextFamily.layout`) under the newline rule: a row's newline is kept with
    its first kept patch and counts against the budget (:func:`choose_slots`)."""

    layout: Tensor
    base_patches: int

    @property
    def size(self) -> int:
        return len(self.layout)

    def pick(self, priorities: Tensor, budget: int) -> Tensor:
        return choose_slots(self.layout, priorities, budget, self.base_patches)


class AnyResTokenFilter(TiledTokenFilter):
    """LLaVA-NeXT's filter (module docstring): own-tile CLS scores, one budget over the image, the newline rule.

    :meth:`LlavaNextFamily.visual_tokens` enters :meth:`capture` around its tower pass over all tiles,
    then asks :meth:`choose` for each image's kept slots; ``last`` keeps each image's
    :class:`~sentilens.mllm.pruning.Selection` (kept slots, per-slot scores; newline slots score 0).
    """

    family = "llava-next"

    def __init__(self, tower, keep_ratio: float, strategy: Strategy, vision_feature_layer):
        super().__init__(tower, keep_ratio, strategy,
                         layer_indices(strategy.layers, len(encoder_layers(tower)), vision_feature_layer))
        self.tile_patches = (tower.config.image_size // tower.config.patch_size) ** 2

    @torch.no_grad()
    def choose(self, layouts: list[Tensor], tiles: list[int], pixels: list[Tensor],
               features: list[Tensor] | None = None) -> list[Tensor]:
        """Kept slots of each image (sorted): ``layouts`` from :meth:`LlavaNextFamily.layout`, ``tiles`` the tile
        counts, ``pixels`` each image's real tiles (seeds of the ``random`` baseline), ``features`` each image's
        ``(tiles, g^2, Dv)`` feature-layer states (for a strategy that chooses by them)."""
        if not self.strategy.scored:
            tile_scores = []
            for i, (p, layout) in enumerate(zip(pixels, layouts, strict=True)):
                rows = None
                if features is not None:  # a slot's row: its patch's state; a newline slot is no candidate
                    flat = features[i].reshape(-1, features[i].shape[-1])
                    rows = flat[layout.clamp(min=0).to(flat.device)]
                tile_scores.append(self.strategy.unit_scores(UnitInputs(
                    p, len(layout), keep_count(len(layout), self.keep_ratio), rows, candidates=layout != NEWLINE)))
        else:
            per_tile = torch.split(self.tile_scores(), tiles)
            tile_scores = []
            for scores, layout in zip(per_tile, layouts, strict=True):
                flat = scores.reshape(-1)
                tile_scores.append(torch.where(layout >= 0, flat[layout.clamp(min=0)], 0.0))
        self.last = []
        kept = []
        for layout, scores, count in zip(layouts, tile_scores, tiles, strict=True):
            base = 0 if count == 1 else self.tile_patches  # one tile: its patches form the one row
            selection = choose(RowUnits(layout, base), scores, keep_count(len(layout), self.keep_ratio),
                               self.strategy)
            kept.append(selection.kept)
            self.last.append(selection)
        return kept
