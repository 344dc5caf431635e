"""Speed contract of CLS-attention token filtering (paper Table 4), measured in one run.

1. Scoring overhead: the vision tower with the hook-based scorer (CLS attention averaged over
   all layers, :mod:`sentilens.mllm.pruning`) / the tower alone; target <= 1.10. For comparison,
   the ``output_attentions=True`` route (eager attention, every map materialised) / the tower alone.
2. End-to-end speedup at each keep ratio r: the prediction path of ``MllmPredictor`` (encode
   images with scoring, filter, project, assemble, one-pass label scoring) at r against r = 1
   through the same path, beside the ideal speedup implied by the FLOPs at that token count
   (:func:`sentilens.mllm.flops.prediction_flops`, as the sweep counts them); target: measured >= 0.85 x ideal.

3. Every registered method (the registry's showcase strategies, ``--methods-families``: the LLaVA-1.5 and
   Qwen2.5-VL proxies on a CPU): for each keep ratio (``--method-ratios``) the end-to-end speedup against the same
   method at r = 1 (paired as above, through ``reducer_for``: the family's filter or the LM-stage plan), the
   FLOP-ideal one (:func:`sentilens.mllm.flops.strategy_flops`: an LM-stage method's first K + 1 layers at full
   length) and their ratio; on LLaVA-1.5 (N = 576) each method's own selection cost (the reducer's call on the
   tower's features, plus what capturing attention adds to the tower pass; an LM-stage method's layer-K
   choice) as a share of the released 24-layer tower's time, measured (``--full-tower-layers``). Targets for
   the vision-stage methods: measured >= 0.85 x ideal, selection <= 10 % of the tower. LM-stage methods mask the
   dropped tokens out of the later layers instead of shortening the sequence, so they report the ideal beside a
   measured speedup near 1.
4. On a GPU, the same on LLaVA-1.5-7B and Qwen2.5-VL-7B at batch 1 and 16, and batch 1 again cheap to launch
   (:func:`launch_cheap`: ``torch.compile(mode="reduce-overhead")``, CUDA graphs over the few static shapes the
   keep ratios give). ``--gpu-code-on-cpu`` runs that code on the CPU proxies (eagerly, the compile skipped with
   its reason printed) and writes nothing: no GPU number ever comes from a CPU.

Models have random weights (speed does not depend on them) and are built from configs:
- CPU proxy: the CLIP ViT-L/14-336 tower shape (577 tokens, width 1024, 16 heads, MLP 4096) with
  fewer layers than its 24 (``--vision-layers``, default 4: 2 shared cores) and a small Llama-style
  LM (width 1024, ``--lm-layers`` layers, MLP 2816, 16 heads); batch 1 and 8; float32.
- GPU (only when CUDA is present): the LLaVA-1.5-7B architecture (CLIP ViT-L/14-336, 24 layers +
  Llama-2-7B: 32 layers, width 4096, MLP 11008) in bf16; batch 1 and 16. The paper reports
  1.15x / 1.40x / 1.75x / 2.33x / 3.16x at r = 0.8 / 0.6 / 0.4 / 0.2 / 0.05.
- Qwen-VL CPU proxies (``--families``; batch ``--qwen-batches``): Qwen2.5-VL-7B's tower shape (1280 wide,
  14-px patches, 112-px windows, every 8th layer full) on a 448-px image and Qwen3-VL-8B's (1152 wide,
  16-px patches, deepstack) on a 512-px image, both 256 merged tokens, with ``--vision-layers`` layers and
  a Llama-style LM (1024 wide, 2 KV heads). The scorer is received attention (:mod:`sentilens.mllm.families.qwen_vl`):
  Qwen2.5-VL ``all`` (its full-attention layers), Qwen3-VL ``all`` (every layer) and ``feature`` (deepstack
  layers + last); the FLOP-ideal speedup is :func:`sentilens.mllm.families.qwen_vl.flops.prediction_flops`.
- LLaVA-NeXT and SmolVLM CPU proxies (``--families``; batch ``--tiled-batches``): LLaVA-NeXT's CLIP
  ViT-L/14-336 tower on a 336 x 672 image (base tile + 1 x 2 crops, 1,752 visual tokens with the row
  newlines; own-tile CLS scores, the newline rule) and SmolVLM-256M/500M's SigLIP-B/16-512 tower (768
  wide, pixel shuffle 4) on a 512 x 1024 image (1 x 2 crops + the global tile, 192 tokens; received
  attention per pixel-shuffle block), both with ``--vision-layers`` layers and the LLaVA proxy's
  language model; the FLOP-ideal speedup is the family's ``prediction_flops``. On a GPU (bf16, batches
  ``--tiled-gpu-batches``): LLaVA-NeXT-Mistral-7B on a 672 x 672 image (2,928 tokens) and SmolVLM2-2.2B
  on a 1536 x 1536 image (4 x 4 crops + global, 1,377 tokens).
Each post has ``--text-tokens`` prompt tokens around its image and three 2-token labels, as in a
label-scoring prediction. Timings interleave the variants round-robin over ``--repeats`` passes
(every other pass in reverse order); a ratio of two times (speedup, overhead) is the median over
passes of the ratio within one pass, whose two times are taken moments apart, so a shared
machine's slow spells hit both alike; latencies are each variant's fastest pass. The CPU
part runs on ``--threads`` threads (1 by default: on a shared 2-core machine, another job
stalls a 2-thread kernel at every barrier, which swamps the differences being measured).

Usage: ``python benchmarks/token_filtering.py [--repeats 5] [--threads 1] [--out FILE.json]``; on a GPU
machine ``--skip-cpu --out benchmarks/results/token_filtering_gpu.json`` keeps the two machines' results apart.
Every method only, CPU: ``python benchmarks/token_filtering.py --families '' --methods-families llava,qwen2.5-vl
--repeats 3 --vision-layers 2 --lm-layers 2``. GPU, every method + the CUDA-graph batch 1, one command:
``python benchmarks/token_filtering.py --skip-cpu --families '' --methods-families llava,qwen2.5-vl --repeats 3
--out benchmarks/results/token_filtering_gpu.json`` (check first, anywhere: add ``--gpu-code-on-cpu``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sentilens.machine import cpu_name
from sentilens.mllm.families.llava.vision import TokenFilter, make_reducer
from sentilens.mllm.flops import prediction_flops
from sentilens.mllm.inputs import MllmBatch, build_inputs
from sentilens.mllm.pruning import keep_count
from sentilens.mllm.scoring import label_log_probs
from sentilens.runs import write_json

RATIOS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.05)
PAPER_SPEEDUP = {1.0: 1.00, 0.8: 1.15, 0.6: 1.40, 0.4: 1.75, 0.2: 2.33, 0.05: 3.16}
ANSWERS = [[11, 12], [13, 14], [15, 16]]  # three labels of two tokens each (label + end of turn)


@dataclass(frozen=True)
class Shape:
    name: str
    vision_layers: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab: int
    vision_hidden: int = 1024
    vision_heads: int = 16
    vision_mlp: int = 4096
    image_size: int = 336
    patch_size: int = 14


def build_llava(shape: Shape, dtype: torch.dtype, device: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=shape.lm_hidden, intermediate_size=shape.lm_mlp, num_hidden_layers=shape.lm_layers,
                       num_attention_heads=shape.lm_heads, num_key_value_heads=shape.lm_kv_heads,
                       vocab_size=shape.vocab, max_position_embeddings=4096, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device(device):
        llava = LlavaForConditionalGeneration(config).to(dtype)
    return llava.eval().requires_grad_(False)


@dataclass(frozen=True)
class QwenShape:
    """A Qwen-VL proxy: the released tower's width (fewer layers) and a small Llama-style language model."""

    name: str
    family: str  # "qwen2.5-vl" or "qwen3-vl"
    vision_layers: int
    image_size: int  # a square image of this many pixels a side
    lm_layers: int
    lm_hidden: int = 1024
    lm_heads: int = 16
    lm_kv_heads: int = 2
    lm_mlp: int = 2816
    vocab: int = 32064


def build_qwen(shape: QwenShape, dtype: torch.dtype, device: str):
    """Qwen2.5-VL-7B's tower (1280 wide, 16 heads, MLP 3420, 14-px patches, 112-px windows, every 8th layer
    full) or Qwen3-VL-8B's (1152 wide, 16 heads, MLP 4304, 16-px patches, deepstack at 8/27, 16/27 of the
    depth) with ``vision_layers`` layers, and the small language model of ``shape``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    layers = shape.vision_layers
    head_dim = shape.lm_hidden // shape.lm_heads
    section = [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]
    text = dict(vocab_size=shape.vocab, hidden_size=shape.lm_hidden, intermediate_size=shape.lm_mlp,
                num_hidden_layers=shape.lm_layers, num_attention_heads=shape.lm_heads,
                num_key_value_heads=shape.lm_kv_heads, max_position_embeddings=8192, pad_token_id=0,
                bos_token_id=None, eos_token_id=1)
    ids = dict(image_token_id=shape.vocab - 1, video_token_id=shape.vocab - 2, vision_start_token_id=shape.vocab - 3,
               vision_end_token_id=shape.vocab - 4)
    if shape.family == "qwen2.5-vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
        full = [i for i in range(layers) if i % 8 == 7] or [layers - 1]
        vision = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, depth=layers, patch_size=14,
                      window_size=112, fullatt_block_indexes=full, out_hidden_size=shape.lm_hidden)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                        "mrope_section": section, "mrope_interleaved": True})
        deepstack = sorted({layers * i // 27 for i in (8, 16, 24)} - {layers - 1})
        vision = dict(hidden_size=1152, intermediate_size=4304, num_heads=16, depth=layers, patch_size=16,
                      out_hidden_size=shape.lm_hidden, num_position_embeddings=2304,
                      deepstack_visual_indexes=deepstack)
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen3VLForConditionalGeneration
    with torch.device(device):
        model = cls(config).to(dtype)
    return model.eval().requires_grad_(False)


def measure_qwen(shape: QwenShape, batch: int, device: str, dtype: torch.dtype, text_tokens: int, repeats: int,
                 strategy: str) -> dict:
    """As :func:`measure`, for a Qwen-VL family through its adapter (received-attention scoring on the
    ``strategy`` layers, merged tokens filtered, 3-D positions kept); the tower alone is the same pass with
    the merger recorder and no scoring hooks."""
    from sentilens.mllm.families import family_of
    from sentilens.mllm.families.qwen_vl import flops as qwen_flops
    from sentilens.mllm.families.qwen_vl import processor as qwen_processor
    from sentilens.mllm.families.qwen_vl import vision as qwen_vision

    torch.manual_seed(0)
    model = build_qwen(shape, dtype, device)
    family = family_of(model)
    visual = model.model.visual
    grid = shape.image_size // visual.patch_size
    patch_width = 3 * visual.config.temporal_patch_size * visual.patch_size ** 2
    pixels = torch.randn(batch * grid * grid, patch_width, device=device, dtype=dtype)
    grid_thw = torch.tensor([[1, grid, grid]] * batch, device=device)
    images = qwen_processor.QwenImages(pixels, grid_thw)
    scorer = family.make_reducer(model, 1.0, strategy).scorer
    with torch.no_grad():
        tower_times = timed_passes({"alone": lambda: qwen_vision.encode_images(model, images),
                                    "scored": lambda: qwen_vision.encode_images(model, images, scorer)},
                                   repeats, device)

    image_id = model.config.image_token_id
    ids = [100 + i for i in range(text_tokens // 2)] + [image_id] + [
        200 + i for i in range(text_tokens - text_tokens // 2)]
    posts = MllmBatch(token_ids=[ids] * batch, pixel_values=pixels, image_index=list(range(batch)),
                      image_extras={"image_grid_thw": grid_thw})
    n = (grid // visual.spatial_merge_size) ** 2

    def predict(ratio: float):
        reducer = family.make_reducer(model, ratio, strategy)
        return lambda: label_log_probs(model, build_inputs(model, posts, reducer, padding_side="left"), ANSWERS)

    with torch.no_grad():
        times = timed_passes({ratio: predict(ratio) for ratio in RATIOS}, repeats, device)
    answer_tokens = sum(len(a) for a in ANSWERS)
    scored = len(scorer.layers)
    base_flops = qwen_flops.prediction_flops(model.config, n, n, text_tokens, answer_tokens, scored)["total"]
    rows = []
    for ratio in RATIOS:
        kept = keep_count(n, ratio)
        speedup = paired_ratio(times, 1.0, ratio)
        flops = qwen_flops.prediction_flops(model.config, n, kept, text_tokens, answer_tokens, scored)
        ideal = base_flops / flops["total"]
        rows.append({"ratio": ratio, "kept_tokens": kept, "latency_ms_per_post": 1000 * min(times[ratio]) / batch,
                     "speedup": speedup, "ideal_speedup": ideal, "speedup_of_ideal": speedup / ideal,
                     "paper_speedup": PAPER_SPEEDUP[ratio]})
    return {
        "device": device, "family": shape.family, "model_shape": asdict(shape), "shape_name": shape.name,
        "batch": batch, "dtype": str(dtype).replace("torch.", ""), "text_tokens": text_tokens,
        "image_tokens": n, "strategy": strategy, "scored_layers": scorer.layers,
        "tower_ms": 1000 * min(tower_times["alone"]), "tower_scored_ms": 1000 * min(tower_times["scored"]),
        "scoring_overhead": paired_ratio(tower_times, "scored", "alone"),
        "ratios": rows,
    }


def qwen_proxies(vision_layers: int, lm_layers: int) -> list[tuple[QwenShape, str]]:
    """The CPU proxy settings of the Qwen families: (shape, scoring strategy)."""
    lm = f"Llama-style LM (1024 wide, {lm_layers} layers)"
    q25 = QwenShape(name=f"Qwen2.5-VL-7B tower shape ({vision_layers} of 32 layers), 448 px (256 tokens) + {lm}",
                    family="qwen2.5-vl", vision_layers=vision_layers, image_size=448, lm_layers=lm_layers)
    q3 = QwenShape(name=f"Qwen3-VL-8B tower shape ({vision_layers} of 27 layers), 512 px (256 tokens) + {lm}",
                   family="qwen3-vl", vision_layers=vision_layers, image_size=512, lm_layers=lm_layers)
    return [(q25, "all"), (q3, "all"), (q3, "feature")]


def qwen_real_size() -> list[tuple[QwenShape, str]]:
    """The GPU settings of the Qwen families: the released 7B / 8B architectures, 576 merged tokens an image."""
    q25 = QwenShape(name="Qwen2.5-VL-7B (32-layer tower, 672 px = 576 tokens; LM 3584 wide, 28 layers)",
                    family="qwen2.5-vl", vision_layers=32, image_size=672, lm_layers=28, lm_hidden=3584,
                    lm_heads=28, lm_kv_heads=4, lm_mlp=18944, vocab=152064)
    q3 = QwenShape(name="Qwen3-VL-8B (27-layer tower, 768 px = 576 tokens; LM 4096 wide, 36 layers)",
                   family="qwen3-vl", vision_layers=27, image_size=768, lm_layers=36, lm_hidden=4096,
                   lm_heads=32, lm_kv_heads=8, lm_mlp=12288, vocab=151936)
    return [(q25, "all"), (q3, "all"), (q3, "feature")]


@dataclass(frozen=True)
class TiledShape:
    """A tiled-family proxy (LLaVA-NeXT, SmolVLM): the released tower's width (fewer layers), one image of
    ``image_height x image_width`` pixels, and a small Llama-style language model."""

    name: str
    family: str  # "llava-next" or "smolvlm"
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_mlp: int
    tile_size: int
    patch_size: int
    image_height: int
    image_width: int
    lm_layers: int
    lm_hidden: int = 1024
    lm_heads: int = 16
    lm_kv_heads: int = 16
    lm_mlp: int = 2816
    vocab: int = 32064
    scale_factor: int = 4  # SmolVLM's pixel shuffle


def build_tiled(shape: TiledShape, dtype: torch.dtype, device: str):
    """LLaVA-NeXT (CLIP tower, any-resolution grids of ``tile_size``) or SmolVLM (SigLIP-style tower, pixel
    shuffle ``scale_factor``) with ``shape``'s tower and language model; random weights."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMVisionConfig,
    )

    text = LlamaConfig(hidden_size=shape.lm_hidden, intermediate_size=shape.lm_mlp, num_hidden_layers=shape.lm_layers,
                       num_attention_heads=shape.lm_heads, num_key_value_heads=shape.lm_kv_heads,
                       vocab_size=shape.vocab, max_position_embeddings=8192, pad_token_id=0)
    tower = dict(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                 num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                 image_size=shape.tile_size, patch_size=shape.patch_size)
    if shape.family == "llava-next":
        t = shape.tile_size
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**tower, projection_dim=768, hidden_act="quick_gelu"),
                                 text_config=text, image_token_index=shape.vocab - 1, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default",
                                 image_grid_pinpoints=[[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]])
        cls = LlavaNextForConditionalGeneration
    else:
        config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**tower).to_dict(), text_config=text.to_dict(),
                               image_token_id=shape.vocab - 1, scale_factor=shape.scale_factor)
        cls = SmolVLMForConditionalGeneration
    with torch.device(device):
        model = cls(config).to(dtype)
    return model.eval().requires_grad_(False)


def tiled_inputs(shape: TiledShape, model, batch: int, device: str, dtype: torch.dtype):
    """(pixel values, image extras, tower input tiles) of ``batch`` images of the shape's size, as the family's
    image processor would give them (random pixels; SmolVLM's layout-text ids arbitrary, its layout exact)."""
    from sentilens.mllm.families import family_of

    family = family_of(model)
    t = shape.tile_size
    if shape.family == "llava-next":
        size = torch.tensor([[shape.image_height, shape.image_width]] * batch)
        tiles = family.tiles(model, size[0].tolist())
        pixels = torch.randn(batch, tiles, 3, t, t, device=device, dtype=dtype)
        return pixels, {"image_sizes": size.to(device)}, pixels.flatten(0, 1)
    from sentilens.mllm.families.smolvlm.processor import PAD, TEXT

    rows, cols = shape.image_height // t, shape.image_width // t
    per_tile = (t // shape.patch_size) ** 2 // shape.scale_factor ** 2
    image, marker, newline = shape.vocab - 1, shape.vocab - 2, shape.vocab - 3
    ids, tile = [], []
    for index in range(rows * cols + 1):  # crops row by row, then the global tile (processing_smolvlm's layout)
        if index == rows * cols:
            ids += [newline, marker, marker]
            tile += [TEXT] * 3
        ids += [marker, marker] if index < rows * cols else []
        tile += [TEXT, TEXT] if index < rows * cols else []
        ids += [image] * per_tile
        tile += [index] * per_tile
        if index < rows * cols and index % cols == cols - 1:
            ids.append(newline)
            tile.append(TEXT)
    ids.append(marker)
    tile.append(TEXT)
    pixels = torch.randn(batch, rows * cols + 1, 3, t, t, device=device, dtype=dtype)
    extras = {"grid": torch.tensor([[rows, cols]] * batch, device=device),
              "span_ids": torch.tensor([ids] * batch, device=device),
              "span_tile": torch.tensor([tile] * batch, device=device)}
    assert PAD not in tile
    return pixels, extras, pixels.flatten(0, 1)


def measure_tiled(shape: TiledShape, batch: int, device: str, dtype: torch.dtype, text_tokens: int,
                  repeats: int) -> dict:
    """As :func:`measure`, for LLaVA-NeXT (own-tile CLS attention, the newline rule) or SmolVLM (received
    attention per pixel-shuffle block) through the family adapter; the FLOP-ideal speedup is the family's
    ``prediction_flops`` (every tile through the tower, the kept tokens through the language model)."""
    from types import SimpleNamespace

    from sentilens.mllm.families import family_of

    torch.manual_seed(0)
    model = build_tiled(shape, dtype, device)
    family = family_of(model)
    tower = family.vision_tower(model)
    pixels, extras, tiles = tiled_inputs(shape, model, batch, device, dtype)
    scorer = family.make_reducer(model, 1.0).scorer
    if shape.family == "llava-next":
        def alone():
            tower(tiles, output_hidden_states=True)
    else:
        def alone():
            tower(pixel_values=tiles)

    def scored():
        with scorer.capture():
            alone()

    with torch.no_grad():
        tower_times = timed_passes({"alone": alone, "scored": scored}, repeats, device)
    image_id = model.config.image_token_id
    ids = [1] + [100 + i for i in range(text_tokens // 2)] + [image_id] + [
        200 + i for i in range(text_tokens - 1 - text_tokens // 2)]
    posts = MllmBatch(token_ids=[ids] * batch, pixel_values=pixels, image_index=list(range(batch)),
                      image_extras=extras)

    def predict(ratio: float):
        reducer = family.make_reducer(model, ratio)
        return lambda: label_log_probs(model, build_inputs(model, posts, reducer, padding_side="left"), ANSWERS)

    with torch.no_grad():
        times = timed_passes({ratio: predict(ratio) for ratio in RATIOS}, repeats, device)
        n = build_inputs(model, posts, None, padding_side="left").image_tokens[0]
    processor = None
    if shape.family == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        processor = SimpleNamespace(image_processor=SmolVLMImageProcessorPil(
            size={"longest_edge": max(shape.image_height, shape.image_width)},
            max_image_size={"longest_edge": shape.tile_size}))
    size = (shape.image_width, shape.image_height)
    answer_tokens = sum(len(a) for a in ANSWERS)

    def total(ratio: float) -> float:
        return family.prediction_flops(model, processor, size, ratio, "all", text_tokens, answer_tokens)["total"]

    base_flops = total(1.0)
    rows = []
    for ratio in RATIOS:
        speedup = paired_ratio(times, 1.0, ratio)
        ideal = base_flops / total(ratio)
        rows.append({"ratio": ratio, "kept_tokens": keep_count(n, ratio),
                     "latency_ms_per_post": 1000 * min(times[ratio]) / batch,
                     "speedup": speedup, "ideal_speedup": ideal, "speedup_of_ideal": speedup / ideal,
                     "paper_speedup": PAPER_SPEEDUP[ratio]})
    return {
        "device": device, "family": shape.family, "model_shape": asdict(shape), "shape_name": shape.name,
        "batch": batch, "dtype": str(dtype).replace("torch.", ""), "text_tokens": text_tokens,
        "image_tokens": n, "tiles_per_image": tiles.shape[0] // batch, "strategy": "all",
        "scored_layers": scorer.layers,
        "tower_ms": 1000 * min(tower_times["alone"]), "tower_scored_ms": 1000 * min(tower_times["scored"]),
        "scoring_overhead": paired_ratio(tower_times, "scored", "alone"),
        "ratios": rows,
    }


def tiled_proxies(vision_layers: int, lm_layers: int) -> list[TiledShape]:
    """The CPU proxy settings of LLaVA-NeXT and SmolVLM."""
    lm = f"Llama-style LM (1024 wide, {lm_layers} layers)"
    next_ = TiledShape(name=f"LLaVA-NeXT: CLIP ViT-L/14-336 shape ({vision_layers} of 24 layers), 336 x 672 image "
                            f"(base + 1 x 2 crops, 1,752 tokens) + {lm}", family="llava-next",
                       vision_layers=vision_layers, vision_hidden=1024, vision_heads=16, vision_mlp=4096, tile_size=336,
                       patch_size=14, image_height=336, image_width=672, lm_layers=lm_layers)
    smol = TiledShape(name=f"SmolVLM-256M/500M tower shape (SigLIP-B/16-512, {vision_layers} of 12 layers, pixel "
                           f"shuffle 4), 512 x 1024 image (1 x 2 crops + global, 192 tokens) + {lm}", family="smolvlm",
                      vision_layers=vision_layers, vision_hidden=768, vision_heads=12, vision_mlp=3072, tile_size=512,
                      patch_size=16, image_height=512, image_width=1024, lm_layers=lm_layers)
    return [next_, smol]


def tiled_real_size() -> list[TiledShape]:
    """The GPU settings of LLaVA-NeXT and SmolVLM: the released architectures on their largest grids."""
    next_ = TiledShape(name="LLaVA-NeXT-Mistral-7B (CLIP ViT-L/14-336, 24 layers; 672 x 672 image: base + 2 x 2 "
                            "crops, 2,928 tokens; Mistral-7B)", family="llava-next", vision_layers=24,
                       vision_hidden=1024, vision_heads=16, vision_mlp=4096, tile_size=336, patch_size=14,
                       image_height=672, image_width=672, lm_layers=32, lm_hidden=4096, lm_heads=32, lm_kv_heads=8,
                       lm_mlp=14336, vocab=32064)
    smol = TiledShape(name="SmolVLM2-2.2B (SigLIP-so400m/14-384, 27 layers, pixel shuffle 3; 1536 x 1536 image: "
                           "4 x 4 crops + global, 1,377 tokens; SmolLM2-1.7B)", family="smolvlm", vision_layers=27,
                      vision_hidden=1152, vision_heads=16, vision_mlp=4304, tile_size=384, patch_size=14,
                      image_height=1536, image_width=1536, lm_layers=24, lm_hidden=2048, lm_heads=32,
                      lm_kv_heads=32, lm_mlp=8192, vocab=49280, scale_factor=3)
    return [next_, smol]


# ----------------------------------------------------------------------------------------------- every method

METHOD_RATIOS = (1.0, 0.4, 0.2, 0.05)
SELECTION_BUDGETS = (230, 115, 29)  # of N = 576: the k DivPrune and DPP are timed at, beside the ratios' own


def registered_methods(family: str) -> tuple[list[str], dict[str, str]]:
    """(the registry's showcase strategies ``family`` runs, {refused strategy: the family's one-line reason})."""
    from sentilens.mllm.pruning import parse_strategy, showcase_strategies

    runs, refused = [], {}
    for text in showcase_strategies():
        reason = parse_strategy(text).unsupported(family)
        if reason is None:
            runs.append(text)
        else:
            refused[text] = reason
    return runs, refused


@contextmanager
def timed_lm_choice(record: list[float], device: str):
    """For the duration, every LM-stage choice at layer K (:meth:`LmPlan.choose`) appends its wall time to
    ``record``: the LM-stage methods' own selection cost, measured inside the pass that makes it."""
    from sentilens.mllm.pruning.lm_stage import LmPlan

    original = LmPlan.choose

    def choose(plan, *args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        original(plan, *args, **kwargs)
        synchronize(device)
        record.append(time.perf_counter() - start)

    LmPlan.choose = choose
    try:
        yield
    finally:
        LmPlan.choose = original


def method_flops(model, processor, size: tuple[int, int], ratio: float, method: str, text_tokens: int) -> float:
    """The project's FLOP count of one post under ``method`` (:func:`sentilens.mllm.flops.strategy_flops`: an
    LM-stage method's first K + 1 layers at full length)."""
    from sentilens.mllm.flops import strategy_flops

    answer_tokens = sum(len(a) for a in ANSWERS)
    return strategy_flops(model, processor, size, ratio, method, text_tokens, answer_tokens)["total"]


def measure_methods(model, posts: MllmBatch, size: tuple[int, int], n: int, device: str, text_tokens: int,
                    repeats: int, methods: list[str], ratios: tuple[float, ...], processor=None) -> dict:
    """End-to-end speedup of every method at every ratio against the same method at r = 1, through the
    prediction path (``reducer_for``: the family's filter, or the LM-stage plan; then label scoring), paired
    as :func:`measure`, beside the FLOP-ideal speedup; and each LM-stage method's layer-K choice time."""
    from sentilens.mllm.pruning import parse_strategy, reducer_for

    out = {}
    for method in methods:
        def predict(ratio: float, method=method):
            reducer = reducer_for(model, ratio, method)
            return lambda: label_log_probs(model, build_inputs(model, posts, reducer, padding_side="left"), ANSWERS)

        lm_choice: list[float] = []
        with torch.no_grad(), timed_lm_choice(lm_choice, device):
            times = timed_passes({ratio: predict(ratio) for ratio in ratios}, repeats, device)
        base = method_flops(model, processor, size, 1.0, method, text_tokens)
        rows = []
        for ratio in ratios:
            ideal = base / method_flops(model, processor, size, ratio, method, text_tokens)
            speedup = paired_ratio(times, 1.0, ratio)
            rows.append({"ratio": ratio, "kept_tokens": keep_count(n, ratio),
                         "latency_ms_per_post": 1000 * min(times[ratio]) / posts_count(posts),
                         "speedup": speedup, "ideal_speedup": ideal, "speedup_of_ideal": speedup / ideal})
        entry = {"stage": parse_strategy(method).stage, "ratios": rows}
        if lm_choice:
            entry["lm_choice_ms"] = 1000 * statistics.median(lm_choice)
        out[method] = entry
        print(f"  {method:>12} " + "  ".join(f"r={r['ratio']:g} {r['speedup']:.2f}x/{r['ideal_speedup']:.2f}x"
                                               for r in rows), flush=True)
    return out


def posts_count(posts: MllmBatch) -> int:
    return len(posts.token_ids)


def llava_selection_costs(llava, pixels: torch.Tensor, posts: MllmBatch, repeats: int, methods: list[str],
                          device: str) -> dict:
    """Each vision-stage method's own cost on one image of the LLaVA-1.5 shape (N = 576): the reducer's call on
    the tower's features (top-k and gather, the greedy of DivPrune / DPP, CDPruner's projection and relevance,
    VisionZip's merge) at each ratio and, for DivPrune and DPP, at k in :data:`SELECTION_BUDGETS`; plus, for an
    attention method, what capturing the scores adds to the tower pass."""
    from sentilens.mllm.families.llava import vision as llava_vision
    from sentilens.mllm.inputs import give_text
    from sentilens.mllm.pruning import parse_strategy, reducer_for
    from sentilens.mllm.pruning.cdpruner import greedy_map
    from sentilens.mllm.pruning.divprune import max_min_order

    image = pixels[:1]
    one = MllmBatch(token_ids=posts.token_ids[:1], pixel_values=image, image_index=[0])
    tower = llava.model.vision_tower
    with torch.no_grad():
        features = llava_vision.encode_images(llava, image)
    n = features.shape[1]
    out = {"tokens": n}
    for method in methods:
        strategy = parse_strategy(method)
        if strategy.stage != "vision":
            continue
        calls, capture = {}, None
        for ratio in METHOD_RATIOS[1:]:
            reducer = reducer_for(llava, ratio, method)
            give_text(reducer, llava, one)
            with torch.no_grad(), reducer.capture():
                llava_vision.encode_images(llava, image)  # the scores the reducer call reads
            calls[ratio] = (lambda reducer=reducer: reducer(features, image))
            if capture is None and strategy.scored:
                def scored(reducer=reducer):
                    with reducer.capture():
                        tower(image, output_hidden_states=True)
                capture = scored
        with torch.no_grad():
            times = timed_passes(calls, repeats, device)
            entry = {"selection_ms": {f"{r:g}": 1000 * statistics.median(times[r]) for r in calls}}
            if capture is not None:
                tower_times = timed_passes({"alone": lambda: tower(image, output_hidden_states=True),
                                            "scored": capture}, repeats, device)
                entry["scoring_capture_ms"] = max(0.0, 1000 * statistics.median(
                    a - b for a, b in zip(tower_times["scored"], tower_times["alone"], strict=True)))
        out[method] = entry
    unit = features[0]
    quality = torch.ones(n, device=unit.device)
    with torch.no_grad():
        greedy = timed_passes({(name, k): (lambda fn=fn, k=k: fn(k)) for k in SELECTION_BUDGETS
                               for name, fn in (("divprune", lambda k: max_min_order(unit, k)),
                                                ("dpp", lambda k: greedy_map(unit, quality, k)))}, repeats, device)
    out["greedy_ms"] = {f"{name} k={k}": 1000 * statistics.median(t) for (name, k), t in greedy.items()}
    return out


def tower_ms(vision_layers: int, batch: int, device: str, dtype: torch.dtype, repeats: int) -> float:
    """The fastest pass of a CLIP ViT-L/14-336 tower (random weights) with ``vision_layers`` layers on ``batch``
    images: the time the selection costs are a share of."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
    torch.manual_seed(0)
    with torch.device(device):
        tower = CLIPVisionModel(config).to(dtype).eval().requires_grad_(False)
    pixels = torch.randn(batch, 3, 336, 336, device=device, dtype=dtype)
    with torch.no_grad():
        times = timed_passes({"tower": lambda: tower(pixels, output_hidden_states=True)}, repeats, device)
    return 1000 * min(times["tower"])


def measure_llava_methods(shape: Shape, batch: int, device: str, dtype: torch.dtype, text_tokens: int,
                          repeats: int, ratios: tuple[float, ...], full_tower_layers: int | None,
                          methods: list[str] | None = None) -> dict:
    """Every registered method on the LLaVA-1.5 shape ``shape`` at ``batch``: end-to-end speedups
    (:func:`measure_methods`), each method's selection cost (:func:`llava_selection_costs`) and its share of the
    tower, the proxy's own and (``full_tower_layers``) the released 24-layer one's, both measured."""
    torch.manual_seed(0)
    llava = build_llava(shape, dtype, device)
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, device=device, dtype=dtype)
    image_id = llava.config.image_token_id
    ids = [1] + [100 + i for i in range(text_tokens // 2)] + [image_id] + [
        200 + i for i in range(text_tokens - 1 - text_tokens // 2)]
    posts = MllmBatch(token_ids=[ids] * batch, pixel_values=pixels, image_index=list(range(batch)))
    n = (shape.image_size // shape.patch_size) ** 2
    runs, refused = registered_methods("llava")
    runs = [m for m in runs if methods is None or m in methods]
    print(f"\n[{device}] every method, {shape.name}, batch {batch}, {str(dtype).replace('torch.', '')}", flush=True)
    per_method = measure_methods(llava, posts, (shape.image_size, shape.image_size), n, device, text_tokens,
                                 repeats, runs, ratios)
    costs = llava_selection_costs(llava, pixels, posts, repeats, runs, device)
    with torch.no_grad():
        proxy_tower = tower_ms(shape.vision_layers, 1, device, dtype, repeats)
    llava = None
    if full_tower_layers == shape.vision_layers:
        full_tower = proxy_tower
    else:
        full_tower = None if full_tower_layers is None else tower_ms(full_tower_layers, 1, device, dtype,
                                                                     max(2, repeats // 2))
    for method, entry in per_method.items():
        own = costs.get(method)
        if own is not None:
            entry["selection_ms"] = own["selection_ms"]
            if "scoring_capture_ms" in own:
                entry["scoring_capture_ms"] = own["scoring_capture_ms"]
            worst = max(own["selection_ms"].values()) + own.get("scoring_capture_ms", 0.0)
        else:  # an LM-stage method: its layer-K choice
            worst = entry.get("lm_choice_ms", 0.0)
        entry["selection_worst_ms"] = worst
        entry["selection_share_of_proxy_tower"] = worst / proxy_tower
        if full_tower is not None:
            entry["selection_share_of_tower"] = worst / full_tower
    return {
        "device": device, "family": "llava", "shape_name": shape.name, "model_shape": asdict(shape), "batch": batch,
        "dtype": str(dtype).replace("torch.", ""), "text_tokens": text_tokens, "image_tokens": n,
        "proxy_tower_ms": proxy_tower, "tower_ms": full_tower, "tower_layers": full_tower_layers,
        "greedy_ms": costs["greedy_ms"], "refused": refused, "methods": per_method,
        "load_average_after": list(os.getloadavg()),
    }


def report_methods(setting: dict) -> None:
    print(f"\n[{setting['device']}] every method, {setting['shape_name']}, batch {setting['batch']}: tower "
          f"{setting['tower_ms'] or float('nan'):.0f} ms ({setting['tower_layers']} layers), proxy tower "
          f"{setting['proxy_tower_ms']:.0f} ms")
    print(f"  {'method':>12} {'stage':>6} " + " ".join(f"{'r=' + format(r, 'g'):>17}" for r in METHOD_RATIOS[1:])
          + f" {'selection':>10} {'share':>6}")
    for method, entry in setting["methods"].items():
        cells = [f"{r['speedup']:.2f}/{r['ideal_speedup']:.2f}={r['speedup_of_ideal']:.2f}"
                 for r in entry["ratios"] if r["ratio"] < 1]
        share = entry.get("selection_share_of_tower", entry["selection_share_of_proxy_tower"])
        print(f"  {method:>12} {entry['stage']:>6} " + " ".join(f"{c:>17}" for c in cells)
              + f" {entry['selection_worst_ms']:>8.2f}ms {100 * share:>5.1f}%")
    print("  greedy alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in setting["greedy_ms"].items()))


def measure_qwen_methods(shape: QwenShape, batch: int, device: str, dtype: torch.dtype, text_tokens: int,
                         repeats: int, ratios: tuple[float, ...], methods: list[str] | None = None) -> dict:
    """Every registered method the Qwen-VL family runs, on ``shape`` at ``batch`` (:func:`measure_methods`; the
    image-token count of the FLOP count from the image processor's rule, ``image_tokens_for``)."""
    from types import SimpleNamespace

    from sentilens.mllm.families.qwen_vl import processor as qwen_processor

    torch.manual_seed(0)
    model = build_qwen(shape, dtype, device)
    visual = model.model.visual
    grid = shape.image_size // visual.patch_size
    patch_width = 3 * visual.config.temporal_patch_size * visual.patch_size ** 2
    pixels = torch.randn(batch * grid * grid, patch_width, device=device, dtype=dtype)
    grid_thw = torch.tensor([[1, grid, grid]] * batch, device=device)
    image_id = model.config.image_token_id
    ids = [100 + i for i in range(text_tokens // 2)] + [image_id] + [
        200 + i for i in range(text_tokens - text_tokens // 2)]
    posts = MllmBatch(token_ids=[ids] * batch, pixel_values=pixels, image_index=list(range(batch)),
                      image_extras={"image_grid_thw": grid_thw})
    n = (grid // visual.spatial_merge_size) ** 2
    # the resize rule of the processor, at a size it keeps as it is
    processor = SimpleNamespace(image_processor=SimpleNamespace(
        patch_size=visual.patch_size, merge_size=visual.spatial_merge_size,
        size={"shortest_edge": 4 * visual.patch_size ** 2, "longest_edge": 4 * shape.image_size ** 2}))
    assert qwen_processor.image_tokens_for(processor.image_processor, (shape.image_size, shape.image_size)) == n
    runs, refused = registered_methods(shape.family)
    runs = [m for m in runs if methods is None or m in methods]
    print(f"\n[{device}] every method, {shape.name}, batch {batch}, {str(dtype).replace('torch.', '')}", flush=True)
    per_method = measure_methods(model, posts, (shape.image_size, shape.image_size), n, device, text_tokens,
                                 repeats, runs, ratios, processor)
    return {
        "device": device, "family": shape.family, "shape_name": shape.name, "model_shape": asdict(shape),
        "batch": batch, "dtype": str(dtype).replace("torch.", ""), "text_tokens": text_tokens, "image_tokens": n,
        "refused": refused, "methods": per_method, "load_average_after": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------- batch 1, cheap to launch

COMPILE_SKIPPED_CPU = ("skipped: CUDA graphs (torch.compile mode='reduce-overhead') need a CUDA device; the "
                       "passes ran eagerly, which exercises the code path and measures nothing about CUDA graphs")


@contextmanager
def launch_cheap(model, device: str, compile_tower: bool):
    """For the duration, the language model's forward (and, ``compile_tower``, the vision tower's) is
    ``torch.compile(mode="reduce-overhead", dynamic=False)``: CUDA graphs, one per static shape. A keep ratio
    gives one prompt length (text + ``ceil(r N)`` + answers), so a served batch-1 request replays a captured
    graph instead of launching a kernel per operation. Yields what was done, for the results file; off CUDA
    nothing is compiled (the reason is yielded and printed)."""
    from sentilens.mllm.families import family_of

    family = family_of(model)
    modules = [family.language_model(model)] + ([family.vision_tower(model)] if compile_tower else [])
    if device != "cuda":
        print(f"  compiled path: {COMPILE_SKIPPED_CPU}", flush=True)
        yield COMPILE_SKIPPED_CPU
        return
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in modules:  # an instance attribute shadows the class's forward until it is deleted
        module.forward = torch.compile(module.forward, mode="reduce-overhead", dynamic=False)
    try:
        yield "torch.compile(mode='reduce-overhead', dynamic=False) on the language model" + (
            " and the vision tower" if compile_tower else "")
    finally:
        for module in modules:
            del module.forward


def measure_launch_cheap(model, posts: MllmBatch, size: tuple[int, int], n: int, device: str, text_tokens: int,
                         repeats: int, methods: list[str], ratios: tuple[float, ...], processor=None) -> dict:
    """:func:`measure_methods` at batch 1 with the passes cheap to launch (:func:`launch_cheap`): the tower is
    compiled for the methods that capture no attention (an attention capture hooks the tower's layers for the
    duration of one pass, which a captured graph would not see), the language model for every method but the
    LM-stage ones (their layer-K choice is Python between the layers)."""
    from sentilens.mllm.pruning import parse_strategy

    out = {}
    for method in methods:
        strategy = parse_strategy(method)
        if strategy.stage == "lm":
            out[method] = {"skipped": "LM-stage: the layer-K choice runs between the layers, outside one graph"}
            continue
        with launch_cheap(model, device, compile_tower=not strategy.scored) as how:
            try:
                entry = measure_methods(model, posts, size, n, device, text_tokens, repeats, [method], ratios,
                                        processor)[method]
            except Exception as error:  # noqa: BLE001 - a compiler failure is a result to record, not a crash
                entry = {"failed": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        entry["compiled"] = how
        out[method] = entry
    return out


LLAVA_7B = Shape(name="LLaVA-1.5-7B (CLIP ViT-L/14-336, 24 layers + Llama-2-7B)", vision_layers=24, lm_hidden=4096,
                 lm_layers=32, lm_heads=32, lm_kv_heads=32, lm_mlp=11008, vocab=32064)


def method_key(setting: dict) -> tuple:
    """What identifies an every-method setting in the results file (a new run replaces the same one)."""
    return setting["device"], setting["family"], setting["batch"], setting.get("launch", "eager")


def selection_shares(method_settings: list[dict]) -> dict[str, float]:
    """{method: its selection cost as a share of the released LLaVA-1.5 tower at N = 576}, from the CPU batch-1
    LLaVA setting (the ``selection_share_of_tower`` of each of its methods)."""
    for setting in method_settings:
        if (setting["device"], setting["family"], setting["batch"]) == ("cpu", "llava", 1):
            return {method: entry["selection_share_of_tower"] for method, entry in setting["methods"].items()
                    if "selection_share_of_tower" in entry}
    return {}


def gpu_methods(llava_shape: Shape, qwen_shape: QwenShape, device: str, dtype: torch.dtype, args,
                families: set[str], methods: list[str] | None, ratios: tuple[float, ...], batches: list[int],
                repeats: int) -> list[dict]:
    """The GPU part's every-method settings: LLaVA-1.5-7B and Qwen2.5-VL-7B at ``batches``, each method eagerly,
    and at batch 1 again cheap to launch (:func:`measure_launch_cheap`). With ``device`` cpu (the proxies'
    shapes, ``--gpu-code-on-cpu``) the same code runs eagerly and its numbers are printed, never written."""
    out = []
    for batch in batches:
        if "llava" in families:
            out.append(measure_llava_methods(llava_shape, batch, device, dtype, args.text_tokens, repeats, ratios,
                                             llava_shape.vision_layers, methods))
            report_methods(out[-1])
            free(device)
        if "qwen2.5-vl" in families:
            out.append(measure_qwen_methods(qwen_shape, batch, device, dtype, args.text_tokens, repeats, ratios,
                                            methods))
            free(device)
    if 1 in batches and "llava" in families:
        torch.manual_seed(0)
        llava = build_llava(llava_shape, dtype, device)
        size = llava_shape.image_size
        pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        image_id = llava.config.image_token_id
        ids = [1] + [100 + i for i in range(args.text_tokens // 2)] + [image_id] + [
            200 + i for i in range(args.text_tokens - 1 - args.text_tokens // 2)]
        posts = MllmBatch(token_ids=[ids], pixel_values=pixels, image_index=[0])
        runs, refused = registered_methods("llava")
        runs = [m for m in runs if methods is None or m in methods]
        print(f"\n[{device}] batch 1 cheap to launch, {llava_shape.name}", flush=True)
        cheap = measure_launch_cheap(llava, posts, (size, size), (size // llava_shape.patch_size) ** 2, device,
                                     args.text_tokens, repeats, runs, ratios)
        out.append({"device": device, "family": "llava", "shape_name": llava_shape.name,
                    "model_shape": asdict(llava_shape), "batch": 1, "launch": "cuda-graphs",
                    "dtype": str(dtype).replace("torch.", ""), "text_tokens": args.text_tokens,
                    "paper_speedup": PAPER_SPEEDUP, "refused": refused, "methods": cheap})
        llava = None
        free(device)
    return out


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


GPU_RUN = ("run: released architectures of the families measured (--families), random weights, bf16, batches "
           "--gpu-batches (LLaVA-1.5, Qwen) and --tiled-gpu-batches (LLaVA-NeXT, SmolVLM)")
GPU_NOT_RUN = ("not run: no CUDA device on the machine that wrote this file; the LLaVA-1.5-7B bf16 settings are "
               "absent, not estimated")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_passes(fns: dict, repeats: int, device: str) -> dict[object, list[float]]:
    """Wall times of each callable in ``repeats`` passes (after one warm-up pass); odd passes run in reverse order."""
    times: dict[object, list[float]] = {key: [] for key in fns}
    for rep in range(repeats + 1):
        for key in list(fns) if rep % 2 == 0 else list(reversed(fns)):
            synchronize(device)
            start = time.perf_counter()
            fns[key]()
            synchronize(device)
            if rep:  # pass 0 warms up
                times[key].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict, numerator: object, denominator: object) -> float:
    """Median over passes of ``time[numerator] / time[denominator]`` within the same pass.

    Both times of a pair are taken moments apart, so a slow spell of a shared machine hits them alike.
    """
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


def measure(shape: Shape, batch: int, device: str, dtype: torch.dtype, text_tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    llava = build_llava(shape, dtype, device)
    tower = llava.model.vision_tower
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, device=device, dtype=dtype)
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    scorer = TokenFilter(tower, 1.0, "all").scorer

    def scored():
        with scorer.capture():
            tower(pixels, output_hidden_states=True)

    def eager_maps():
        eager(pixels, output_hidden_states=True, output_attentions=True)

    with torch.no_grad():
        tower_times = timed_passes({"alone": lambda: tower(pixels, output_hidden_states=True), "scored": scored,
                                    "eager": eager_maps}, repeats, device)
    eager = None  # free the copy before the end-to-end timings

    image_id = llava.config.image_token_id
    ids = [1] + [100 + i for i in range(text_tokens // 2)] + [image_id] + [
        200 + i for i in range(text_tokens - 1 - text_tokens // 2)]
    posts = MllmBatch(token_ids=[ids] * batch, pixel_values=pixels, image_index=list(range(batch)))
    n = (shape.image_size // shape.patch_size) ** 2

    def predict(ratio: float):
        reducer = make_reducer(llava, ratio)
        return lambda: label_log_probs(llava, build_inputs(llava, posts, reducer, padding_side="left"), ANSWERS)

    with torch.no_grad():
        times = timed_passes({ratio: predict(ratio) for ratio in RATIOS}, repeats, device)
    answer_tokens = sum(len(a) for a in ANSWERS)

    def total(kept: int) -> float:  # the predictor's own FLOP count; the paper's filter scores every tower layer
        return prediction_flops(llava.config, kept, text_tokens, answer_tokens, shape.vision_layers)["total"]

    base_flops = total(n)
    rows = []
    for ratio in RATIOS:
        kept = keep_count(n, ratio)
        speedup = paired_ratio(times, 1.0, ratio)
        ideal = base_flops / total(kept)
        rows.append({"ratio": ratio, "kept_tokens": kept, "latency_ms_per_post": 1000 * min(times[ratio]) / batch,
                     "speedup": speedup, "ideal_speedup": ideal, "speedup_of_ideal": speedup / ideal,
                     "paper_speedup": PAPER_SPEEDUP[ratio]})
    return {
        "device": device, "model_shape": asdict(shape), "shape_name": shape.name, "batch": batch,
        "dtype": str(dtype).replace("torch.", ""), "text_tokens": text_tokens,
        "tower_ms": 1000 * min(tower_times["alone"]), "tower_scored_ms": 1000 * min(tower_times["scored"]),
        "tower_eager_attentions_ms": 1000 * min(tower_times["eager"]),
        "scoring_overhead": paired_ratio(tower_times, "scored", "alone"),
        "eager_attention_overhead": paired_ratio(tower_times, "eager", "alone"),
        "ratios": rows,
    }


def report(setting: dict) -> None:
    strategy = f", strategy {setting['strategy']}" if "strategy" in setting else ""
    print(f"\n[{setting['device']}] {setting['shape_name']}, batch {setting['batch']}, {setting['dtype']}{strategy}")
    eager = setting.get("eager_attention_overhead")
    print(f"  vision tower {setting['tower_ms']:.1f} ms; with scoring x{setting['scoring_overhead']:.3f} "
          f"(target <= 1.10)" + ("" if eager is None else f"; output_attentions=True route x{eager:.3f}"))
    print(f"  {'ratio':>6} {'kept':>5} {'ms/post':>9} {'speedup':>8} {'ideal':>7} {'of ideal':>9} {'paper':>6}")
    for row in setting["ratios"]:
        print(f"  {row['ratio']:>6g} {row['kept_tokens']:>5} {row['latency_ms_per_post']:>9.1f} {row['speedup']:>7.2f}x"
              f" {row['ideal_speedup']:>6.2f}x {row['speedup_of_ideal']:>9.2f} {row['paper_speedup']:>5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-layers", type=int, default=4, help="CPU proxy: tower layers (ViT-L has 24)")
    parser.add_argument("--lm-layers", type=int, default=4, help="CPU proxy: language model layers")
    parser.add_argument("--text-tokens", type=int, default=96, help="prompt tokens per post besides the image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: a shared machine's other jobs slow it evenly instead of stalling "
                             "multi-threaded kernels)")
    parser.add_argument("--cpu-batches", default="1,8")
    parser.add_argument("--gpu-batches", default="1,16")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="only the GPU part (on a lent GPU machine, whose CPU is not this project's 2-core one)")
    parser.add_argument("--families", default="llava,qwen2.5-vl,qwen3-vl,llava-next,smolvlm",
                        help="CPU settings to measure; the other families' settings already in --out are kept")
    parser.add_argument("--qwen-batches", default="1", help="batches of the Qwen CPU proxies")
    parser.add_argument("--tiled-batches", default="1", help="batches of the LLaVA-NeXT and SmolVLM CPU proxies")
    parser.add_argument("--tiled-gpu-batches", default="1,4",
                        help="batches of the LLaVA-NeXT-7B and SmolVLM2-2.2B GPU settings")
    parser.add_argument("--methods-families", default="llava",
                        help="every registered method on these families' CPU proxies (llava, qwen2.5-vl; '' for "
                             "none); on a GPU, on LLaVA-1.5-7B / Qwen2.5-VL-7B")
    parser.add_argument("--methods-batches", default="1", help="batches of the every-method CPU settings")
    parser.add_argument("--methods", default="", help="only these methods (comma-separated; default: every one)")
    parser.add_argument("--method-ratios", default=",".join(f"{r:g}" for r in METHOD_RATIOS))
    parser.add_argument("--full-tower-layers", type=int, default=24,
                        help="layers of the CLIP ViT-L/14-336 tower the selection costs are a share of (24: the "
                             "released one; 0: the proxy's only)")
    parser.add_argument("--gpu-code-on-cpu", action="store_true",
                        help="run the GPU part's code (every method, the compiled batch-1 path) on the CPU proxies "
                             "with one repeat, print it and write nothing: a check that the GPU script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "token_filtering.json")
    args = parser.parse_args()
    families = {name.strip() for name in args.families.split(",") if name.strip()}
    os.environ.setdefault("SENTILENS_QUIET", "1")
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    settings = []
    proxy = Shape(name=f"CLIP ViT-L/14-336 shape ({args.vision_layers} of 24 layers) + Llama-style LM "
                       f"(1024 wide, {args.lm_layers} layers)", vision_layers=args.vision_layers, lm_hidden=1024,
                  lm_layers=args.lm_layers, lm_heads=16, lm_kv_heads=16, lm_mlp=2816, vocab=32064)
    cpu = not args.skip_cpu
    for batch in (int(b) for b in args.cpu_batches.split(",")) if cpu and "llava" in families else ():
        settings.append({"family": "llava", **measure(proxy, batch, "cpu", torch.float32, args.text_tokens,
                                                      args.repeats)})
        settings[-1]["load_average_after"] = list(os.getloadavg())
        report(settings[-1])
    for shape, strategy in qwen_proxies(args.vision_layers, args.lm_layers) if cpu else ():
        for batch in (int(b) for b in args.qwen_batches.split(",")) if shape.family in families else ():
            settings.append(measure_qwen(shape, batch, "cpu", torch.float32, args.text_tokens, args.repeats,
                                         strategy))
            settings[-1]["load_average_after"] = list(os.getloadavg())
            report(settings[-1])
    for shape in tiled_proxies(args.vision_layers, args.lm_layers) if cpu else ():
        for batch in (int(b) for b in args.tiled_batches.split(",")) if shape.family in families else ():
            settings.append(measure_tiled(shape, batch, "cpu", torch.float32, args.text_tokens, args.repeats))
            settings[-1]["load_average_after"] = list(os.getloadavg())
            report(settings[-1])
    method_families = {name.strip() for name in args.methods_families.split(",") if name.strip()}
    methods = [name.strip() for name in args.methods.split(",") if name.strip()] or None
    ratios = tuple(float(r) for r in args.method_ratios.split(","))
    if ratios[0] != 1.0:
        raise SystemExit("--method-ratios: the first ratio must be 1 (every speedup is against it)")
    method_settings = []
    if args.gpu_code_on_cpu:
        gpu_methods(proxy, qwen_proxies(args.vision_layers, args.lm_layers)[0][0], "cpu", torch.float32, args,
                    method_families, methods, ratios, [1], repeats=1)
        print("\n--gpu-code-on-cpu: the GPU part's code ran on the CPU proxies; nothing was written")
        return
    for batch in (int(b) for b in args.methods_batches.split(",")) if cpu else ():
        if "llava" in method_families:
            method_settings.append(measure_llava_methods(proxy, batch, "cpu", torch.float32, args.text_tokens,
                                                         args.repeats, ratios, args.full_tower_layers or None,
                                                         methods))
            report_methods(method_settings[-1])
        if "qwen2.5-vl" in method_families:
            q25 = qwen_proxies(args.vision_layers, args.lm_layers)[0][0]
            method_settings.append(measure_qwen_methods(q25, batch, "cpu", torch.float32, args.text_tokens,
                                                        args.repeats, ratios, methods))
    if torch.cuda.is_available():
        llava7b = LLAVA_7B
        for batch in (int(b) for b in args.gpu_batches.split(",")) if "llava" in families else ():
            settings.append(measure(llava7b, batch, "cuda", torch.bfloat16, args.text_tokens, args.repeats))
            report(settings[-1])
        for shape, strategy in qwen_real_size():
            for batch in (int(b) for b in args.gpu_batches.split(",")) if shape.family in families else ():
                settings.append(measure_qwen(shape, batch, "cuda", torch.bfloat16, args.text_tokens, args.repeats,
                                             strategy))
                report(settings[-1])
                torch.cuda.empty_cache()
        for shape in tiled_real_size():
            for batch in (int(b) for b in args.tiled_gpu_batches.split(",")) if shape.family in families else ():
                settings.append(measure_tiled(shape, batch, "cuda", torch.bfloat16, args.text_tokens, args.repeats))
                report(settings[-1])
                torch.cuda.empty_cache()
        method_settings += gpu_methods(LLAVA_7B, qwen_real_size()[0][0], "cuda", torch.bfloat16, args,
                                       method_families, methods, ratios,
                                       [int(b) for b in args.gpu_batches.split(",")], args.repeats)
        gpu = torch.cuda.get_device_name()
    else:
        gpu = None
        print("\nno CUDA device here: the LLaVA-1.5-7B (bf16, batch 1 and 16) part was skipped")
    measured = {(s["device"], s.get("family", "llava")) for s in settings}
    if args.out.is_file():  # keep the settings (device, family) not measured now, e.g. --families qwen2.5-vl
        earlier = json.loads(args.out.read_text())["settings"]
        settings = [s for s in earlier if (s["device"], s.get("family", "llava")) not in measured
                    and (s["device"] == "cpu" or gpu)] + settings
    measured_methods = {method_key(s) for s in method_settings}
    earlier_methods = json.loads(args.out.read_text()).get("method_settings", []) if args.out.is_file() else []
    method_settings = [s for s in earlier_methods if method_key(s) not in measured_methods
                       and (s["device"] == "cpu" or gpu)] + method_settings
    write_json(args.out, {
        "machine": {"cpu": cpu_name(), "cpu_threads": torch.get_num_threads(), "gpu": gpu,
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": list(os.getloadavg())},
        "gpu_part": GPU_RUN if gpu else GPU_NOT_RUN,
        "targets": {"scoring_overhead_max": 1.10, "speedup_of_ideal_min": 0.85},
        "repeats": args.repeats, "settings": settings,
        "method_targets": {"speedup_of_ideal_min": 0.85, "selection_share_of_tower_max": 0.10,
                           "applies_to": "vision-stage methods; LM-stage methods report their FLOP-ideal"},
        "method_settings": method_settings,
        "selection_share_of_tower": selection_shares(method_settings),
    })
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
