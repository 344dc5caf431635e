"""Keeping the tokens the tower attends to most (the paper's Eq. 3), or least (the ``inverse`` baseline).

Which layers score the tokens (the head of the strategy). ``all`` (default, the paper): every encoder
layer, including the last, which LLaVA-1.5 does not need for its features (it reads
``vision_feature_layer = -2``); the HF LLaVA tower runs all its layers anyway, so the all-layer mean
costs no extra layer there. ``feature`` scores only the layer that produces LLaVA's features (the
``-2`` layer, as FasterVLM does), so a tower cut after that layer still has everything it needs.
``last``, ``A:B`` (a Python slice over the encoder layers) and ``K`` (one layer) are also accepted.
Hidden state ``h`` is produced by encoder layer ``h - 1``; for a negative ``vision_feature_layer``
``f`` that is layer ``L + f``. A family may read the names its own way (Qwen's windowed layers score
nothing; its ``feature`` layers are the ones whose outputs reach the language model).

``+merge`` (after VisionZip, LLaVA-1.5): instead of discarding the low-score patches, the same token
budget is split into dominant and contextual tokens (:func:`sentilens.mllm.pruning.select.merge_context`).
``+native`` (LLaVA-1.5; our addition, not the paper's): the kept visual tokens keep the rotary
positions they have at r = 1 (the image's first position plus the patch index) and the text after
the image keeps its own, so the language model sees exactly the relative distances it was trained
on, minus the dropped tokens: the same computation as attending to the full sequence with the
dropped tokens masked out. The paper drops the tokens and lets the sequence close up (positions
renumbered), which moves the text closer to the image by the number dropped (README has the
measured effect). Qwen-VL keeps native positions always; the tiled families refuse it.

``inverse`` (a baseline the paper has none of) keeps the *lowest*-scored tokens under the paper's
all-layer scores, to show what attention buys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from sentilens.errors import SentilensError
from sentilens.mllm.pruning.strategy import Strategy

if TYPE_CHECKING:
    import torch

LAYER_FORM = re.compile(r"^(-?\d+|-?\d*:-?\d*)$")
"""``K`` or ``A:B`` (either end may be left out, as in a Python slice)."""

NAMED_LAYERS = ("all", "feature", "last")


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
    hidden = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    if not 1 <= hidden <= num_layers:
        raise SentilensError(f"vision_feature_layer {vision_feature_layer} is not the output of an attention layer "
                             f"of a {num_layers}-layer tower")
    return hidden - 1


def layer_indices(layers: str, num_layers: int, vision_feature_layer: int | Sequence[int] = -2) -> list[int]:
    """The 0-based encoder layers of a ``num_layers``-layer tower that ``layers`` names (module docstring)."""
    if layers == "all":
        return list(range(num_layers))
    if layers == "last":
        return [num_layers - 1]
    if layers == "feature":
        feature_layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
        return sorted({feature_layer_index(f, num_layers) for f in feature_layers})
    try:
        if ":" in layers:
            start, stop = (int(part) if part.strip() else None for part in layers.split(":", 1))
            chosen = list(range(num_layers)[slice(start, stop)])
        else:
            chosen = [range(num_layers)[int(layers)]]
    except (ValueError, IndexError):
        raise SentilensError(
            f"bad scoring layers '{layers}': use all, feature, last, a layer K or a slice A:B "
            f"(the tower has {num_layers} layers, 0 to {num_layers - 1})") from None
    if not chosen:
        raise SentilensError(f"scoring layers '{layers}' select no layer of a {num_layers}-layer tower")
    return chosen


class TopAttention(Strategy):
    """The paper's strategy: the tokens the scored layers attend to most, in their original order."""

    name = "attention"
    forms = ("all", "feature", "last", "A:B", "K")
    summary = ("all (the paper: CLS attention averaged over all layers), feature (the layer LLaVA reads, as "
               "FasterVLM), last, a layer slice A:B or one layer K")
    modifiers = ("merge", "native")
    showcase = ("all", "feature", "all+merge", "all+native")

    @classmethod
    def parse_head(cls, head: str) -> dict | None:
        if head in NAMED_LAYERS or LAYER_FORM.match(head):
            return {"layers": head}
        return None

    @property
    def needs(self) -> frozenset[str]:  # +merge also reads the features and their keys
        return frozenset({"attention", "features"}) if self.merges else frozenset({"attention"})


class LowestAttention(Strategy):
    """The ``inverse`` baseline: the lowest all-layer attention scores."""

    name = "inverse"
    forms = ("inverse",)
    summary = "inverse (the lowest-scored patches, a baseline)"
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    modifiers = ("native",)
    showcase = ("inverse",)

    def ranking(self, scores: torch.Tensor) -> torch.Tensor:
        return -scores
