"""The ``random`` baseline: a uniformly random set of the same number of tokens, to show what attention buys.

Each image's draw is seeded by its pixels, so an image gets the same draw alone or in a batch, and a
smaller ratio keeps a subset of a larger one's tokens; no scoring pass is run.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, ClassVar

from sentilens.mllm.pruning.strategy import Strategy, UnitInputs

if TYPE_CHECKING:
    import torch

RANDOM_SEED = 0
"""Seed of the ``random`` baseline, mixed with each image's pixel checksum."""


def random_priorities(pixel_values: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` uniform draws, each image's seeded by ``RANDOM_SEED`` and a checksum of its pixels."""
    import torch

    rows = []
    for image in pixel_values:
        checksum = zlib.crc32(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        generator = torch.Generator().manual_seed(RANDOM_SEED * (1 << 32) + checksum)
        rows.append(torch.rand(count, generator=generator))
    return torch.stack(rows)


class RandomDraw(Strategy):
    """A seeded uniform draw of ``ceil(r N)`` tokens."""

    name = "random"
    forms = ("random",)
    summary = "random (a seeded uniform draw of the same count, a baseline)"
    needs: ClassVar[frozenset[str]] = frozenset({"pixels"})
    modifiers = ("native",)
    showcase = ("random", "random+native")

    def unit_scores(self, units: UnitInputs) -> torch.Tensor:
        return random_priorities(units.pixels[None], units.count)[0]
