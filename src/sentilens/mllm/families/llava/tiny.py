"""The tiny random LLaVA-1.5 of ``--model tiny``: CLIP ViT with a CLS token, Llama LM, byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from sentilens.mllm.model import (
    TINY_FEATURE_LAYER,
    TinySpec,
    load_pretrained_tower,
    tiny_image_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

TEMPLATE = Path(__file__).with_name("template.jinja").read_text(encoding="utf-8")
"""LLaVA-1.5's chat template, which the tiny model ships."""


def build_tiny(out_dir: str | Path, corpus: Iterable[str] = (), seed: int = 0, spec: TinySpec | None = None,
               vision_tower: str | Path | None = None) -> Path:
    """Write a small LLaVA-1.5 checkpoint + processor to ``out_dir`` (loadable by :func:`load_checkpoint`).

    The tokenizer (:func:`tiny_tokenizer`) is trained on the instruction strings plus ``corpus`` (e.g.
    the training texts). Every weight is random, except the vision tower's when ``vision_tower`` names
    a saved ``CLIPVisionModel`` of the spec's shape (:mod:`sentilens.mllm.tower` pretrains one), which
    is loaded with ``from_pretrained`` and copied in, as LLaVA starts from a pretrained CLIP.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer(spec, corpus)
    size = spec.image_size
    processor = LlavaProcessor(image_processor=tiny_image_processor(spec), tokenizer=tokenizer,
                               patch_size=spec.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=TEMPLATE)
    vision = tiny_vision_config(spec)
    config = LlavaConfig(vision_config=vision, text_config=tiny_text_config(spec, tokenizer),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(size // spec.patch_size) ** 2, vision_feature_layer=TINY_FEATURE_LAYER,
                         vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if vision_tower is not None:
        load_pretrained_tower(model.model.vision_tower, vision, vision_tower)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
