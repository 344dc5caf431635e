"""``dart`` / ``dart:K``: inside the language model, the visual tokens least duplicated with a few pivot tokens.

The paper followed: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More" (DART, 2025). Instead of ranking tokens by importance, DART keeps the
tokens that repeat the least of what is kept anyway: at decoder layer ``K`` (its default ``K = 2``) it
picks a few *pivot* tokens, measures every other visual token's duplication with them by cosine
similarity, and keeps the least duplicated ones; layers ``K + 1 .. L`` see only those. The machinery
(choosing at layer ``K``, masking the dropped tokens out of the later layers) is
:mod:`sentilens.mllm.pruning.lm_stage`'s.

The rule here, for one post with ``N`` visual tokens and budget ``k = ceil(r N)``:

1. pivots: the ``p = min(DART_PIVOTS, k)`` visual tokens whose layer-``K`` keys (heads concatenated)
   have the largest L2 norm (DART's norm-of-keys pivot criterion);
2. duplication of every other visual token ``j``: ``dup_j = max over pivots P of cos(v_j, v_P)``;
3. kept: the pivots and the ``k - p`` visual tokens of lowest duplication, in their original order.

What the paper leaves open (or leaves to its settings), and the choice made:

- **The norm.** L2, because the rotary embedding rotates pairs of key dimensions and so leaves a key's
  L2 norm unchanged: the pivots do not depend on where the tokens sit in the sequence.
- **The vectors compared.** The layer's value vectors (heads concatenated): the attention function at
  layer ``K`` sees the rotated queries and keys and the values, and the values are the one linear image
  of the layer's input states without a rotation, so cosine similarity between two tokens does not
  change with their distance. DART compares hidden states; values are that layer's projection of them.
- **Pivots.** Visual tokens only, ``DART_PIVOTS = 4`` (the count is a setting DART ablates; a few suffice).
- **Duplication with several pivots**: the most similar pivot's cosine (a token is redundant as soon as
  one pivot repeats it), so one ranking gives exactly ``k`` tokens without quotas per pivot.
- **Ties**: the earlier token. A post's own pivots and kept tokens never depend on the other posts of
  its batch (every step is per post).
"""

from __future__ import annotations

from typing import ClassVar

from sentilens.mllm.pruning.lm_stage import LmStrategy

DART_LAYER = 2
"""DART's default layer ``K``."""

DART_PIVOTS = 4
"""Pivot tokens per post (at most the budget)."""


def dart_priorities(keys, values, visual, budget: list[int]):
    """``(B, width)`` priorities of DART's rule (module docstring): ``keys`` and ``values`` ``(B, width, D)``
    (heads concatenated), ``visual`` ``(B, width)`` bool, ``budget`` per post. Pivots get 2, every other visual
    token ``-dup`` (in ``[-1, 1]``), the rest 0."""
    import torch
    from torch import nn

    priorities = torch.zeros(visual.shape, dtype=torch.float32)
    for row in range(visual.shape[0]):
        at = visual[row].cpu().nonzero().flatten()
        if not at.numel():
            continue
        norms = keys[row, at.to(keys.device)].float().norm(dim=-1).cpu()
        pivots = torch.sort(norms, descending=True, stable=True).indices[:min(DART_PIVOTS, budget[row])]
        unit = nn.functional.normalize(values[row, at.to(values.device)].float(), dim=-1).cpu()
        duplication = (unit @ unit[pivots].T).max(dim=1).values
        scores = -duplication
        scores[pivots] = 2.0
        priorities[row, at] = scores
    return priorities


class PivotDuplication(LmStrategy):
    """``dart``: at LM layer ``K`` (default 2) the pivots and the visual tokens least duplicated with them."""

    name = "dart"
    forms = ("dart", "dart:K")
    summary = ("dart (DART: inside the language model, at LM layer K, default 2, a few pivot tokens and the "
               "visual tokens least duplicated with them stay)")
    needs: ClassVar[frozenset[str]] = frozenset()  # the visual tokens' own keys and values at layer K only
    showcase = ("dart:0",)
    default_layer = DART_LAYER

    def lm_priorities(self, plan, query, key, value, scaling):
        width = plan.prompt_mask.shape[1]

        def heads_joined(states):  # (B, H_kv, T, D) -> (B, width, H_kv D)
            return states[:, :, :width].transpose(1, 2).reshape(states.shape[0], width, -1)

        return dart_priorities(heads_joined(key), heads_joined(value), plan.visual, plan.budget).to(query.device)
