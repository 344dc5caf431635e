"""FLOPs of one Qwen-VL post's prediction (the sweep's FLOP-ideal speedup)."""

from __future__ import annotations

from sentilens.mllm.flops import language_flops


def prediction_flops(config, image_tokens: int, kept: int, text_tokens: int, answer_tokens: int,
                     scored_layers: int = 0) -> dict:
    """FLOPs (2 per multiply-add) of one post's prediction, by part, as :mod:`sentilens.mllm.flops` counts
    LLaVA's: ``image_tokens`` merged tokens before filtering (0: no image), ``kept`` after it.

    Vision: patch embedding; per layer the qkv and output projections, the MLP (gated, three matrices, in
    Qwen2.5-VL; two in Qwen3-VL) and both attention matmuls, over the whole image in full-attention layers
    and inside a window in windowed ones. Scoring: a scored layer's attention map is the one its output is
    made from, so scoring adds only its column sums (one addition per head and map entry). Projector: the
    merger(s) on the kept tokens only (main and, for Qwen3-VL, each deepstack level). Language model and
    head as for LLaVA.
    """
    vision, text = config.vision_config, config.text_config
    parts = {"vision": 0.0, "scoring": 0.0, "projector": 0.0}
    if image_tokens:
        unit = vision.spatial_merge_size ** 2
        patches, d, mlp = image_tokens * unit, vision.hidden_size, vision.intermediate_size
        depth = vision.depth
        mlp_matrices = 2 if config.model_type == "qwen3_vl" else 3
        full = getattr(vision, "fullatt_block_indexes", None)
        full_layers = depth if full is None else len([i for i in full if 0 <= i < depth])
        window = patches if full is None else min(patches, (vision.window_size // vision.patch_size) ** 2)
        dense = 2 * patches * (4 * d * d + mlp_matrices * d * mlp)
        attention = 4 * patches * d * (full_layers * patches + (depth - full_layers) * window)
        embed = 2 * patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * d
        parts["vision"] = float(embed + depth * dense + attention)
        parts["scoring"] = float(scored_layers * vision.num_heads * patches * patches)
        mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", ()) or ())
        width = unit * d
        parts["projector"] = float(mergers * 2 * kept * (width * width + width * vision.out_hidden_size))
    parts.update(language_flops(text, text_tokens + kept + answer_tokens, answer_tokens))
    parts["total"] = sum(parts.values())
    return parts
