"""``divprune``: the most mutually different visual tokens, by greedy max-min selection; no attention needed.

The paper followed: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models" (CVPR 2025). Pruning is posed as the Max-Min Diversity Problem: among the ``N`` visual tokens,
choose the ``k`` whose smallest pairwise distance ``min_{i != j in S} d(x_i, x_j)`` is largest, with the
cosine distance ``d(x, y) = 1 - x.y / (|x| |y|)``. It is solved greedily, as the paper's Algorithm 1:

1. the first token is the one farthest from its nearest neighbour, ``argmax_i min_{j != i} d(x_i, x_j)``;
2. then, ``k - 1`` times, the token farthest from the chosen set,
   ``argmax_{i not in S} min_{j in S} d(x_i, x_j)``.

The chosen tokens reach the language model in their original (spatial) order.

What the paper leaves open, and the choice made:

- **Which vectors.** The rows each family sends to its projector (LLaVA-1.5's and LLaVA-NeXT's
  feature-layer states, Qwen-VL's 2 x 2 block and SmolVLM's pixel-shuffle block, each concatenated: the
  merger's input), not the projected tokens DivPrune's code measures. Choosing before the projector
  keeps divprune a vision-stage strategy like every other (only the kept rows are projected, on every
  family), and for Qwen-VL and SmolVLM those rows are exactly the units the language model receives
  whole. The projector maps each token on its own, so the rule is the paper's, on the projector's
  input space.
- **Ties** (duplicate tokens, a flat region): the earliest token (``argmax`` takes the first maximum), so
  the choice does not depend on the batch. A chosen token is never chosen again, even when every token
  left duplicates a chosen one.
- **A zero row** (a blank block) has no direction: it is normalised with an epsilon, so its cosine with
  anything is 0 (distance 1).
- **Cost.** Step 1 needs each token's nearest neighbour: one ``N x N`` similarity (``O(N^2 D)``, one matrix
  product in blocks of rows), kept whole up to a few thousand tokens (:class:`CosineRows`); each later step
  reads the row of the token just chosen and takes an elementwise minimum, ``O(N)``: ``O(N^2 D + N k)`` in
  all, with no per-step product and no host round trip (the chosen indices stay on the device until the
  end). At ``k = N`` (r = 1) nothing is computed: every token is kept.
- **Nesting.** The greedy order does not depend on ``k``: a smaller budget keeps a subset of a larger one's
  tokens.
- **The families' budget rules** take priorities: the ``i``-th chosen token (0-based) gets ``k - i``, every
  other 0. Under a flat budget that keeps exactly the chosen ``k``; under LLaVA-NeXT's newline rule the
  chosen patches are taken in greedy order (its newline slots are no candidates: they stay with their
  rows), and a token of budget a row opening could not use goes to the next patch in reading order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from sentilens.mllm.pruning.strategy import Strategy, UnitInputs

if TYPE_CHECKING:
    import torch

SIMILARITY_BLOCK_ROWS = 1024
"""Rows of the similarity computed at once (bounds the working memory of one block at ``1024 x N`` floats)."""

WHOLE_MATRIX_MAX_TOKENS = 4096
"""Up to this many tokens the ``N x N`` cosine similarity is kept whole (64 MiB of float32 at the bound) and
each greedy step reads one of its rows; above it each step computes its row again (``O(N D)``)."""


class CosineRows:
    """The rows of the cosine similarity of each image's ``features`` ``(B, N, D)`` (each row normalised with an
    epsilon, so a zero row's cosine with anything is 0), for the greedy selections of :mod:`.divprune` and
    :mod:`.cdpruner`, which take the ``B`` images of a call together.

    Up to :data:`WHOLE_MATRIX_MAX_TOKENS` tokens each image's matrix is computed once, in blocks of
    :data:`SIMILARITY_BLOCK_ROWS` rows, and kept: a greedy step is then an ``O(N)`` read instead of an ``O(N D)``
    product, which is what makes a selection of ``k`` tokens cost one matrix product and ``k`` cheap steps.
    Whether the matrix is kept depends on ``N`` only, and each image's is its own two-dimensional product, so for
    a given ``N`` a row is always the same numbers: a greedy order depends neither on ``k`` nor on the batch."""

    def __init__(self, features: torch.Tensor, keep: bool | None = None):
        import torch
        from torch import nn

        self.unit = nn.functional.normalize(features.detach().float(), dim=-1)
        self.batch, self.n = self.unit.shape[:2]
        self.images = torch.arange(self.batch, device=self.unit.device)
        keep = self.n <= WHOLE_MATRIX_MAX_TOKENS if keep is None else keep
        self.matrix: torch.Tensor | None = None
        if keep:
            self.matrix = torch.empty(self.batch, self.n, self.n, dtype=torch.float32, device=self.unit.device)
            for image in range(self.batch):
                for start in range(0, self.n, SIMILARITY_BLOCK_ROWS):
                    stop = min(self.n, start + SIMILARITY_BLOCK_ROWS)
                    torch.matmul(self.unit[image, start:stop], self.unit[image].T, out=self.matrix[image, start:stop])

    def blocks(self):
        """``(rows, similarity (B, len(rows), N))`` for consecutive row blocks covering every token (views of the
        kept matrices)."""
        import torch

        for start in range(0, self.n, SIMILARITY_BLOCK_ROWS):
            stop = min(self.n, start + SIMILARITY_BLOCK_ROWS)
            rows = torch.arange(start, stop, device=self.unit.device)
            if self.matrix is not None:
                yield rows, self.matrix[:, start:stop]
            else:
                yield rows, torch.stack([self.unit[i, start:stop] @ self.unit[i].T for i in range(self.batch)])

    def row(self, index: torch.Tensor) -> torch.Tensor:
        """``(B, N)``: the cosine of each image's token ``index[b]`` (``(B,)`` long: no host round trip) with every
        token of that image."""
        import torch

        if self.matrix is not None:
            return self.matrix[self.images, index]
        return torch.stack([self.unit[i].index_select(0, index[i].view(1))[0] @ self.unit[i].T
                            for i in range(self.batch)])


def max_min_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` tokens of the greedy max-min order of ``features`` ``(N, D)`` under cosine distance
    (module docstring), as indices in the order they are chosen: :func:`max_min_orders` of one image."""
    return max_min_orders(features[None], k)[0]


def max_min_orders(features: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)``: :func:`max_min_order` of each of ``B`` images of as many tokens, ``features`` ``(B, N, D)``.

    One similarity row per image and step (:class:`CosineRows`) and an elementwise minimum, for all the images
    at once; a chosen token's distance is set to ``-inf``, which every later minimum keeps, so it is never chosen
    again and no mask is rebuilt."""
    import torch

    batch, n = features.shape[:2]
    k = min(k, n)
    if k == 0 or n == 1:
        return torch.zeros(batch, k, dtype=torch.long)
    cosine = CosineRows(features)
    device, images = cosine.unit.device, cosine.images
    nearest = torch.empty(batch, n, dtype=torch.float32, device=device)  # each token's distance to its nearest other
    for rows, similar in cosine.blocks():
        similar = similar.clone()
        similar[:, torch.arange(len(rows), device=device), rows] = float("-inf")  # not its own neighbour
        nearest[:, rows] = 1.0 - similar.max(dim=2).values
    pick = torch.argmax(nearest, dim=1)
    order = [pick]
    to_set = 1.0 - cosine.row(pick)  # each token's distance to its nearest chosen token (-inf: chosen)
    to_set[images, pick] = float("-inf")
    for _ in range(1, k):
        pick = torch.argmax(to_set, dim=1)
        order.append(pick)
        torch.minimum(to_set, 1.0 - cosine.row(pick), out=to_set)
        to_set[images, pick] = float("-inf")
    return torch.stack(order, dim=1).cpu()


def image_groups(units: Sequence[UnitInputs]) -> list[list[int]]:
    """The indices of ``units`` in groups a batched greedy selection can take together: images with the same
    count, budget and feature width, every unit a candidate; an image with candidates (LLaVA-NeXT's newline
    slots) or nothing to choose (``budget >= count``) is a group of its own. Each group is bounded so that its
    kept similarity matrices hold at most as many numbers as one image of :data:`WHOLE_MATRIX_MAX_TOKENS`."""
    groups: dict[tuple, list[int]] = {}
    for i, unit in enumerate(units):
        alone = unit.candidates is not None or unit.features is None or unit.budget >= unit.count
        key = ("alone", i) if alone else (unit.count, unit.budget, tuple(unit.features.shape),
                                          unit.features.dtype, unit.features.device)
        groups.setdefault(key, []).append(i)
    bounded = []
    for (first, *_), members in groups.items():
        size = 1 if first == "alone" else max(1, WHOLE_MATRIX_MAX_TOKENS ** 2 // max(1, units[members[0]].count) ** 2)
        bounded += [members[i:i + size] for i in range(0, len(members), size)]
    return bounded


def order_priorities(order: torch.Tensor, count: int) -> torch.Tensor:
    """``(count,)`` priorities: the ``i``-th token of ``order`` gets ``len(order) - i``, every other 0."""
    import torch

    priorities = torch.zeros(count, dtype=torch.float32)
    priorities[order] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return priorities


class GreedyStrategy(Strategy, ABC):
    """A strategy whose choice is a greedy order over each image's candidate rows (``divprune``, ``dpp``,
    ``cdpruner``): the images of a call that :func:`image_groups` puts together run their greedy steps as one
    (:meth:`greedy_orders`), and one image alone is a group of one."""

    @abstractmethod
    def greedy_orders(self, stacked: torch.Tensor, group: list[UnitInputs], candidates: torch.Tensor) -> torch.Tensor:
        """``(B, budget)``: each image's first ``budget`` candidates in the order chosen, from ``stacked`` ``(B, C,
        D)``, the rows of the ``C`` candidates (indices ``candidates``) of the group's ``B`` images."""

    def unit_scores(self, units: UnitInputs) -> torch.Tensor:
        return self.batch_unit_scores([units])[0]

    def batch_unit_scores(self, units: Sequence[UnitInputs]) -> list[torch.Tensor]:
        import torch

        scores: list = [None] * len(units)
        for members in image_groups(units):
            group = [units[i] for i in members]
            first = group[0]
            if first.features is None:
                raise RuntimeError(f"strategy '{self}' was given no features to choose by")
            if first.budget >= first.count:
                scores[members[0]] = torch.ones(first.count)
                continue
            candidates = (torch.arange(first.count) if first.candidates is None
                          else first.candidates.cpu().nonzero().flatten())
            chosen = candidates.to(first.features.device)
            stacked = torch.stack([unit.features[chosen] for unit in group])
            for i, order in zip(members, self.greedy_orders(stacked, group, candidates), strict=True):
                scores[i] = order_priorities(candidates[order], first.count)
        return scores


class DiversityPrune(GreedyStrategy):
    """``divprune``: the ``ceil(r N)`` tokens of the greedy max-min cosine diversity order."""

    name = "divprune"
    forms = ("divprune",)
    summary = ("divprune (DivPrune: the most mutually different tokens by greedy max-min cosine distance of the "
               "projector's inputs; no attention)")
    needs: ClassVar[frozenset[str]] = frozenset({"features"})
    showcase = ("divprune",)

    def greedy_orders(self, stacked: torch.Tensor, group: list[UnitInputs], candidates: torch.Tensor) -> torch.Tensor:
        return max_min_orders(stacked, group[0].budget)
