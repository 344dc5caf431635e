"""M-RoPE positions and the language model's input: each image placeholder widened to its kept tokens.

A kept token keeps its native 3-D position and the text after the image keeps its own (the package
docstring says why); Qwen3-VL's deepstack features ride along to the language model's first layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sentilens.mllm.families.qwen_vl.processor import QwenImages
from sentilens.mllm.families.qwen_vl.vision import QwenTokenFilter, VisualTokens, visual_tokens
from sentilens.mllm.inputs import LmInputs


def token_positions(ids: Sequence[int], image_id: int, visual: VisualTokens | None) -> Tensor:
    """``(3, len)`` M-RoPE positions of one post whose image placeholder is already widened to ``visual``'s
    kept tokens: text counts up by one; the image's tokens sit at ``start + (t, h, w)`` of their own grid
    cell (nothing renumbered); the text after it starts at ``start + extent``, as in the native model."""
    out = torch.empty(3, len(ids), dtype=torch.long)
    position, at = 0, 0
    while at < len(ids):
        if ids[at] == image_id and visual is not None:
            k = visual.count
            out[:, at:at + k] = visual.positions + position
            position += visual.extent
            at += k
        else:
            out[:, at] = position
            position += 1
            at += 1
    return out


def assemble(model, token_ids: Sequence[Sequence[int]], visual: Sequence[VisualTokens | None],
             targets: Sequence[Sequence[int]] | None = None, padding_side: str = "right") -> LmInputs:
    """Pad the posts into one batch, each image placeholder widened to its kept visual tokens; positions
    ``(3, B, L)``; for Qwen3-VL, ``lm_kwargs`` carries the deepstack features and the visual positions."""
    config = model.config
    image_id = config.image_token_id
    pad_id = getattr(config.text_config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    rows, target_rows, positions = [], [], []
    for i, ids in enumerate(token_ids):
        ids = list(ids)
        tgt = list(targets[i]) if targets is not None else None
        count = ids.count(image_id)
        if count != (visual[i] is not None):
            raise ValueError(f"post {i} has {count} image placeholders but {'an' if visual[i] is not None else 'no'} "
                             "image")
        if count:
            at = ids.index(image_id)
            k = visual[i].count
            ids = ids[:at] + [image_id] * k + ids[at + 1:]
            if tgt is not None:
                tgt = tgt[:at] + [-100] * k + tgt[at + 1:]
        rows.append(ids)
        target_rows.append(tgt)
        positions.append(token_positions(ids, image_id, visual[i]))
    width = max(len(r) for r in rows)
    device = model.lm_head.weight.device
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((3, batch, width), dtype=torch.long)
    tgt_tensor = torch.full((batch, width), -100, dtype=torch.long) if targets is not None else None
    for i, ids in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids)
        mask[i, span] = 1
        position_ids[:, i, span] = positions[i]
        if tgt_tensor is not None:
            tgt_tensor[i, span] = torch.tensor(target_rows[i])
    input_ids, mask, position_ids = input_ids.to(device), mask.to(device), position_ids.to(device)
    embeds = model.get_input_embeddings()(input_ids)
    visual_mask = (input_ids == image_id) & mask.bool()
    present = [v for v in visual if v is not None]
    lm_kwargs: dict = {}
    if present:
        features = torch.cat([v.embeds for v in present]).to(device=embeds.device, dtype=embeds.dtype)
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), features)
        levels = len(present[0].deepstack)
        if levels:
            deepstack = [torch.cat([v.deepstack[level] for v in present]).to(device=embeds.device, dtype=embeds.dtype)
                         for level in range(levels)]
            lm_kwargs = {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": deepstack}
    return LmInputs(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                    targets=None if tgt_tensor is None else tgt_tensor.to(device),
                    image_tokens=[0 if v is None else v.count for v in visual], lm_kwargs=lm_kwargs)


def build_inputs(model, token_ids: Sequence[Sequence[int]], images: QwenImages | None,
                 image_index: Sequence[int | None], token_filter: QwenTokenFilter | None = None,
                 targets: Sequence[Sequence[int]] | None = None, padding_side: str = "right") -> LmInputs:
    """Encode, filter and merge the batch's images, then :func:`assemble` the language model's input."""
    visual: list[VisualTokens | None] = [None] * len(token_ids)
    if images is not None and len(images):
        tokens = visual_tokens(model, images, token_filter)
        for i, row in enumerate(image_index):
            if row is not None:
                visual[i] = tokens[row]
    return assemble(model, token_ids, visual, targets, padding_side)


def language_model_hidden(model, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                          visual_pos_masks: Tensor | None = None, deepstack_visual_embeds: list[Tensor] | None = None,
                          **kwargs):
    """The language model on assembled inputs, Qwen3-VL's deepstack features added where the model adds them.

    Tokens appended after the assembled ones (label scoring's answers) are not visual: the visual mask is
    widened with ``False`` to the input's width. A decoding step (one new token, no visual mask) adds none.
    """
    if deepstack_visual_embeds:
        extra = inputs_embeds.shape[1] - visual_pos_masks.shape[1]
        if extra > 0:
            visual_pos_masks = torch.cat([visual_pos_masks, visual_pos_masks.new_zeros(visual_pos_masks.shape[0],
                                                                                       extra)], dim=1)
        kwargs.update(visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack_visual_embeds)
    return model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **kwargs)
