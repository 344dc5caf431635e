"""``fastv`` / ``fastv:K``: inside the LM, the visual tokens the text after the image attends to most at layer K.

The paper followed: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models" (FastV, ECCV 2024). At decoder layer ``K`` (the paper's
default ``K = 2``) each visual token ``j`` is scored by the attention it receives,

    s_j = mean over heads h and queries i of softmax(q_i^h K^h^T / sqrt(d))_j,

and the ``ceil(r N)`` highest-scored visual tokens stay for layers ``K + 1 .. L`` (FastV prunes a share
``1 - r`` of them); layers ``0 .. K`` see every token. The machinery (scores from layer ``K``'s own
rotated queries and keys, the dropped tokens masked out of the later layers) is
:mod:`sentilens.mllm.pruning.lm_stage`'s.

What the paper leaves open, and the choice made:

- **Which queries.** FastV's text says "from all other tokens", its code reads the last token's row
  (that is ``lm:K``). Here the queries are the prompt's text tokens *after the image* (the post's text,
  the question and the answer prefix, up to the last prompt token): the tokens before the image cannot
  attend to it under the causal mask, and the visual tokens' attention to each other measures the
  image's own structure, not what the text asks of it. A post whose prompt ends with its image (no
  text after it) falls back to its last token.
- **Averaging.** Plain means over heads and over those queries (each query's row sums to 1, so every
  text token has one vote); grouped-query heads read their shared key.
- **Cost.** ``R`` query rows per post against the prompt's keys (``R`` text tokens after the image, a few
  dozen): ``O(R T d)`` per head, no ``T x T`` map.
- **Ties**: the earlier visual token.
- ``K`` must leave a layer after it (a 2-layer tiny model takes ``fastv:0`` only).
"""

from __future__ import annotations

from typing import ClassVar

from sentilens.mllm.pruning.lm_stage import LmStrategy, attention_rows

FASTV_LAYER = 2
"""FastV's default layer ``K``."""


def text_after_image(plan) -> tuple:
    """``(B, R)`` query positions of each post's text after its image (padded by repeating the post's last prompt
    token) and ``(B, R)`` bool: which entries are real."""
    import torch

    width = plan.prompt_mask.shape[1]
    positions = torch.arange(width)
    visual = plan.visual.cpu()
    last_visual = torch.where(visual, positions, -1).max(dim=1).values
    last = plan.query_index.cpu()
    after = plan.prompt_mask.cpu() & (positions[None, :] > last_visual[:, None]) & (positions[None, :] <= last[:, None])
    after[torch.arange(len(last)), last] = True  # the last prompt token always asks (a prompt ending in its image)
    count = int(after.sum(dim=1).max())
    order = torch.sort(after.int(), dim=1, descending=True, stable=True).indices[:, :count]
    real = torch.gather(after, 1, order)
    rows = torch.where(real, order, last[:, None])
    return rows, real


class TextAttention(LmStrategy):
    """``fastv``: the visual tokens the text after the image attends to most at LM layer ``K`` (default 2)."""

    name = "fastv"
    forms = ("fastv", "fastv:K")
    summary = ("fastv (FastV: inside the language model, the visual tokens the text after the image attends to "
               f"most at LM layer K, default {FASTV_LAYER}, stay for the layers after it)")
    needs: ClassVar[frozenset[str]] = frozenset({"text_tokens"})
    showcase = ("fastv:0",)
    default_layer = FASTV_LAYER

    def lm_priorities(self, plan, query, key, value, scaling):
        rows, real = text_after_image(plan)
        weights = attention_rows(plan, query, key, scaling, rows).mean(dim=1)  # (B, R, width), heads averaged
        real = real.to(weights.device)
        return (weights * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
