"""Pretraining the tiny LLaVA's vision tower, so that it is frozen *pretrained*, as in LLaVA.

LLaVA-1.5 freezes CLIP ViT-L/14-336, which was pretrained (contrastively, on 400 M image-text
pairs) before LLaVA ever saw it; the paper's filter relies on that tower's CLS token looking at
what matters in an image. A random tower's CLS attention is nearly uniform, so a filter built
on it drops the cue as readily as the background. No pretrained CLIP can be downloaded here, so
``--model tiny`` first pretrains its own tower:

- Data: a corpus of synthetic images drawn by :func:`sentilens.data.synth.synth_image` (the
  demo set's generator: a local scene on an uninformative backdrop), from seeds of their own, so
  the corpus shares no image with any data set a run is fine-tuned or evaluated on (as CLIP's
  web data is not MVSA). Sentiments cycle positive / neutral / negative; the last ``held_out``
  images are kept out of training to report the tower's accuracy.
- Objective: supervised on a scene attribute, the scene class each image shows (sunny sky,
  smiling face, storm, frowning face, everyday objects: :data:`SCENE_CLASSES`), read by a linear
  head from the tower's pooled CLS output (CLIP's post-layernorm CLS state, the one CLIP's own
  projection reads). Our choice over CLIP's contrastive loss: the synthetic captions would be a
  handful of distinct strings, so contrastive batches would be full of false negatives, while the
  classes carry the same information. Plus, weighted by ``patch_loss_weight``, a per-patch term:
  each patch of the layer LLaVA reads (``vision_feature_layer``, the second-to-last) is classified
  by a second linear head as the scene class of the cue box when at least half of the patch lies
  in it, else as background. CLIP's patch states are readable by LLaVA because 400 M captions
  describe what is *in* the image; a CLS-only loss on 2,000 drawn images leaves them barely
  linearly separable (a probe on the in-box patches: 0.77-0.81, 0.85 with the term, measured on
  300 held-out images), and the held-out scene accuracy rises from 0.88 to 0.95 with it. Both heads
  are thrown away; the tower alone is kept.
- Optimisation: AdamW (weight decay 0.05), linear warm-up over 5 % of the steps then cosine decay,
  gradient clipping at 1.0, seeded order. Pixels go through the tiny checkpoint's own image
  processor (resize, crop, CLIP mean and std), exactly as at fine-tuning and inference.

The tower is saved with ``save_pretrained`` (a ``CLIPVisionModel``, safetensors) and a
``pretraining.json`` (recipe, held-out accuracy, time) into ``CACHE/<key>``, where the key hashes
the tower's shape, the recipe and :data:`CORPUS_VERSION`; a later run with the same key loads it
instead of training again. :func:`sentilens.mllm.families.llava.tiny.build_tiny` copies it into the LLaVA it
builds, and fine-tuning keeps it frozen (``requires_grad`` off, eval mode).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sentilens.cache import cache_root
from sentilens.data.synth import CUE_BOX_SIDE, LABELS, SCENE_CLASSES, check_cue_side, scene_class, synth_image
from sentilens.mllm.model import TINY_FEATURE_LAYER as FEATURE_LAYER
from sentilens.mllm.model import TinySpec, tiny_image_processor, tiny_vision_config
from sentilens.progress import console, progress_bar
from sentilens.runs import write_json

CORPUS_VERSION = 1
"""Bump when the generator draws other images: towers cached under the old key are then not reused."""

CORPUS_SEED = 1 << 40
"""Corpus image ``i`` has seed ``CORPUS_SEED * (recipe.seed + 1) + i``; data sets use ``seed * 1_000_003 + i``."""

REPORT = "pretraining.json"


class TowerRecipe(BaseModel):
    """How the tiny tower is pretrained (the cache key includes every field)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Bounded: the corpus is drawn and held in memory whole before pretraining (1e9 images ran away).
    images: int = Field(2000, gt=0, le=50_000, description="training images of the corpus")
    held_out: int = Field(300, ge=0, le=10_000, description="corpus images kept out of training, for the accuracy")
    frame_size: int = Field(128, ge=32, le=1024, description="side of the generated images before preprocessing")
    cue_side: tuple[float, float] = Field(CUE_BOX_SIDE, description="the cue box's side range, as a fraction of "
                                                                    "the frame's (the data's own: synth cue_side)")
    epochs: int = Field(6, gt=0, le=10_000)
    patch_loss_weight: float = Field(1.0, ge=0, description="weight of the per-patch cue-class term (0: CLS only)")
    batch_size: int = Field(64, gt=0, le=4096)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    seed: int = 0


def default_tower_cache() -> Path:
    """``towers`` under :func:`sentilens.cache.cache_root`."""
    return cache_root() / "towers"


def tower_key(spec: TinySpec, recipe: TowerRecipe) -> str:
    """What the pretrained tower depends on: its shape, its recipe and the corpus generator's version."""
    shape = {k: getattr(spec, k) for k in ("image_size", "patch_size", "vision_hidden", "vision_layers",
                                           "vision_heads")}
    blob = json.dumps({"version": CORPUS_VERSION, "shape": shape, "recipe": recipe.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrained_tower(spec: TinySpec, recipe: TowerRecipe | None = None, cache: str | Path | None = None) -> Path:
    """The folder of the pretrained tower for ``spec``: from the cache, else pretrained now and cached.

    A folder counts as cached once its ``pretraining.json`` exists (written last, and the folder
    is moved into place whole), so an interrupted pretraining is never reused.
    """
    recipe = recipe or TowerRecipe()
    root = Path(cache) if cache is not None else default_tower_cache()
    folder = root / tower_key(spec, recipe)
    if (folder / REPORT).is_file():
        console.print(f"pretrained vision tower reused from {folder}")
        return folder
    tower, report = pretrain_tower(spec, recipe)
    partial = root / f"{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    tower.save_pretrained(partial)
    write_json(partial / REPORT, {**report, "key": folder.name})
    if (folder / REPORT).is_file():  # another process cached the same tower meanwhile
        shutil.rmtree(partial)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    return folder


BACKGROUND = len(SCENE_CLASSES)
"""The per-patch target of a patch outside the cue box (the scene classes are ``0 .. BACKGROUND - 1``)."""


def patch_targets(spec: TinySpec, frame_size: int, box: list[int], scene: int) -> torch.Tensor:
    """``(P,)`` per-patch targets in row-major patch order: ``scene`` where at least half the patch lies in
    the cue box (``box`` in frame pixels, scaled to the tower's input: the corpus frames are square, so
    the processor's resize is a plain scale and its centre crop keeps everything), else :data:`BACKGROUND`."""
    scale = spec.image_size / frame_size
    x0, y0, x1, y1 = (v * scale for v in box)
    side = spec.image_size // spec.patch_size
    edges = torch.arange(side + 1, dtype=torch.float64) * spec.patch_size
    overlap_x = (torch.minimum(edges[1:], torch.tensor(x1)) - torch.maximum(edges[:-1], torch.tensor(x0))).clamp(min=0)
    overlap_y = (torch.minimum(edges[1:], torch.tensor(y1)) - torch.maximum(edges[:-1], torch.tensor(y0))).clamp(min=0)
    inside = (overlap_y[:, None] * overlap_x[None, :] / spec.patch_size ** 2) >= 0.5
    return torch.where(inside.flatten(), scene, BACKGROUND)


def corpus_pixels(spec: TinySpec, recipe: TowerRecipe, count: int,
                  offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` corpus images from index ``offset``: uint8 pixels ``(n, 3, S, S)`` after the tiny
    processor's resize and crop (not yet normalised), their scene-class indices ``(n,)`` and their
    per-patch targets ``(n, P)`` (:func:`patch_targets`)."""
    if recipe.frame_size < spec.image_size:
        raise ValueError(f"corpus frames ({recipe.frame_size} px) are smaller than the tower's input "
                         f"({spec.image_size} px)")
    cue_side = check_cue_side(recipe.cue_side)
    processor = tiny_image_processor(spec)
    pixels, targets, patches = [], [], []
    for start in range(offset, offset + count, 256):
        images = []
        for i in range(start, min(offset + count, start + 256)):
            image, scene, box, _ = synth_image(LABELS[i % len(LABELS)], recipe.frame_size,
                                               CORPUS_SEED * (recipe.seed + 1) + i, cue_side)
            images.append(image)
            targets.append(SCENE_CLASSES.index(scene_class(scene)))
            patches.append(patch_targets(spec, recipe.frame_size, box, targets[-1]))
        unit = processor(images, do_normalize=False, return_tensors="pt")["pixel_values"]
        pixels.append(torch.round(unit * 255).clamp(0, 255).to(torch.uint8))
    return torch.cat(pixels), torch.tensor(targets), torch.stack(patches)


def pretrain_tower(spec: TinySpec, recipe: TowerRecipe):
    """Train a ``CLIPVisionModel`` of the spec's shape on the scene classes; returns (tower, report)."""
    from transformers import CLIPVisionModel, get_cosine_schedule_with_warmup

    started, cpu_started = time.perf_counter(), time.process_time()
    processor = tiny_image_processor(spec)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    def normalise(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255 - mean) / std

    console.print(f"pretraining the tiny vision tower on {recipe.images} synthetic images "
                  f"({recipe.epochs} epochs; cached for later runs)")
    train_x, train_y, train_patches = corpus_pixels(spec, recipe, recipe.images)
    held_x, held_y, _ = corpus_pixels(spec, recipe, recipe.held_out, offset=recipe.images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        tower = CLIPVisionModel(tiny_vision_config(spec))
        head = torch.nn.Linear(spec.vision_hidden, len(SCENE_CLASSES))
        patch_head = torch.nn.Linear(spec.vision_hidden, len(SCENE_CLASSES) + 1)
    params = [*tower.parameters(), *head.parameters(), *patch_head.parameters()]
    dense = recipe.patch_loss_weight > 0
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(recipe.images / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(recipe.warmup_ratio * total_steps), total_steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    history = []
    tower.train()
    with progress_bar() as progress:
        for epoch in range(recipe.epochs):
            task = progress.add_task(f"tower epoch {epoch + 1}/{recipe.epochs}", total=recipe.images, unit="images",
                                     status="")
            order = torch.randperm(recipe.images, generator=generator)
            total = 0.0
            for start in range(0, recipe.images, recipe.batch_size):
                index = order[start:start + recipe.batch_size]
                out = tower(normalise(train_x[index]), output_hidden_states=dense)
                loss = torch.nn.functional.cross_entropy(head(out.pooler_output), train_y[index])
                if dense:  # the layer LLaVA reads (vision_feature_layer = -2), CLS dropped as LLaVA drops it
                    patch_logits = patch_head(out.hidden_states[FEATURE_LAYER][:, 1:])
                    loss = loss + recipe.patch_loss_weight * torch.nn.functional.cross_entropy(
                        patch_logits.flatten(0, 1), train_patches[index].flatten())
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(index)
                progress.update(task, advance=len(index), status=f"loss {total / (start + len(index)):.4f}")
            history.append({"epoch": epoch + 1, "train_loss": total / recipe.images})
    tower.eval()
    accuracy = None
    if recipe.held_out:
        with torch.no_grad():
            predicted = torch.cat([head(tower(normalise(held_x[i:i + 256])).pooler_output).argmax(-1)
                                   for i in range(0, len(held_x), 256)])
        accuracy = float((predicted == held_y).float().mean())
    counts = np.bincount(train_y.numpy(), minlength=len(SCENE_CLASSES))
    report = {
        "objective": "scene classification from the pooled CLS state (linear head, cross-entropy)"
                     + (f" + {recipe.patch_loss_weight:g} x per-patch cue class at hidden state {FEATURE_LAYER}"
                        if dense else ""),
        "classes": list(SCENE_CLASSES),
        "class_counts": dict(zip(SCENE_CLASSES, counts.tolist(), strict=True)),
        "recipe": recipe.model_dump(),
        "corpus_version": CORPUS_VERSION,
        "held_out_accuracy": accuracy,
        "history": history,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }
    console.print(f"vision tower pretrained: held-out scene accuracy "
                  f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} ({report['seconds']:.0f} s)")
    return tower, report
