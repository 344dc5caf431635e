"""``cdpruner`` and ``dpp``: the visual tokens of a (conditional) determinantal point process, by greedy MAP.

The paper followed: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs" (CDPruner, 2025). The kept set ``S`` of ``k`` visual tokens maximises
``det(L_S)`` for the conditional kernel

    L_ij = q_i S_ij q_j,    S_ij = cos(x_i, x_j),    q_i = exp(alpha r_i),

``S`` the tokens' similarity (diversity), ``r_i`` each token's relevance to the post's text, so a set
scores high when its tokens are both relevant and unlike each other. The MAP set is found greedily
(each step the token of largest gain ``log det(L_{S + j}) - log det(L_S)``) with the incremental
Cholesky updates of Chen, Zhang and Zhou, "Fast Greedy MAP Inference for Determinantal Point Process
to Improve Recommendation Diversity" (NeurIPS 2018): with ``d_j^2`` the gain of ``j`` and ``c_j`` its
Cholesky row, choosing ``j*`` updates every ``e_j = (L_{j* j} - <c_j*, c_j>) / d_j*``, ``c_j += [e_j]``,
``d_j^2 -= e_j^2``: ``O(N k)`` per step and ``O(N k^2)`` in all, after one ``N x N`` cosine product whose rows the
steps read (kept whole up to a few thousand tokens, else each step computes its row: ``O(N D)``).

``dpp`` is the same with ``q = 1`` (relevance-free diversity): the sweep compares it with ``cdpruner`` on
the user's own data, which is how the relevance below is to be judged.

What the paper leaves open (or sets for towers with a text encoder), and the choice made:

- **Relevance.** CDPruner uses CLIP's text tower; LLaVA-style checkpoints carry none. Here ``r_i`` is the
  mean cosine between the token as the language model receives it (the projector's output) and the
  language model's input embeddings of the prompt's text after the image (the post's text and the
  question: what the model is asked about the image), min-max normalised over the image's tokens to
  ``[0, 1]`` (CDPruner normalises its relevance the same way).
- **alpha** ``= theta / (2 (1 - theta))`` with ``theta = 0.5`` (:data:`THETA`): Chen et al.'s relevance /
  diversity trade-off, an even one; ``q`` then ranges over ``[1, e^0.5]``.
- **Similarity** ``S``: the cosine of the rows the family sends to its projector (as ``divprune``);
  a zero row is normalised with an epsilon.
- **Exactly k.** Greedy MAP stops when no gain is left (duplicates); the budget is the number of tokens,
  so the remaining picks take the largest remaining gain (0 for duplicates), the earliest on ties, never a
  chosen token twice.
- ``cdpruner`` runs on LLaVA-1.5, whose filter is given the prompt's text and projects the tokens it
  scores; the other families refuse it (:data:`REFUSALS`) and take ``dpp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sentilens.mllm.pruning.divprune import GreedyStrategy
from sentilens.mllm.pruning.strategy import UnitInputs

if TYPE_CHECKING:
    import torch

THETA = 0.5
"""The relevance / diversity trade-off: ``alpha = theta / (2 (1 - theta))``."""

REFUSALS = "its filter is not given the prompt's text nor projects the tokens it scores; use 'dpp'"
"""Why the families other than LLaVA-1.5 refuse ``cdpruner``."""


def greedy_map(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` tokens of the greedy MAP order of ``L = diag(q) S diag(q)`` (``S``: cosine of ``features``
    ``(N, D)``, ``q``: ``quality`` ``(N,)``), by the incremental Cholesky updates of the module docstring:
    :func:`greedy_maps` of one image."""
    return greedy_maps(features[None], quality[None], k)[0]


def greedy_maps(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)``: :func:`greedy_map` of each of ``B`` images of as many tokens (``features`` ``(B, N, D)``,
    ``quality`` ``(B, N)``), all at once.

    Each step reads one row of each image's ``S`` (:class:`~sentilens.mllm.pruning.divprune.CosineRows`: one
    matrix product per image for the whole selection) and updates every gain at once, ``O(N step)``; a chosen
    token's gain is set to ``-inf``, which later updates keep, so no mask is rebuilt and no index leaves the
    device until the end. The inner products with the earlier Cholesky rows are elementwise products summed
    over the steps, per image, so an image's order does not depend on the others in its batch."""
    import torch

    from sentilens.mllm.pruning.divprune import CosineRows

    batch, n = features.shape[:2]
    k = min(k, n)
    if k == 0:
        return torch.zeros(batch, 0, dtype=torch.long)
    cosine = CosineRows(features)
    images = cosine.images
    q = quality.detach().float().to(cosine.unit.device)
    rows = torch.zeros(batch, k, n, dtype=torch.float32, device=q.device)  # the Cholesky rows c_j, one per step
    gain = q * q  # d_j^2 = L_jj for the empty set (S_jj = 1)
    order = []
    for step in range(k):
        pick = torch.argmax(gain, dim=1)
        order.append(pick)
        if step == k - 1:
            break
        kernel_row = q[images, pick][:, None] * q * cosine.row(pick)  # L_{pick, j}
        scale = gain[images, pick].clamp(min=0).sqrt()[:, None]
        earlier = rows[:, :step]
        update = kernel_row - (earlier[images, :, pick][:, :, None] * earlier).sum(dim=1)
        update = torch.where(scale > 1e-12, update / scale.clamp(min=1e-12), torch.zeros_like(update))
        rows[:, step] = update
        gain = gain - update * update
        gain[images, pick] = float("-inf")
    return torch.stack(order, dim=1).cpu()


def text_relevance(projected: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(N,)`` relevance in ``[0, 1]``: each projected token's mean cosine with the ``(T, D)`` ``text`` embeddings,
    min-max normalised (all ``0`` when every token is equally relevant)."""
    from torch import nn

    similarity = nn.functional.normalize(projected.float(), dim=-1) @ nn.functional.normalize(text.float(), dim=-1).T
    relevance = similarity.mean(dim=1)
    spread = relevance.max() - relevance.min()
    return (relevance - relevance.min()) / spread if float(spread) > 0 else relevance * 0


class ConditionalDpp(GreedyStrategy):
    """``cdpruner`` (relevance-conditioned) or ``dpp`` (relevance-free): greedy MAP of a DPP over the tokens."""

    name = "dpp"
    forms = ("cdpruner", "dpp")
    summary = ("cdpruner (CDPruner: the greedy MAP set of a DPP whose kernel couples token similarity with "
               "relevance to the post's text; LLaVA-1.5), dpp (the same without relevance)")
    showcase = ("cdpruner", "dpp")

    @property
    def conditional(self) -> bool:
        return self.head == "cdpruner"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"features", "text_tokens"}) if self.conditional else frozenset({"features"})

    def unsupported(self, family: str) -> str | None:
        from sentilens.mllm.families import TITLES

        if self.conditional and family != "llava":
            return f"'cdpruner' is not available for {TITLES.get(family, family)}: {REFUSALS}"
        return super().unsupported(family)

    def greedy_orders(self, stacked: torch.Tensor, group: list[UnitInputs], candidates: torch.Tensor) -> torch.Tensor:
        import torch

        quality = torch.ones(stacked.shape[:2])
        if self.conditional:
            if any(unit.relevance is None for unit in group):
                raise RuntimeError("strategy 'cdpruner' was given no relevance to the post's text")
            alpha = THETA / (2 * (1 - THETA))
            quality = torch.exp(alpha * torch.stack([unit.relevance.float().cpu()[candidates] for unit in group]))
        return greedy_maps(stacked, quality, group[0].budget)
