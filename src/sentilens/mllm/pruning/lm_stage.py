"""Pruning inside the language model: visual tokens dropped after LM layer K, for layers K+1..L.

``lm:K`` (the simplest LM-stage strategy, after FastV): at decoder layer ``K`` the visual tokens are
scored by the attention the prompt's last text token pays them, ``softmax(q_last K^T / sqrt(d))``
averaged over heads, computed from that layer's own rotated queries and keys (one query row per
post: no attention map is formed); the ``ceil(r N)`` best of each post's ``N`` visual tokens stay
for layers ``K+1..L`` and the others leave the sequence there.

How a token leaves. The decoder layers run under :func:`lm_stage` as their attention function: layer
``K`` scores, and from layer ``K+1`` on the dropped tokens' key columns are masked out of every
query row (the prompt, the answers label scoring appends, each generated token), which is the same
computation as removing them from those layers' sequence; layers ``0..K`` see every token. The
language model's FLOP count follows the per-layer token counts
(:meth:`sentilens.mllm.families.ModelFamily.post_flops`); the dropped rows are still computed here
(the masks keep the batch rectangular), so the measured time does not fall with ``r``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

from sentilens.errors import SentilensError
from sentilens.mllm.pruning.strategy import Strategy

if TYPE_CHECKING:
    import torch

LM_FORM = re.compile(r"^lm:(\d+)$")

LM_STAGE_ATTENTION = "sentilens_lm_stage"
"""The attention implementation a language model runs under while an LM-stage plan is active."""


class LastTokenAttention(Strategy):
    """``lm:K``: the visual tokens the last text token attends to most at LM layer ``K``."""

    name = "lm"
    forms = ("lm:K",)
    summary = ("lm:K (inside the language model: the visual tokens the prompt's last token attends to most at "
               "LM layer K stay for the layers after it)")
    stage = "lm"
    needs: ClassVar[frozenset[str]] = frozenset({"text_tokens"})
    showcase = ("lm:0",)

    def __init__(self, head: str, modifier: str = "", lm_layer: int = 0):
        super().__init__(head, modifier)
        self.lm_layer = lm_layer
        """The decoder layer (0-based) whose attention scores the visual tokens."""

    @classmethod
    def parse_head(cls, head: str) -> dict | None:
        found = LM_FORM.match(head)
        return None if found is None else {"lm_layer": int(found.group(1))}


class LmStage:
    """The reducer of an LM-stage strategy: the images pass the vision stage whole, and each batch assembled
    for the language model gets an :class:`LmPlan` (:func:`sentilens.mllm.inputs.build_inputs`)."""

    stage = "lm"
    native_positions = False

    def __init__(self, strategy: LastTokenAttention, keep_ratio: float, num_layers: int, image_token_id: int):
        from sentilens.mllm.pruning.select import keep_count

        keep_count(1, keep_ratio)
        if not 0 <= strategy.lm_layer < num_layers - 1:
            raise SentilensError(f"strategy '{strategy}': LM layer {strategy.lm_layer} leaves no layer after it in "
                                 f"a {num_layers}-layer language model (use 0 to {num_layers - 2})")
        self.strategy = strategy
        self.keep_ratio = keep_ratio
        self.num_layers = num_layers
        self.image_token_id = image_token_id

    def plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LmPlan:
        """The plan of one assembled prompt batch (``input_ids``, 2-D ``attention_mask``)."""
        return LmPlan(self, (input_ids == self.image_token_id) & attention_mask.bool(), attention_mask.bool())


class LmPlan:
    """One batch's LM-stage state: which prompt positions are visual, each post's budget and, once layer ``K``
    has run, which visual tokens stay (``keep``); ``seen[l]`` counts each post's visual tokens layer ``l``
    attended to in the latest pass (what the contract test checks)."""

    def __init__(self, stage: LmStage, visual: torch.Tensor, prompt_mask: torch.Tensor):
        import torch

        from sentilens.mllm.pruning.select import keep_count

        self.stage = stage
        self.layer = stage.strategy.lm_layer
        self.visual = visual
        self.prompt_mask = prompt_mask
        width = prompt_mask.shape[1]
        positions = torch.arange(width, device=prompt_mask.device)
        self.query_index = torch.where(prompt_mask, positions, -1).max(dim=1).values  # each post's last real token
        counts = visual.sum(dim=1).tolist()
        self.budget = [keep_count(n, stage.keep_ratio) if n else 0 for n in counts]
        self.keep: torch.Tensor | None = None
        self.seen: dict[int, list[int]] = {}

    def choose(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Layer ``K``'s choice from its rotated ``query`` ``(B, H, Q, D)`` and ``key`` ``(B, H_kv, Kv, D)``."""
        import torch

        from sentilens.mllm.pruning.select import top_patches

        batch, heads, _, _ = query.shape
        width = self.prompt_mask.shape[1]
        keys = key[:, :, :width].repeat_interleave(heads // key.shape[1], dim=1).float()
        last = query[torch.arange(batch, device=query.device), :, self.query_index.to(query.device)].float()
        logits = torch.einsum("bhd,bhkd->bhk", last, keys) * scaling
        positions = torch.arange(width, device=query.device)
        allowed = self.prompt_mask.to(query.device) & (positions[None, :] <= self.query_index[:, None].to(query.device))
        weights = logits.masked_fill(~allowed[:, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)
        keep = ~self.visual.clone()
        for row in range(batch):
            visual_at = self.visual[row].nonzero().flatten()
            if visual_at.numel():
                chosen = top_patches(weights[row, visual_at.to(weights.device)].cpu(), self.budget[row])
                keep[row, visual_at[chosen.to(visual_at.device)]] = True
        self.keep = keep

    def mask(self, attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The attention mask of a layer after ``K``: ``attention_mask`` (an SDPA mask, or None for a causal
        one) with the dropped tokens' key columns masked out."""
        import torch

        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        columns = torch.ones(batch, kv_len, dtype=torch.bool, device=query.device)
        width = self.keep.shape[1]
        columns[:, :width] = self.keep.to(query.device)
        if attention_mask is None:
            at = torch.arange(kv_len, device=query.device)
            causal = at[None, :] <= (kv_len - q_len) + torch.arange(q_len, device=query.device)[:, None]
            attention_mask = causal[None, None]
        columns = columns[:, None, None, :]
        if attention_mask.dtype == torch.bool:
            return attention_mask & columns
        return attention_mask.masked_fill(~columns, torch.finfo(attention_mask.dtype).min)

    def record(self, layer: int, attention_mask: torch.Tensor | None) -> None:
        """``seen[layer]``: the visual tokens each post's last prompt token may attend to under the mask the
        layer's kernel is given (a pass over the prompt from its start, so query row = position)."""
        import torch

        if attention_mask is None:  # causal: every earlier token
            self.seen[layer] = self.visual.sum(dim=1).tolist()
            return
        width = self.visual.shape[1]
        batch = torch.arange(self.visual.shape[0], device=attention_mask.device)
        rows = attention_mask.expand(len(batch), -1, -1, -1)[batch, 0, self.query_index.to(attention_mask.device),
                                                              :width]
        allowed = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
        self.seen[layer] = (allowed.cpu() & self.visual.cpu()).sum(dim=1).tolist()


_ACTIVE: dict[int, LmPlan] = {}
"""Language-model config (by id) -> the plan its attention function follows now."""


def _lm_stage_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function of a language model under an LM-stage plan: SDPA, with layer ``K`` choosing and
    the layers after it masking the dropped tokens."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kernel = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
    plan = _ACTIVE[id(module.config)]
    layer = module.layer_idx
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer == plan.layer and plan.keep is None:
        plan.choose(query, key, scale)
    if layer > plan.layer and plan.keep is not None:
        attention_mask = plan.mask(attention_mask, query, key)
    if query.shape[2] > 1:  # a pass over the prompt (the prefill, or label scoring's one pass)
        plan.record(layer, attention_mask)
    return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextmanager
def lm_stage(language_model, plan: LmPlan | None) -> Iterator[None]:
    """For the duration, ``language_model``'s attention follows ``plan`` (nothing changes without one)."""
    if plan is None:
        yield
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    if LM_STAGE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(LM_STAGE_ATTENTION, _lm_stage_attention)
        AttentionMaskInterface.register(LM_STAGE_ATTENTION, sdpa_mask)
    config = language_model.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = LM_STAGE_ATTENTION
    _ACTIVE[id(config)] = plan
    try:
        yield
    finally:
        config._attn_implementation_internal = before
        _ACTIVE.pop(id(config), None)
