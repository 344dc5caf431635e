"""Choosing the tokens: the budget ``ceil(r N)``, the one ``choose`` every family calls, and ``+merge``.

A family hands :func:`choose` its visual units (:class:`Units`: the tokens it would send, with its
own budget rule), their scores and the budget ``k = keep_count(units.size, r)``; the strategy orders
them (:meth:`sentilens.mllm.pruning.strategy.Strategy.ranking`) and the units pick exactly ``k``
tokens. :class:`FlatUnits` is the rule of LLaVA-1.5, Qwen-VL and SmolVLM (every unit costs one
token); LLaVA-NeXT's row layout, where a row's newline counts against the budget, is its own.

``+merge`` (after VisionZip): instead of discarding the low-score patches, the same token budget
``k`` is split into ``k - k // 6`` dominant patches (top scores, spatial order) and ``k // 6``
contextual tokens (VisionZip keeps 54 + 10 of 64, about 1/6). The contextual tokens summarise every
other patch: ``k // 6`` targets are taken evenly spaced (in spatial order) among the non-dominant
patches, each remaining non-dominant patch joins the target whose key (from the feature layer's
attention, heads concatenated) is most cosine-similar, and a contextual token is the mean of its
group's features. They follow the dominant tokens, in their targets' spatial order. With ``k < 6``
there are no contextual tokens and merge equals discard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from sentilens.errors import SentilensError
from sentilens.stages import selection as timed_selection

CONTEXT_SHARE = 6
"""One contextual token per this many kept tokens under ``merge`` (VisionZip's 10 of 64)."""


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """``ceil(r * N)``, at least 1. ``r * N`` is rounded to 9 decimals first so that a product
    that is an integer in exact arithmetic (0.2 * 5) is not pushed up by float error."""
    if not 0.0 < keep_ratio <= 1.0:
        raise SentilensError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    return max(1, min(num_patches, math.ceil(round(keep_ratio * num_patches, 9))))


def top_patches(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest ``scores`` (1-D), in increasing (spatial) order.

    Ties go to the earlier patch: a stable descending sort keeps equal scores in index order.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


@dataclass
class Selection:
    """What the filter did to one image."""

    kept: torch.Tensor
    """Indices (increasing) of the kept units among the image's units."""
    scores: torch.Tensor
    """``(N,)`` float32 score of every unit (the heatmap's values)."""
    tokens: torch.Tensor | None = None
    """The reduced visual features sent on (``(k, D)``; with ``+merge`` the contextual tokens follow the kept
    ones), for the families that select features; None where the family gathers them from ``kept``."""
    groups: torch.Tensor | None = None
    """``(N,)`` long, for a strategy that merges the dropped units into kept ones (``visionzip``): the unit whose
    token each unit is averaged into (itself for a kept unit that merges), -1 for the others; None: no merging.
    :func:`gather_rows` applies it."""
    projected: torch.Tensor | None = None
    """``(k, D_lm)``: the kept tokens already through the family's projector, where the strategy projected every
    unit to choose (``cdpruner``'s relevance), so the family does not project them again; None: not projected."""


class Units(Protocol):
    """One image's visual units as a family sends them, and its budget rule."""

    size: int
    """How many tokens they are at r = 1 (the ``N`` of ``ceil(r N)``)."""

    def pick(self, priorities: torch.Tensor, budget: int) -> torch.Tensor:
        """Indices (increasing) of the units kept, costing exactly ``budget`` tokens, highest priority first."""
        ...


@dataclass
class FlatUnits:
    """Units that each cost one token: the ``budget`` best, in their original order."""

    size: int

    def pick(self, priorities: torch.Tensor, budget: int) -> torch.Tensor:
        return top_patches(priorities, budget)


def choose(units: Units, scores: torch.Tensor, k: int, strategy, features: torch.Tensor | None = None) -> Selection:
    """The ``k`` tokens ``strategy`` keeps among ``units`` scored ``scores``, under the units' budget rule;
    ``features`` ``(N, D)``: the units' rows, for a strategy that merges by them (:attr:`Selection.groups`)."""
    with timed_selection():
        selection = Selection(kept=units.pick(strategy.priorities(scores, k), k), scores=scores)
        if strategy.merges_rest and k < units.size:
            if features is None:
                raise RuntimeError(f"strategy '{strategy}' merges by the units' rows and was given none")
            selection.groups = strategy.merge_groups(scores, k, features)
    return selection


def gather_rows(rows: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The kept units' ``rows`` (``(N, ...)``, e.g. Qwen's ``(N, 4, Dv)`` blocks): ``rows[kept]``, each merging
    unit's row replaced by the mean of its group's rows (:attr:`Selection.groups`)."""
    kept = selection.kept.to(rows.device)
    if selection.groups is None:
        return rows[kept]
    groups = selection.groups.to(rows.device)
    members = groups >= 0
    sums = torch.zeros_like(rows, dtype=torch.float32)
    sums.index_add_(0, groups[members], rows[members].float())
    sizes = torch.bincount(groups[members], minlength=rows.shape[0]).to(torch.float32)
    out = rows[kept].clone()
    merged = sizes[kept] > 0
    shape = (-1,) + (1,) * (rows.ndim - 1)
    out[merged] = (sums[kept][merged] / sizes[kept][merged].view(shape)).to(rows.dtype)
    return out


def merge_context(features: torch.Tensor, keys: torch.Tensor, dominant: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` contextual tokens summarising the non-dominant patches (rule in the module docstring).

    ``features``: ``(N, Dv)``; ``keys``: ``(N, Dk)``; ``dominant``: kept indices. Returns ``(count, Dv)``.
    """
    is_rest = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    is_rest[dominant] = False
    rest = torch.nonzero(is_rest).flatten()
    count = min(count, rest.numel())
    if count == 0:
        return features.new_zeros(0, features.shape[1])
    target_pos = torch.div(torch.arange(count, device=rest.device) * rest.numel(), count, rounding_mode="floor")
    unit = nn.functional.normalize(keys[rest].float(), dim=-1)
    group = (unit @ unit[target_pos].T).argmax(dim=-1)  # each non-dominant patch -> most similar target
    group[target_pos] = torch.arange(count, device=rest.device)  # a target always stays in its own group
    sums = torch.zeros(count, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, group, features[rest].float())
    sizes = torch.bincount(group, minlength=count).unsqueeze(1)
    return (sums / sizes).to(features.dtype)


def reduce_image(features: torch.Tensor, scores: torch.Tensor, keep_ratio: float, strategy,
                 keys: torch.Tensor | None = None) -> Selection:
    """One image's ``(N, Dv)`` features filtered by their ``(N,)`` scores to ``ceil(r * N)`` tokens under
    ``strategy`` (with ``+merge``, dominant tokens then contextual ones from ``keys``)."""
    total = keep_count(features.shape[0], keep_ratio)
    n_context = total // CONTEXT_SHARE if strategy.merges and total < features.shape[0] else 0
    with timed_selection():
        selection = choose(FlatUnits(features.shape[0]), scores, total - n_context, strategy, features)
        reduced = gather_rows(features, selection)
        if n_context:
            reduced = torch.cat([reduced, merge_context(features, keys, selection.kept, n_context)])
    selection.tokens = reduced
    return selection
