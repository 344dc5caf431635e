"""The tiny random Qwen2.5-VL and Qwen3-VL checkpoints of ``--model tiny:qwen2.5-vl`` / ``tiny:qwen3-vl``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel

from sentilens.errors import SentilensError
from sentilens.mllm.families.qwen_vl.processor import CHATML_TEMPLATE, QwenProcessor


class TinyQwenSpec(BaseModel):
    """Shapes of the tiny random Qwen models: a padded square image becomes 12 x 12 patches = 6 x 6 = 36
    merged tokens (as many as the tiny LLaVA has); Qwen2.5-VL's 2 x 2-token windows make 9 windows."""

    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 1024
    grid: int = 12  # patches per side


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def build_tiny_qwen(out_dir: str | Path, family: str, corpus: Sequence[str] = (), seed: int = 0,
                    spec: TinyQwenSpec | None = None) -> Path:
    """Write a small random Qwen2.5-VL (``family="qwen2.5-vl"``) or Qwen3-VL (``"qwen3-vl"``) checkpoint
    with its tokenizer (byte-level BPE trained offline, ChatML template) and image processor."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging

    from sentilens.mllm.model import byte_level_bpe
    from sentilens.mllm.prompt import LLAVA15_SYSTEM, TASK_QUESTIONS

    hf_logging.disable_progress_bar()
    if family not in ("qwen2.5-vl", "qwen3-vl"):
        raise SentilensError(f"unknown Qwen family '{family}' (qwen2.5-vl or qwen3-vl)")
    spec = spec or TinyQwenSpec()
    out_dir = Path(out_dir)
    instructions = [LLAVA15_SYSTEM, *TASK_QUESTIONS.values(), "system user assistant Answer with one of:",
                    "positive neutral negative informative not informative",
                    # ChatML answers right after 'assistant\n', with no space: the label words as a line begins
                    "positive", "neutral", "negative", "informative", "not informative"]
    bpe = byte_level_bpe(spec.vocab_size, QWEN_SPECIALS, [*instructions, *corpus])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        chat_template=CHATML_TEMPLATE)
    patch = 14 if family == "qwen2.5-vl" else 16
    pixels = (spec.grid * patch) ** 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               min_pixels=pixels, max_pixels=pixels)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = spec.text_hidden // spec.text_heads
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # t, h, w frequencies
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                  num_heads=spec.vision_heads, depth=spec.vision_layers, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=spec.text_hidden)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        # windows of 2 x 2 merged tokens (4 x 4 patches); every other layer attends over the whole image
        vision.update(window_size=4 * patch, fullatt_block_indexes=list(range(1, spec.vision_layers, 2)))
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": section, "mrope_interleaved": True})
        vision.update(num_position_embeddings=spec.grid ** 2,
                      deepstack_visual_indexes=list(range(max(spec.vision_layers - 2, 0), spec.vision_layers - 1)))
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        cls = Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.save_pretrained(out_dir)
    QwenProcessor(tokenizer, image_processor).save_pretrained(out_dir)
    return out_dir
