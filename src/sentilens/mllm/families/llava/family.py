"""The LLaVA-1.5 adapter (``LlavaForConditionalGeneration``), the reference every family defaults to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sentilens.errors import SentilensError
from sentilens.mllm import inputs, pruning
from sentilens.mllm.families import ModelFamily, PatchView
from sentilens.mllm.families.llava import vision
from sentilens.mllm.families.llava.tiny import build_tiny

LLAVA15_CHAT_TEMPLATE = Path(__file__).with_name("template.jinja").read_text(encoding="utf-8")
"""LLaVA-1.5's conversation format (Vicuna v1): ``SYSTEM USER: <image>\\ntext\\nquestion ASSISTANT: label</s>``."""


class LlavaFamily(ModelFamily):
    name = "llava"
    hf_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    model_types = ("llava",)
    pretrains_tower = True
    default_image_aspect = "pad"

    @property
    def chat_template(self) -> str:
        return LLAVA15_CHAT_TEMPLATE

    def image_inputs(self, processor, images: Sequence, aspect: str) -> tuple[Tensor, dict[str, Tensor]]:
        return inputs.pixel_values(processor.image_processor, images, aspect), {}

    def num_image_tokens(self, model, processor) -> int:
        from sentilens.mllm.model import llava_image_tokens

        return llava_image_tokens(model, processor)

    def visual_tokens(self, model, pixel_values: Tensor, extras: dict[str, Tensor], reducer=None) -> list[Tensor]:
        return vision.visual_tokens(model, pixel_values, reducer)

    def make_reducer(self, model, keep_ratio: float, strategy: str = "all"):
        return vision.make_reducer(model, keep_ratio, strategy)

    def assemble(self, model, token_ids, visual, targets=None, padding_side: str = "right", extras=None, native=None):
        return inputs.assemble(model, token_ids, visual, targets, padding_side, native)

    def build_tiny(self, out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
                   vision_tower: str | Path | None = None) -> Path:
        return build_tiny(out_dir, corpus=corpus, seed=seed, spec=spec, vision_tower=vision_tower)

    def image_token_count(self, model, processor, size: tuple[int, int]) -> tuple[int, int]:
        """(visual tokens before filtering, tower passes) of one ``(width, height)`` image: one square input."""
        return self.num_image_tokens(model, processor), 1

    def prediction_flops(self, model, processor, size: tuple[int, int] | None, keep_ratio: float | None,
                         strategy: str, text_tokens: int, answer_tokens: int) -> dict[str, float]:
        """:func:`sentilens.mllm.flops.prediction_flops` with this image's token count and tower passes."""
        from sentilens.mllm.flops import prediction_flops

        if size is None:
            return prediction_flops(model.config, 0, text_tokens, answer_tokens)
        parsed = pruning.parse_strategy(strategy)
        scored = 0
        if keep_ratio is not None and parsed.scored:
            num_layers = len(pruning.encoder_layers(self.vision_tower(model)))
            scored = len(pruning.layer_indices(parsed.layers, num_layers, model.config.vision_feature_layer))
        n, tiles = self.image_token_count(model, processor, size)
        kept = n if keep_ratio is None else pruning.keep_count(n, keep_ratio)
        return prediction_flops(model.config, kept, text_tokens, answer_tokens, scored, tiles=tiles)

    def patch_view(self, model, builder, post, reducer) -> PatchView:
        """The square patch grid of the one tower input, CLS attention per patch (Figure 3)."""
        from sentilens.data.images import load_image

        batch = inputs.make_batch(builder, [post]).to(model.lm_head.weight.device)
        inputs.give_text(reducer, model, batch)
        with torch.no_grad(), reducer.capture():
            features = vision.encode_images(model, batch.pixel_values)
        reducer(features, batch.pixel_values)
        selection = reducer.last[0]
        n = selection.scores.numel()
        side = math.isqrt(n)
        if side * side != n:
            raise SentilensError(f"the vision tower's {n} patches do not form a square grid; no heatmap can be drawn")
        kept = torch.zeros(n, dtype=torch.bool)
        kept[selection.kept.cpu()] = True
        picture = inputs.denormalised(batch.pixel_values[0], builder.processor.image_processor).permute(1, 2, 0)
        name = "CLS attention" if reducer.scorer.cls else "mean attention received (no CLS token)"
        content = inputs.content_box(load_image(post.image).size, builder.settings.image_aspect, picture.shape[1])
        return PatchView(picture=picture, scores=selection.scores.float().cpu().view(side, side),
                         kept=kept.view(side, side), score_name=name, content=content)
