"""Pruning inside the language model: visual tokens dropped after LM layer K, for layers K+1..L.

``lm:K`` (the simplest LM-stage strategy, after FastV): at decoder layer ``K`` the visual tokens are
scored by the attention the prompt's last text token pays them, ``softmax(q_last K^T / sqrt(d))``
averaged over heads, computed from that layer's own rotated queries and keys (one query row per
post: no attention map is formed); the ``ceil(r N)`` best of each post's ``N`` visual tokens stay
for layers ``K+1..L`` and the others leave the sequence there.

Every LM-stage strategy extends :class:`LmStrategy` (written ``NAME:K``): it gives layer ``K``'s prompt
positions priorities (:meth:`LmStrategy.lm_priorities`, from that layer's queries, keys and values) and
this module does the rest; :func:`attention_rows` is the attention of a few query rows, which
``lm:K`` and ``fastv`` read.

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
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

from sentilens.errors import SentilensError
from sentilens.mllm.pruning.strategy import Strategy

if TYPE_CHECKING:
    import torch

LM_STAGE_ATTENTION = "sentilens_lm_stage"
"""The attention implementation a language model runs under while an LM-stage plan is active."""


class LmStrategy(Strategy, ABC):
    """The base of the LM-stage strategies: written ``NAME:K`` (or ``NAME`` for its ``default_layer``), it gives
    each prompt position a priority at layer ``K`` (:meth:`lm_priorities`); each post keeps its ``ceil(r N)``
    visual tokens of highest priority for the layers after ``K``."""

    stage = "lm"
    default_layer: ClassVar[int | None] = None
    """The layer ``K`` of the bare name; None: ``K`` must be written."""

    def __init__(self, head: str, modifier: str = "", lm_layer: int = 0):
        super().__init__(head, modifier)
        self.lm_layer = lm_layer
        """The decoder layer (0-based) whose attention scores the visual tokens."""

    @classmethod
    def parse_head(cls, head: str) -> dict | None:
        found = re.match(rf"^{re.escape(cls.name)}(?::(\d+))?$", head)
        if found is None or (found.group(1) is None and cls.default_layer is None):
            return None
        return {"lm_layer": cls.default_layer if found.group(1) is None else int(found.group(1))}

    @abstractmethod
    def lm_priorities(self, plan: LmPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scaling: float) -> torch.Tensor:
        """``(B, width)`` float priorities of the prompt's positions (only the visual ones are read) from layer
        ``K``'s rotated ``query`` ``(B, H, Q, D)``, ``key`` and ``value`` ``(B, H_kv, Kv, D)``."""


def repeated_keys(plan: LmPlan, key: torch.Tensor, heads: int) -> torch.Tensor:
    """The prompt's keys, float32, one per query head ``(B, H, width, D)`` (grouped-query heads repeated)."""
    return key[:, :, :plan.prompt_mask.shape[1]].repeat_interleave(heads // key.shape[1], dim=1).float()


def attention_rows(plan: LmPlan, query: torch.Tensor, key: torch.Tensor, scaling: float,
                   rows: torch.Tensor) -> torch.Tensor:
    """``(B, H, R, width)`` causal softmax attention of the query positions ``rows`` ``(B, R)`` of each post over
    the prompt (padding and later positions masked), from layer ``K``'s rotated queries and keys: ``R`` rows
    per post, no ``width x width`` map."""
    import torch

    batch, heads = query.shape[:2]
    width = plan.prompt_mask.shape[1]
    device = query.device
    rows = rows.to(device)
    picked = query[torch.arange(batch, device=device)[:, None], :, rows].transpose(1, 2).float()  # (B, H, R, D)
    logits = torch.einsum("bhrd,bhkd->bhrk", picked, repeated_keys(plan, key, heads)) * scaling
    positions = torch.arange(width, device=device)
    allowed = plan.prompt_mask.to(device)[:, None, :] & (positions[None, None, :] <= rows[:, :, None])
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)


class LastTokenAttention(LmStrategy):
    """``lm:K``: the visual tokens the last text token attends to most at LM layer ``K``."""

    name = "lm"
    forms = ("lm:K",)
    summary = ("lm:K (inside the language model: the visual tokens the prompt's last token attends to most at "
               "LM layer K stay for the layers after it)")
    needs: ClassVar[frozenset[str]] = frozenset({"text_tokens"})
    showcase = ("lm:0",)

    def lm_priorities(self, plan, query, key, value, scaling):
        return attention_rows(plan, query, key, scaling, plan.query_index[:, None]).mean(dim=1)[:, 0]


class LmStage:
    """The reducer of an LM-stage strategy: the images pass the vision stage whole, and each batch assembled
    for the language model gets an :class:`LmPlan` (:func:`sentilens.mllm.inputs.build_inputs`)."""

    stage = "lm"
    native_positions = False

    def __init__(self, strategy: LmStrategy, keep_ratio: float, num_layers: int, image_token_id: int):
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

    def choose(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        """Layer ``K``'s choice from its rotated ``query`` ``(B, H, Q, D)``, ``key`` and ``value``
        ``(B, H_kv, Kv, D)``: each post's ``budget`` visual tokens of highest strategy priority."""
        from sentilens.mllm.pruning.select import top_patches

        batch = query.shape[0]
        weights = self.stage.strategy.lm_priorities(self, query, key, value, scaling).float()
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

    from sentilens.stages import selection

    kernel = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
    plan = _ACTIVE[id(module.config)]
    layer = module.layer_idx
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer == plan.layer and plan.keep is None:
        with selection():
            plan.choose(query, key, value, scale)
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
