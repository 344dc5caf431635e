"""``visionzip``: dominant tokens by the tower's attention, plus contextual tokens merged from the rest.

The paper followed: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models" (CVPR 2025). Of a budget of ``k`` tokens,

1. ``k - c`` **dominant** tokens: the units the tower's attention ranks highest (VisionZip reads the CLS
   attention of the layer the language model's features come from, heads averaged: the ``feature``
   scores; a tower without CLS scores by the attention each unit receives, as every family here does);
2. ``c`` **contextual** tokens from the other ``N - (k - c)`` units (in their original order): ``c``
   targets taken evenly spaced among them (``rest[floor(i |rest| / c)]``, VisionZip's uniform pick), every
   other remaining unit joins the target it is most cosine-similar to, and a contextual token is the
   mean of its group (target included).

**The split.** VisionZip keeps 54 + 10 of 64, 108 + 20 of 128 and 162 + 30 of 192 tokens: ``c =
floor(5 k / 32)`` gives exactly those and scales with any budget; with ``k < 7`` there is no contextual
token. At ``k = N`` (r = 1) nothing is merged: the native tokens.

What the paper leaves open (or sets for its towers only), and the choice made:

- **Where a contextual token sits.** At its target's place (the target unit carries its group's mean):
  VisionZip appends the contextual tokens after the dominant ones in LLaVA's one sequence, but Qwen-VL's
  tokens need a 3-D position of their own and SmolVLM's a tile, which a target has; the tokens stay in
  reading order and exactly ``k`` of them reach the language model.
- **The similarity** is the cosine of the units' rows as the family sends them to its projector
  (LLaVA's feature-layer states, Qwen's 2 x 2 blocks, SmolVLM's pixel-shuffle blocks), where VisionZip
  compares the feature layer's keys: the rows are at hand in every family without another hook on the
  tower, and the mean is taken of the same rows. (LLaVA-1.5's ``+merge`` keeps the key similarity.)
- **Ties**: the earlier unit (dominant by a stable sort, a group by the first most similar target).
- LLaVA-NeXT refuses: a merged token would change which of its rows stay open, and so the newline count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sentilens.mllm.pruning.strategy import Strategy

if TYPE_CHECKING:
    import torch

CONTEXT_NUMERATOR, CONTEXT_DENOMINATOR = 5, 32
"""``c = floor(5 k / 32)`` contextual tokens of ``k`` (VisionZip's 10 of 64, 20 of 128, 30 of 192)."""


def context_count(budget: int, count: int) -> int:
    """Contextual tokens of a budget of ``budget`` among ``count`` units (none when every unit is kept)."""
    return 0 if budget >= count else budget * CONTEXT_NUMERATOR // CONTEXT_DENOMINATOR


def split(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dominant, targets)`` indices (each increasing) of VisionZip's split (module docstring)."""
    import torch

    from sentilens.mllm.pruning.select import top_patches

    count = scores.numel()
    c = context_count(budget, count)
    dominant = top_patches(scores, budget - c)
    is_rest = torch.ones(count, dtype=torch.bool)
    is_rest[dominant] = False
    rest = is_rest.nonzero().flatten()
    targets = rest[torch.arange(c) * rest.numel() // c] if c else rest[:0]
    return dominant, targets


class DominantAndContext(Strategy):
    """``visionzip``: ``k - c`` dominant units and ``c`` contextual tokens merged from the rest."""

    name = "visionzip"
    forms = ("visionzip",)
    summary = ("visionzip (VisionZip: dominant tokens by the feature layer's attention and about 1 in 6 "
               "contextual tokens, each the mean of the other tokens most similar to it)")
    needs: ClassVar[frozenset[str]] = frozenset({"attention", "features"})
    showcase = ("visionzip",)
    merges_rest = True

    def __init__(self, head: str, modifier: str = "", layers: str = "feature"):
        super().__init__(head, modifier, layers="feature")

    def unsupported(self, family: str) -> str | None:
        if family == "llava-next":
            return ("'visionzip' is not available for LLaVA-NeXT: a merged token would change which rows stay "
                    "open, and so how many newlines reach the language model")
        return super().unsupported(family)

    def priorities(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        import torch

        dominant, targets = split(scores, budget)
        out = torch.zeros(scores.numel(), dtype=torch.float32)
        out[targets] = 1.0
        out[dominant] = 2.0
        return out

    def merge_groups(self, scores: torch.Tensor, budget: int, features: torch.Tensor) -> torch.Tensor:
        import torch
        from torch import nn

        dominant, targets = split(scores, budget)
        groups = torch.full((scores.numel(),), -1, dtype=torch.long)
        if not targets.numel():
            return groups
        is_rest = torch.ones(scores.numel(), dtype=torch.bool)
        is_rest[dominant] = False
        rest = is_rest.nonzero().flatten()
        unit = nn.functional.normalize(features.detach().float(), dim=-1)
        device = unit.device
        nearest = (unit[rest.to(device)] @ unit[targets.to(device)].T).argmax(dim=1).cpu()
        groups[rest] = targets[nearest]
        groups[targets] = targets  # a target always stays in its own group
        return groups
