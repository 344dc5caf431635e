"""``downsample``: the visual token grid area-pooled down to the budget in the image's layout (the trivial baseline).

Two studies of token pruning found that plain downsampling of the visual token grid is a surprisingly
strong baseline (e.g. Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving
the Right Problem?", 2025). There is no paper rule beyond "average-pool the grid"; the rule here:

- **What is pooled.** The rows the family sends to its projector (LLaVA-1.5's feature-layer states), in
  the tower's ``H x W`` patch grid; a pooled token is the plain mean of its cell's rows, projected like
  any token. Pooling before the projector keeps it a vision-stage strategy (only ``k`` rows are
  projected) and averages in the space the projector was trained to read.
- **The budget's shape.** ``k = ceil(r N)`` tokens exactly, also when ``k`` is no product of two sides:
  ``rows = round(sqrt(k H / W))`` (at least ``ceil(k / W)``, at most ``min(k, H)``) bands of the image,
  band ``i`` cut into ``w_i = floor((i + 1) k / rows) - floor(i k / rows)`` cells (the widths differ by at
  most one and sum to ``k``). So the tokens cover the whole image in its layout, about square cells, and
  exactly ``ceil(r N)`` reach the language model (the count every other strategy keeps).
- **Cell bounds** follow adaptive average pooling (``torch.nn.functional.adaptive_avg_pool2d``): cell
  ``j`` of ``n`` over ``L`` patches spans ``[floor(j L / n), ceil((j + 1) L / n))``; when ``n`` does not
  divide ``L`` neighbouring cells share a boundary patch. At r = 1 every cell is one patch: the native
  tokens, unchanged.
- **Order.** Band by band, cells left to right: the reading order of the native grid.
- **Positions.** The pooled tokens take the sequence positions of ``k`` tokens, as any kept set does.
- **The heatmap** shows each patch's weight in the pooled tokens (``1 / cell size`` summed over its
  cells) and marks the patch at each cell's centre as the one its token stands for.

Families: LLaVA-1.5 (one square grid). The others refuse (:data:`REFUSALS`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sentilens.mllm.pruning.strategy import Strategy

if TYPE_CHECKING:
    import torch

    from sentilens.mllm.pruning.select import Selection

REFUSALS: dict[str, str] = {
    "llava-next": "a pooled cell would straddle its tiles and the row newlines its layout reads",
    "smolvlm": "its tokens are pixel-shuffle blocks of separate tiles, each framed by layout text",
    "qwen2.5-vl": "a pooled token has no 3-D rotary position of its own",
    "qwen3-vl": "a pooled token has no 3-D rotary position or deepstack features of its own",
}
"""Why each family other than LLaVA-1.5 refuses ``downsample``."""


def band_widths(k: int, height: int, width: int) -> list[int]:
    """How many cells each band of an ``height x width`` grid pooled to ``k`` tokens has (module docstring)."""
    rows = round(math.sqrt(k * height / width))
    rows = max(1, min(k, height, max(rows, math.ceil(k / width))))
    return [(i + 1) * k // rows - i * k // rows for i in range(rows)]


def cell_bounds(index: int, cells: int, length: int) -> tuple[int, int]:
    """``[start, end)`` of cell ``index`` of ``cells`` over ``length`` patches (adaptive average pooling)."""
    return index * length // cells, -((-(index + 1) * length) // cells)


def pool_cells(k: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The ``k`` cells ``(row0, row1, col0, col1)`` (half-open) in reading order."""
    widths = band_widths(k, height, width)
    cells = []
    for band, across in enumerate(widths):
        r0, r1 = cell_bounds(band, len(widths), height)
        for j in range(across):
            c0, c1 = cell_bounds(j, across, width)
            cells.append((r0, r1, c0, c1))
    return cells


def area_pool(features: torch.Tensor, k: int, height: int, width: int) -> Selection:
    """``features`` ``(H W, D)`` (raster order) pooled to ``k`` tokens: the :class:`Selection` with the pooled
    ``tokens``, each cell's centre patch as ``kept`` and each patch's pooling weight as ``scores``."""
    import torch

    from sentilens.mllm.pruning.select import Selection

    grid = features.view(height, width, features.shape[-1])
    tokens, centres = [], []
    weight = torch.zeros(height, width, dtype=torch.float32)
    for r0, r1, c0, c1 in pool_cells(k, height, width):
        tokens.append(grid[r0:r1, c0:c1].float().mean(dim=(0, 1)))
        centres.append((r0 + r1 - 1) // 2 * width + (c0 + c1 - 1) // 2)
        weight[r0:r1, c0:c1] += 1.0 / ((r1 - r0) * (c1 - c0))
    return Selection(kept=torch.tensor(sorted(centres)), scores=weight.flatten(),
                     tokens=torch.stack(tokens).to(features.dtype))


class Downsample(Strategy):
    """``downsample``: the patch grid area-pooled to ``ceil(r N)`` tokens."""

    name = "downsample"
    forms = ("downsample",)
    summary = "downsample (the patch grid area-pooled to the budget in the image's layout, a baseline)"
    needs = frozenset({"features"})
    showcase = ("downsample",)
    pools = True
    """It makes new tokens (cell means) rather than choosing among the units."""

    def unsupported(self, family: str) -> str | None:
        from sentilens.mllm.families import TITLES

        if family in REFUSALS:
            return f"'{self.head}' is not available for {TITLES.get(family, family)}: {REFUSALS[family]}"
        return super().unsupported(family)
