"""The language model's input, built from per-image visual features: the one place training,
label scoring, generation and token filtering assemble a LLaVA input.

LLaVA-1.5 (and the paper's Figure 2) turns an image into visual tokens in three steps, which
are done here one by one instead of inside ``LlavaForConditionalGeneration.forward`` so that a
*reducer* can sit between them:

1. :func:`sentilens.mllm.families.llava.vision.encode_images`: the frozen vision tower's hidden state at
   ``config.vision_feature_layer``
   (-2 for LLaVA-1.5), CLS dropped under the "default" selection strategy: ``(B, N, Dv)``;
2. a reducer ``reduce(features, pixel_values) -> list[(k_i, Dv)]`` keeps some rows per image
   (the paper's CLS-attention token filtering, :mod:`sentilens.mllm.pruning`); none = all N rows;
3. the multimodal projector maps each kept set to the language model's width.

:func:`assemble` then writes each post's sequence with its image placeholder repeated exactly
``k_i`` times (``k_i`` may differ inside a batch), pads it (right for training, left for
scoring and generation), and scatters the projected rows into the placeholder embeddings.
With no reducer this reproduces the logits of HF's ``model(input_ids, pixel_values=...,
attention_mask=...)`` (tested to 1e-5).

Images reach the tower in one of two ways (``image_aspect``, saved with the run's prompt settings):
``pad`` (LLaVA-1.5's ``image_aspect_ratio=pad``, how its checkpoints were trained and evaluated)
first pads the image to a square with the processor's mean colour, centred as LLaVA's
``expand2square`` does, so the processor's resize keeps every edge and its centre crop cuts
nothing; ``crop`` hands the image to the processor as it is (resize the short side, centre crop),
which cuts the long side of a non-square image. Padding is done here, on the decoded image,
not in the loader: the loader gives the image as it is and every consumer decides how to fit it.

A reducer may also have ``capture()``, a context manager entered around the vision
tower's forward pass, so it can record what it needs (the CLS query and keys of every layer)
from the very pass that produces the features, instead of running the tower twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sentilens.mllm.families import ModelFamily, family_of, get_family
from sentilens.stages import stage

ImageAspect = Literal["pad", "crop"]

Reducer = Callable[[Tensor, Tensor], list[Tensor]]
"""``reduce(features (B, N, Dv), pixel_values (B, 3, H, W)) -> [kept rows (k_i, Dv) for each image]``."""


@dataclass
class MllmBatch:
    """Posts ready for the model: token ids with at most one image placeholder each.

    ``image_index[i]`` is the row of post ``i`` in ``pixel_values``, or None for a text-only
    post; ``targets`` (training only) align with ``token_ids`` and hold -100 where no loss is taken.
    ``image_extras``: the other tensors the model family's tower needs beside the pixels (LLaVA-NeXT's
    ``image_sizes``...), from its :meth:`~sentilens.mllm.families.ModelFamily.image_inputs`.
    """

    token_ids: list[list[int]]
    pixel_values: Tensor | None
    image_index: list[int | None]
    targets: list[list[int]] | None = None
    image_extras: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, **_) -> MllmBatch:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device)
        extras = {name: value.to(device) for name, value in self.image_extras.items()}
        return MllmBatch(self.token_ids, pixels, self.image_index, self.targets, extras)


@dataclass
class LmInputs:
    """A padded batch for the language model; ``image_tokens[i]`` visual tokens sit in post ``i``.

    ``position_ids`` is ``(B, L)``, or ``(3, B, L)`` for a family with 3-D rotary positions (Qwen-VL);
    ``lm_kwargs`` holds any other input the family's language model takes (Qwen3-VL's deepstack features
    and where the visual tokens sit), passed along with every forward on these inputs.
    """

    input_ids: Tensor
    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    targets: Tensor | None
    image_tokens: list[int]
    lm_kwargs: dict = field(default_factory=dict)
    lm_plan: Any = None
    """An LM-stage strategy's :class:`~sentilens.mllm.pruning.LmPlan` for this batch (None: the visual tokens
    the vision stage kept reach every layer)."""


def assemble(
    vlm,
    token_ids: Sequence[Sequence[int]],
    visual: Sequence[Tensor | None],
    targets: Sequence[Sequence[int]] | None = None,
    padding_side: str = "right",
    native: Sequence[tuple[Tensor, int] | None] | None = None,
) -> LmInputs:
    """Pad the posts into one batch, each image placeholder widened to its post's visual tokens.

    Positions count real tokens (0 at each post's first token, whatever the padding), so a post
    gets the same positions alone and in a batch. ``native`` (``+native`` filtering): per post
    ``(patch_indices, span)``, the ``(k,)`` patch indices its visual tokens stand for among the
    image's ``span`` patches; each visual token then sits at the image's first position plus its
    patch index and the text after the image ``span`` positions after that first one, as at r = 1.
    """
    config = vlm.config
    image_id = config.image_token_id
    pad_id = config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    rows, target_rows = [], []
    for i, ids in enumerate(token_ids):
        ids = list(ids)
        tgt = list(targets[i]) if targets is not None else None
        count = ids.count(image_id)
        k = 0 if visual[i] is None else visual[i].shape[0]
        if count != (visual[i] is not None):
            raise ValueError(f"post {i} has {count} image placeholders but {'an' if k else 'no'} image")
        if count:
            at = ids.index(image_id)
            ids = ids[:at] + [image_id] * k + ids[at + 1:]
            if tgt is not None:
                tgt = tgt[:at] + [-100] * k + tgt[at + 1:]
        rows.append(ids)
        target_rows.append(tgt)
    width = max(len(r) for r in rows)
    device = vlm.lm_head.weight.device
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tgt_tensor = torch.full((len(rows), width), -100, dtype=torch.long) if targets is not None else None
    for i, ids in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids)
        mask[i, span] = 1
        if tgt_tensor is not None:
            tgt_tensor[i, span] = torch.tensor(target_rows[i])
    # real tokens count from 0 at each post's first token; right padding goes on counting (as HF's default
    # positions do: the language model's outputs on real tokens were seen to move by ~1e-3 when padding
    # positions repeat), left padding sits at 0
    first = mask.argmax(dim=1, keepdim=True)
    positions = (torch.arange(width)[None, :] - first).clamp(min=0)
    for i, ids in enumerate(rows):
        if native is None or native[i] is None:
            continue
        patch_indices, span = native[i]
        k = len(patch_indices)
        own = torch.arange(len(ids))  # this post's positions, counted as the paragraph above counts them
        at = ids.index(image_id)
        own[at:at + k] = at + patch_indices.to("cpu", torch.long)
        own[at + k:] += span - k
        start = 0 if padding_side == "right" else width - len(ids)
        positions[i, start:start + len(ids)] = own
        if padding_side == "right":  # right padding goes on counting from the last real position
            positions[i, start + len(ids):] = own[-1] + 1 + torch.arange(width - start - len(ids))
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    embeds = vlm.get_input_embeddings()(input_ids)
    kept = [v for v in visual if v is not None]
    if kept:
        features = torch.cat(kept).to(device=embeds.device, dtype=embeds.dtype)
        slots = (input_ids == image_id) & mask.bool()
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), features)
    return LmInputs(
        input_ids=input_ids,
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        targets=None if tgt_tensor is None else tgt_tensor.to(device),
        image_tokens=[0 if v is None else v.shape[0] for v in visual],
    )


def give_text(reducer, vlm, batch: MllmBatch) -> None:
    """Hand a reducer that reads the prompt's text (``texts``: ``cdpruner``) each image's prompt tokens after the
    image placeholder, by image row; a training batch's answer tokens are left out (they are the label)."""
    if getattr(reducer, "texts", False) is False or "text_tokens" not in reducer.strategy.needs:
        return
    image_id = vlm.config.image_token_id
    texts = {}
    for i, (ids, row) in enumerate(zip(batch.token_ids, batch.image_index, strict=True)):
        if row is None:
            continue
        after = range(ids.index(image_id) + 1, len(ids))
        prompt = [ids[p] for p in after if batch.targets is None or batch.targets[i][p] == -100]
        texts[row] = torch.tensor(prompt, dtype=torch.long)
    reducer.texts = texts


def build_inputs(vlm, batch: MllmBatch, reducer: Reducer | None = None, padding_side: str = "right") -> LmInputs:
    """Encode, reduce and project the batch's images, then assemble the language model input
    (both by the model's family: :func:`~sentilens.mllm.families.llava.vision.visual_tokens` and
    :func:`assemble` for LLaVA-1.5)."""
    family = family_of(vlm)
    lm_stage = reducer if getattr(reducer, "stage", "vision") == "lm" else None
    if lm_stage is not None:  # every visual token passes the vision stage; the language model drops some
        reducer = None
    visual: list[Tensor | None] = [None] * len(batch.token_ids)
    native: list[tuple[Tensor, int] | None] = [None] * len(batch.token_ids)
    native_positions = batch.pixel_values is not None and getattr(reducer, "native_positions", False)
    if batch.pixel_values is not None:
        give_text(reducer, vlm, batch)
        with stage("vision"):
            tokens = family.visual_tokens(vlm, batch.pixel_values, batch.image_extras, reducer)
        for i, row in enumerate(batch.image_index):
            if row is not None:
                visual[i] = tokens[row]
                if native_positions:  # the filter's selection for this image: kept patches among all its patches
                    selection = reducer.last[row]
                    native[i] = (selection.kept, selection.scores.shape[0])
    # only LLaVA-1.5's filter offers +native (the other families refuse it when their filter is built)
    extra = {"native": native} if native_positions else {}
    built = family.assemble(vlm, batch.token_ids, visual, batch.targets, padding_side, extras=batch.image_extras,
                            **extra)
    if lm_stage is not None:
        built.lm_plan = lm_stage.plan(built.input_ids, built.attention_mask)
        built.image_tokens = list(built.lm_plan.budget)  # what the layers after the scoring layer see
    return built


def language_model_hidden(vlm, inputs: LmInputs, attention_mask: Tensor | None = None, **kwargs):
    """Run the language model on assembled inputs; returns its output (``last_hidden_state``, cache). Under an
    LM-stage plan, its layers drop the visual tokens it names (:mod:`sentilens.mllm.pruning.lm_stage`)."""
    from sentilens.mllm.pruning.lm_stage import lm_stage

    family = family_of(vlm)
    with lm_stage(family.language_model(vlm), inputs.lm_plan):
        return family.language_model_hidden(
            vlm,
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask if attention_mask is None else attention_mask,
            position_ids=inputs.position_ids,
            **inputs.lm_kwargs,
            **kwargs,
        )


def denormalised(pixels: Tensor, image_processor) -> Tensor:
    """``pixels`` (``(..., C, H, W)``, normalised by ``image_processor``) back in [0, 1]: float32, on the CPU."""
    mean = torch.tensor(image_processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(-1, 1, 1)
    return (pixels.float().cpu() * std + mean).clamp(0, 1)


def pad_colour(image_processor) -> tuple[int, int, int]:
    """The processor's image mean as an RGB colour (LLaVA-1.5 pads with it: it normalises to zero)."""
    return tuple(int(channel * 255) for channel in image_processor.image_mean)


def pad_to_square(image, colour: tuple[int, int, int]):
    """The image centred on a square of its long side, filled with ``colour`` (LLaVA's ``expand2square``)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def content_box(size: tuple[int, int], aspect: ImageAspect, view: int) -> tuple[float, float, float, float]:
    """Where the original image lies in the tower's ``view x view`` input: ``(x0, y0, x1, y1)`` in pixels.

    With ``pad`` the rest is padding; with ``crop`` the box is the whole view (the crop cut the rest).
    """
    width, height = size
    if aspect == "crop" or width == height:
        return (0.0, 0.0, float(view), float(view))
    scale = view / max(width, height)
    x0, y0 = (max(width, height) - width) // 2 * scale, (max(width, height) - height) // 2 * scale
    return (x0, y0, x0 + width * scale, y0 + height * scale)


def pixel_values(image_processor, images: Sequence, aspect: ImageAspect) -> Tensor:
    """``(B, 3, H, W)`` tower input of decoded RGB images, fitted by ``aspect`` (pad or crop)."""
    if aspect not in ("pad", "crop"):
        raise ValueError(f"image_aspect must be 'pad' or 'crop', got {aspect!r}")
    if aspect == "pad":
        colour = pad_colour(image_processor)
        images = [pad_to_square(image, colour) for image in images]
    return image_processor(list(images), return_tensors="pt")["pixel_values"]


def make_batch(builder, posts: Sequence, with_targets: bool = False) -> MllmBatch:
    """Posts to a batch: prompts (and for training, prompt + answer with targets) and preprocessed images.

    Images go through the one safe loader (:func:`sentilens.data.images.load_image`), are fitted
    by the prompt settings' ``image_aspect`` (:func:`pixel_values`) and go through the checkpoint's
    own image processor.
    """
    from sentilens.data.images import load_image

    token_ids, targets, images, index = [], [], [], []
    for post in posts:
        has_image = post.image is not None
        if with_targets:
            ids, tgt = builder.training_ids(post.text, has_image, post.label)
            targets.append(tgt)
        else:
            ids = builder.prompt_ids(post.text, has_image)
        token_ids.append(ids)
        index.append(len(images) if has_image else None)
        if has_image:
            images.append(load_image(post.image))
    pixels, extras = image_inputs(builder, images) if images else (None, {})
    return MllmBatch(token_ids, pixels, index, targets if with_targets else None, extras)


def image_inputs(builder, images: Sequence) -> tuple[Tensor, dict[str, Tensor]]:
    """Pixel values (and the family's other image tensors) of PIL images, by the model family's own
    preprocessing (:meth:`~sentilens.mllm.families.ModelFamily.image_inputs`; LLaVA-1.5: :func:`pixel_values`)."""
    family: ModelFamily = getattr(builder, "family", None) or get_family("llava")
    return family.image_inputs(builder.processor, images, builder.settings.image_aspect)


def preprocess_images(builder, images: Sequence) -> Tensor:
    """The pixel values of :func:`image_inputs` (LLaVA-1.5: ``(B, 3, S, S)``, fitted by ``image_aspect``)."""
    return image_inputs(builder, images)[0]
