"""Floating-point operations of one LLaVA prediction, from the checkpoint's config: the FLOP-ideal speedup.

Filtering visual tokens shortens the language model's input and leaves the vision tower's work
as it is, so the speedup it can bring is bounded by the share of the work the language model
does on visual tokens. The *FLOP-ideal* speedup at keep ratio ``r`` is ``flops(N) / flops(k)``
with ``k = ceil(r N)`` kept tokens: what the filter would give if time followed arithmetic
exactly. A measured speedup near it says the implementation wastes nothing; far below it, that
fixed costs (Python, small kernels, preprocessing) hide the saving.

Counted (2 FLOPs per multiply-add): the vision tower (patch embedding; per layer the q, k, v
and output projections, the MLP and both attention matmuls over all ``N + 1`` tokens), the CLS
scores of the scored layers (one ``1 x T`` attention row per layer), the projector on the kept
rows, and the language model on ``text + kept + answer`` positions (projections, gated MLP,
attention), plus the LM head on the answer positions that label scoring reads. Norms, softmax
and element-wise work are left out: they are a few percent, and the same at every ratio.
"""

from __future__ import annotations

from collections.abc import Sequence


def prediction_flops(config, kept: int, text_tokens: int, answer_tokens: int, scored_layers: int = 0,
                     tiles: int = 1) -> dict:
    """FLOPs of one post's prediction by a ``LlavaConfig``-shaped model, by part, and ``total``.

    ``kept``: visual tokens reaching the language model (0 for a post without an image: the
    tower does not run then); ``text_tokens``: the prompt's other tokens; ``answer_tokens``: the
    label tokens scored after the prompt (all labels' answers, side by side); ``tiles``: the
    tower passes one image takes (LLaVA-NeXT: the base image and its any-resolution crops).
    """
    vision_config, text_config = config.vision_config, config.text_config
    parts = {"vision": 0.0, "scoring": 0.0, "projector": 0.0}
    if kept:
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        tokens, d, mlp = patches + 1, vision_config.hidden_size, vision_config.intermediate_size
        per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens * tokens * d
        parts["vision"] = float(tiles * (2 * patches * 3 * vision_config.patch_size ** 2 * d
                                         + vision_config.num_hidden_layers * per_layer))
        parts["scoring"] = float(tiles * scored_layers * 2 * tokens * d)
        layers = config.vision_feature_layer
        feature_width = d * (1 if isinstance(layers, int) else len(layers))
        h = text_config.hidden_size
        parts["projector"] = float(2 * kept * (feature_width * h + h * h))
    parts.update(language_flops(text_config, text_tokens + kept + answer_tokens, answer_tokens))
    parts["total"] = sum(parts.values())
    return parts


def strategy_flops(model, processor, size: tuple[int, int] | None, keep_ratio: float | None, strategy: str,
                   text_tokens: int, answer_tokens: int) -> dict[str, float]:
    """The family's ``prediction_flops`` of one post under any registered strategy. An LM-stage strategy runs
    the vision stage whole and its language model on every token up to its layer ``K``, on the kept ones
    after: the language part is the unfiltered one for ``K + 1`` layers and, for the others, the one a
    vision-stage filter keeping as many tokens leaves (its one attention row of scores is left out, as norms
    and softmax are)."""
    from sentilens.mllm.families import family_of
    from sentilens.mllm.pruning import parse_strategy

    family = family_of(model)
    parsed = parse_strategy(strategy)
    if parsed.stage != "lm":
        return family.prediction_flops(model, processor, size, keep_ratio, str(parsed), text_tokens, answer_tokens)
    full = family.prediction_flops(model, processor, size, None, "random", text_tokens, answer_tokens)
    if keep_ratio is None or size is None:
        return full
    kept = family.prediction_flops(model, processor, size, keep_ratio, "random", text_tokens, answer_tokens)
    layers = len(family.language_model(model).layers)
    whole = parsed.lm_layer + 1
    parts = dict(full)
    parts["language"] = (whole * full["language"] + (layers - whole) * kept["language"]) / layers
    parts["total"] = sum(value for part, value in parts.items() if part != "total")
    return parts


def language_flops(text_config, positions: int | Sequence[int], answer_tokens: int) -> dict[str, float]:
    """``language`` (the decoder layers: projections, gated MLP, attention) and ``head`` (the LM head on the
    ``answer_tokens`` label scoring reads) FLOPs of a Llama-shaped language model; ``positions``: the
    sequence length, or one length per layer where a strategy drops tokens inside the language model."""
    h = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = text_config.num_key_value_heads or heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    per_layer = [positions] * text_config.num_hidden_layers if isinstance(positions, int) else list(positions)
    per_token = 2 * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * text_config.intermediate_size)
    language = sum(n * per_token + 4 * n * n * heads * head_dim for n in per_layer)
    return {"language": float(language), "head": float(2 * answer_tokens * h * text_config.vocab_size)}
