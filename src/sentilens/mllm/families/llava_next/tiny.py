"""The tiny random LLaVA-NeXT of ``--model tiny:llava-next``: the tiny LLaVA's CLIP tower and Llama, any-resolution
grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def tiny_pinpoints(size: int) -> list[list[int]]:
    """The tiny model's grid resolutions: 1 x 2, 2 x 1 and 2 x 2 tiles (LLaVA-NeXT's are 2 x 1 ... 3 x 1 of 336)."""
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def build_tiny(out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
               vision_tower: str | Path | None = None, chat_template: str = "") -> Path:
    """A small random LLaVA-NeXT: the tiny LLaVA's CLIP tower and Llama, any-resolution grids of 2 x 1 ... 2 x 2
    tiles, LLaVA-NeXT's image processor and the Mistral-style chat template; saved with ``save_pretrained``."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.utils import logging as hf_logging

    from sentilens.mllm.model import (
        TinySpec,
        load_pretrained_tower,
        tiny_text_config,
        tiny_tokenizer,
        tiny_vision_config,
    )

    hf_logging.disable_progress_bar()
    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer(spec, corpus, instructions=["[INST] [/INST]"])
    size = spec.image_size
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=tiny_pinpoints(size))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=spec.patch_size, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=chat_template)
    vision = tiny_vision_config(spec)
    config = LlavaNextConfig(vision_config=vision, text_config=tiny_text_config(spec, tokenizer),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=tiny_pinpoints(size), vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             image_seq_length=(size // spec.patch_size) ** 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    if vision_tower is not None:
        load_pretrained_tower(model.model.vision_tower, vision, vision_tower)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
