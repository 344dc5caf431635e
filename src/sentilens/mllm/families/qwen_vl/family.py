"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) and Qwen3-VL (``Qwen3VLForConditionalGeneration``).

Native-resolution images (a grid of 14- or 16-px patches per image), 2x2 patch merging (the merger is
the projector: it is what fine-tuning trains beside the language model, the tower staying frozen),
3-D rotary positions, no CLS token; Qwen2.5-VL's tower attends in windows in most layers, Qwen3-VL's
tower also feeds "deepstack" features into the first language-model layers. The code and every
filtering rule with its reason: :mod:`sentilens.mllm.families.qwen_vl`.

Choices here, and why:

- Processor: the checkpoint's tokenizer and image processor, loaded one by one
  (:class:`sentilens.mllm.families.qwen_vl.processor.QwenProcessor`): transformers' Qwen processors insist on a video
  processor, which needs torchvision, and posts have no video.
- Image size: at most :data:`MAX_IMAGE_TOKENS` visual tokens per image (Qwen's own recommended
  ``max_pixels = 1280 * 28 * 28`` for Qwen2.5-VL, the same token count at Qwen3-VL's 32-px merged
  cells). The released processors allow up to 16,384 tokens per image, which no post-classification
  prompt budget (``max_length``) holds; a checkpoint whose processor asks for fewer keeps its setting.
- ``--model tiny:qwen2.5-vl`` / ``tiny:qwen3-vl`` default to ``crop`` (the image goes to the
  processor as it is; the processor keeps its aspect ratio and cuts nothing), so the tiny models see
  native-resolution grids; ``pad`` makes every image the same square grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from sentilens.data.images import load_image
from sentilens.mllm.families import ModelFamily, PatchView
from sentilens.mllm.families.qwen_vl.flops import prediction_flops
from sentilens.mllm.families.qwen_vl.positions import assemble, language_model_hidden
from sentilens.mllm.families.qwen_vl.processor import (
    CHATML_TEMPLATE,
    QwenImages,
    QwenProcessor,
    image_tokens_for,
    preprocess_images,
)
from sentilens.mllm.families.qwen_vl.tiny import TinyQwenSpec, build_tiny_qwen
from sentilens.mllm.families.qwen_vl.vision import QwenTokenFilter, heatmap, scored_layers, visual_tokens
from sentilens.mllm.pruning import keep_count, parse_strategy

MAX_IMAGE_TOKENS = 1280
"""Most visual tokens one image becomes (Qwen2.5-VL's recommended ``max_pixels = 1280 * 28 * 28``)."""


def capped_size(size, longest_edge: int):
    """The image processor's ``size`` with ``longest_edge`` lowered, in the type it came in: transformers v5's
    processors hold a ``SizeDict`` (a dataclass, not a mapping), older or hand-built ones a plain dict."""
    if dataclasses.is_dataclass(size):
        return dataclasses.replace(size, longest_edge=longest_edge)
    return {**size, "longest_edge": longest_edge}


class QwenFamily(ModelFamily):
    """What Qwen2.5-VL and Qwen3-VL share (everything but the class and the tiny model's architecture)."""

    processor_class = "QwenProcessor"
    pretrains_tower = False
    default_image_aspect = "crop"
    unquantized_modules = ("visual", "lm_head")

    @property
    def chat_template(self) -> str:
        return CHATML_TEMPLATE

    def build_tiny(self, out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
                   vision_tower: str | Path | None = None) -> Path:
        """The tiny random model; ``spec`` (the run's tiny shapes) gives the widths, depths and vocabulary."""
        shared = {} if spec is None else {k: getattr(spec, k) for k in TinyQwenSpec.model_fields if hasattr(spec, k)}
        return build_tiny_qwen(out_dir, self.name, corpus=corpus, seed=seed, spec=TinyQwenSpec(**shared))

    def load_processor(self, source: str):
        processor = QwenProcessor.from_pretrained(source)
        image_processor = processor.image_processor
        cell = image_processor.patch_size * image_processor.merge_size
        cap = MAX_IMAGE_TOKENS * cell * cell
        if image_processor.size["longest_edge"] > cap:
            image_processor.size = capped_size(image_processor.size, cap)
        return processor

    # --- parts: the tower is model.model.visual, its merger(s) the projector ---------------------
    def vision_tower(self, model) -> nn.Module:
        return model.model.visual

    def projector(self, model) -> nn.Module:
        visual = model.model.visual
        mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
        return nn.ModuleList(mergers)

    # --- images and visual tokens --------------------------------------------------------------
    def image_inputs(self, processor, images: Sequence, aspect: str) -> tuple[Tensor, dict[str, Tensor]]:
        prepared = preprocess_images(processor.image_processor, images, aspect)
        return prepared.pixel_values, {"image_grid_thw": prepared.grid_thw}

    def num_image_tokens(self, model, processor) -> int:
        image_processor = processor.image_processor
        cell = image_processor.patch_size * image_processor.merge_size
        return image_processor.size["longest_edge"] // (cell * cell)

    def visual_tokens(self, model, pixel_values: Tensor, extras: dict[str, Tensor], reducer=None) -> list:
        return visual_tokens(model, QwenImages(pixel_values, extras["image_grid_thw"]), reducer)

    def make_reducer(self, model, keep_ratio: float, strategy: str = "all"):
        return QwenTokenFilter(model, keep_ratio, strategy)

    def prediction_flops(self, model, processor, size: tuple[int, int] | None, keep_ratio: float | None,
                         strategy: str, text_tokens: int, answer_tokens: int) -> dict[str, float]:
        """:func:`sentilens.mllm.families.qwen_vl.flops.prediction_flops` for an image of ``size`` as the processor
        resizes it (handed over as it is, ``crop``; a ``pad`` run's square is not known here and is counted as
        given)."""
        n = 0 if size is None else image_tokens_for(processor.image_processor, size)
        kept = 0 if size is None else n if keep_ratio is None else keep_count(n, keep_ratio)
        parsed = parse_strategy(strategy)
        scored = 0 if keep_ratio is None or not parsed.scored or size is None else len(
            scored_layers(model.model.visual, parsed))
        return prediction_flops(model.config, n, kept, text_tokens, answer_tokens, scored)

    def patch_view(self, model, builder, post, reducer) -> PatchView:
        """The merged-token grid over the image as the tower sees it; a rectangular grid (native resolution)
        is padded to a square with score 0, never kept, and ``content`` marks the real region."""
        picture, scores, kept, content = heatmap(model, builder.processor, load_image(post.image),
                                                 builder.settings.image_aspect, reducer)
        rows, cols = scores.shape
        side = max(rows, cols)
        cell = picture.shape[0] // rows
        square_scores = torch.zeros(side, side)
        square_scores[:rows, :cols] = scores
        square_kept = torch.zeros(side, side, dtype=torch.bool)
        square_kept[:rows, :cols] = kept
        shown = torch.zeros(side, side, dtype=torch.bool)
        shown[:rows, :cols] = True
        square_picture = torch.zeros(side * cell, side * cell, 3)
        square_picture[:picture.shape[0], :picture.shape[1]] = picture
        return PatchView(picture=square_picture, scores=square_scores, kept=square_kept,
                         score_name="mean attention received (2x2 merged patches)",
                         content=content, shown=shown)

    # --- the language model ----------------------------------------------------------------------
    def assemble(self, model, token_ids, visual, targets=None, padding_side: str = "right", extras=None):
        return assemble(model, token_ids, visual, targets, padding_side)

    def language_model_hidden(self, model, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                              **kwargs):
        return language_model_hidden(model, inputs_embeds, attention_mask, position_ids, **kwargs)


class Qwen25VLFamily(QwenFamily):
    name = "qwen2.5-vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    model_types = ("qwen2_5_vl",)


class Qwen3VLFamily(QwenFamily):
    name = "qwen3-vl"
    hf_class = "Qwen3VLForConditionalGeneration"
    model_types = ("qwen3_vl",)
