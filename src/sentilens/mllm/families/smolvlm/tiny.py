"""The tiny random SmolVLM of ``--model tiny:smolvlm``: a SigLIP-style tower, pixel shuffle 2, the tiny Llama."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sentilens.errors import SentilensError
from sentilens.mllm.families.smolvlm.processor import END_OF_UTTERANCE, FAKE, GLOBAL, MAX_GRID, SmolProcessor


def build_tiny(out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
               vision_tower: str | Path | None = None, chat_template: str = "") -> Path:
    """A small random SmolVLM: a SigLIP-style tower (the tiny spec's width, depth and patch size, one tile
    of ``image_size`` pixels), pixel shuffle 2, the tiny Llama, images split into at most 2 x 2 tiles
    plus the global one, the SmolVLM chat template; saved with ``save_pretrained``."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.utils import logging as hf_logging

    from sentilens.mllm.model import TinySpec, tiny_text_config, tiny_tokenizer

    if vision_tower is not None:
        raise SentilensError("the tiny SmolVLM's SigLIP tower cannot take a pretrained CLIP tower")
    hf_logging.disable_progress_bar()
    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    size, scale = spec.image_size, 2
    if (size // spec.patch_size) % scale:
        raise SentilensError(f"tiny SmolVLM: {size // spec.patch_size} patches a side do not pixel-shuffle by "
                             f"{scale}")
    grid_tokens = [f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    tokenizer = tiny_tokenizer(spec, corpus, instructions=["User: Assistant: System:"],
                               extra_specials={"fake_image_token": FAKE, "global_image_token": GLOBAL,
                                               "end_of_utterance_token": END_OF_UTTERANCE},
                               more_specials=["<|im_start|>", *grid_tokens])
    tokenizer.eos_token = END_OF_UTTERANCE
    image_seq_len = (size // spec.patch_size) ** 2 // scale ** 2
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2 * size},
                                               max_image_size={"longest_edge": size}, do_image_splitting=True)
    vision = SmolVLMVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                                 num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                 image_size=size, patch_size=spec.patch_size)
    config = SmolVLMConfig(vision_config=vision.to_dict(), text_config=tiny_text_config(spec, tokenizer).to_dict(),
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale,
                           pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmolVLMForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    SmolProcessor(tokenizer, image_processor, image_seq_len, chat_template).save_pretrained(out_dir)
    return out_dir
