"""Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``):
building the language model's input, with visual-token filtering, and the tiny random models.

How these models see an image (read from transformers' ``modeling_qwen2_5_vl`` / ``modeling_qwen3_vl``):

- Native resolution: the image processor resizes an image to a multiple of ``patch * merge`` pixels
  (within ``min_pixels``/``max_pixels``) and flattens it into ``H x W`` patches; ``grid_thw`` says
  ``(1, H, W)`` per image. The patches of all images of a batch run through the tower as one packed
  sequence; ``cu_seqlens`` keeps each image's attention to itself.
- 2x2 patch merging: the patches arrive grouped by merge block (4 consecutive patches form one
  block), and the merger maps each block to one language-model token: an image is
  ``N = (H/2) * (W/2)`` visual tokens. There is no CLS token.
- 3-D rotary positions (M-RoPE) in the language model: the image's token ``(h, w)`` gets position
  ``(s, s + h, s + w)`` (temporal, height, width) where ``s`` is the position after the text before
  it, and the text after the image continues at ``s + max(H/2, W/2)``, not ``s + N``.
- Qwen2.5-VL's tower attends inside 112-px windows in most layers (``fullatt_block_indexes`` name the
  few full-attention layers); it reorders the patches window by window for this and puts the merged
  tokens back in raster order at the end.
- Qwen3-VL's tower attends over the whole image in every layer, and also sends "deepstack" features:
  the hidden states after a few intermediate layers (``deepstack_visual_indexes``), merged by their
  own mergers, are added to the language model's hidden states at the visual positions after its
  first decoder layers.

Steps, one by one (as :mod:`sentilens.mllm.inputs` does for LLaVA) so a filter can sit between them:

1. :func:`encode_images` runs the frozen tower with its mergers switched for a recorder (so they run
   once, later, on the kept tokens only) and returns each image's pre-merger hidden states,
   ``(N, 4, Dv)`` per image in raster order (and for Qwen3-VL the same for each deepstack layer);
2. a :class:`QwenTokenFilter` picks the ``ceil(r * N)`` tokens to keep (none: all ``N``);
3. the mergers (the projector; trained in fine-tuning as LLaVA's projector is) map the kept blocks
   to language-model tokens, main and deepstack features alike;
4. :func:`assemble` widens each post's single image placeholder to its kept tokens and gives every
   token its 3-D position.

The filtering rules, and why:

- **Score of a merged token.** With no CLS token, a patch is scored by the attention it *receives*:
  ``mean_i softmax(q_i K^T / sqrt(d))_j`` over the image's queries ``i`` and the heads, then averaged
  over the scored layers. A scored layer computes its attention itself, a block of queries at a time,
  from the tower's own rotated queries and keys, and sums each softmax block's columns on the way (the
  output is the same attention; no map is held whole or computed twice); the other layers keep the
  tower's kernel (SDPA). A merged token stands for its 2x2 block, so its score is the mean
  of its four patches' scores: the language model receives the block as one token, so the block is
  kept or dropped as a whole.
- **Which layers (Qwen2.5-VL): full-attention layers only.** In a windowed layer a query spreads its
  attention over its own window, so every window receives the same total attention per query
  whatever it shows: such a layer only ranks patches against their window neighbours, and averaging
  it in would pull the image-wide ranking toward "a few tokens from every window", including windows
  of plain background. The full-attention layers compare every patch with every other. The default
  (``all``) averages every full-attention layer (4 of 32 in the released towers); ``feature``/``last``
  take the last layer (whose output the merger reads, a full-attention layer in the released models); a
  layer or slice that names only windowed layers is refused.
- **Which layers (Qwen3-VL): ``all``: every layer** (each attends over the whole image), as the paper
  averages all CLS rows. ``feature``: the layers whose outputs reach the language model, the deepstack
  layers and the last (4 of 27 in the released towers), as FasterVLM scores LLaVA's feature layer;
  ``last``: the last one. The cost differs: unlike a CLS row, received attention needs the whole
  ``T x T`` map of a scored layer, so a scored layer trades the tower's fused attention kernel for the
  block-by-block computation above; scoring all 27 layers costs more than scoring 4
  (``benchmarks/token_filtering.py`` measures both).
- **Deepstack (Qwen3-VL).** A deepstack feature belongs to one merged token (the same 2x2 block,
  taken at an earlier layer). A dropped token loses its deepstack features too and a kept one keeps
  all of them, in the same order as the main features: the language model adds level ``l`` to the
  hidden state of the same visual position, so the kept sets must be identical. The scores come from
  the tower's attention only; the deepstack features are not scored separately.
- **Positions: a kept token keeps its own native 3-D position** ``(s, s + h, s + w)``; nothing is
  renumbered, so a kept token sits where the native model puts it and the rotary geometry between
  kept tokens is unchanged. **The text after the image keeps its native positions too**
  (``s + max(H/2, W/2)`` onward), whatever was dropped: the answer tokens and the prompt text are at
  the positions the model was trained with. Positions count real tokens only (left padding gets
  none), so a post has the same positions alone and in a batch.
- Baselines as for LLaVA: ``random`` (seeded by the image's patches; no scoring pass) and ``inverse``
  (the lowest scores). ``+merge`` (VisionZip-style context tokens) is not offered for these families.

The processor: transformers' ``Qwen2_5_VLProcessor``/``Qwen3VLProcessor`` require a video processor,
which needs torchvision; posts have no video, so :class:`QwenProcessor` holds the checkpoint's own
tokenizer (with its chat template) and its own image processor (``Qwen2VLImageProcessor``), each
loaded with ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from sentilens.errors import SentilensError
from sentilens.mllm.inputs import LmInputs
from sentilens.mllm.pruning import (
    FilterSpec,
    Selection,
    keep_count,
    random_priorities,
    received_attention,
    top_patches,
)

QWEN_MODEL_TYPES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] + ('\\n' if not loop.last else '') -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""The Qwen chat format (ChatML, image wrapped in vision start/end tokens) the tiny models ship;
real checkpoints bring their own template."""


def model_type(model) -> str:
    kind = model.config.model_type
    if kind not in QWEN_MODEL_TYPES:
        raise SentilensError(f"'{kind}' is not a Qwen2.5-VL / Qwen3-VL model")
    return kind


# ---------------------------------------------------------------------------------------------- processor


class QwenProcessor:
    """The checkpoint's tokenizer (chat template inside) and image processor: what prompts and pixels need."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, source: str) -> QwenProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
        return cls(tokenizer, image_processor, getattr(tokenizer, "chat_template", None) or chat_template_of(source))

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)

    def apply_chat_template(self, messages, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template or self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                                  **kwargs)


def chat_template_of(source: str) -> str | None:
    """The checkpoint's processor-level chat template (``chat_template.jinja``, or ``chat_template.json`` as
    Qwen2.5-VL's releases ship it), from the folder or the Hugging Face cache; None if it has none."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    return None


@dataclass
class QwenImages:
    """Preprocessed images: every image's flattened patches one after the other, and each one's grid."""

    pixel_values: Tensor  # (sum of patches, C * temporal_patch * patch * patch)
    grid_thw: Tensor  # (B, 3) long: temporal, height, width in patches

    def to(self, device: torch.device | str, **_) -> QwenImages:
        return QwenImages(self.pixel_values.to(device), self.grid_thw.to(device))

    def __len__(self) -> int:
        return self.grid_thw.shape[0]

    def patch_counts(self) -> list[int]:
        return [int(n) for n in self.grid_thw.prod(dim=-1).tolist()]

    def select(self, rows: Sequence[int]) -> QwenImages:
        """The images ``rows`` (in that order)."""
        starts = [0, *torch.tensor(self.patch_counts()).cumsum(0).tolist()]
        chunks = [self.pixel_values[starts[r]:starts[r + 1]] for r in rows]
        return QwenImages(torch.cat(chunks), self.grid_thw[list(rows)])


def preprocess_images(image_processor, images: Sequence, aspect: str = "crop") -> QwenImages:
    """Decoded RGB images through the checkpoint's own image processor (native resolution, flattened patches).

    ``aspect``: ``crop`` hands each image to the processor as it is (it keeps the aspect ratio: nothing is
    cut, the name is the run setting's); ``pad`` first pads it to a square with the processor's mean colour,
    as for LLaVA-1.5, so every image gets the same square grid.
    """
    from sentilens.mllm.inputs import pad_colour, pad_to_square

    if aspect not in ("pad", "crop"):
        raise ValueError(f"image_aspect must be 'pad' or 'crop', got {aspect!r}")
    if aspect == "pad":
        colour = pad_colour(image_processor)
        images = [pad_to_square(image, colour) for image in images]
    out = image_processor(list(images), return_tensors="pt")
    return QwenImages(out["pixel_values"], out["image_grid_thw"].long())


# ---------------------------------------------------------------------------------------------- the tower


@dataclass
class TowerOutput:
    """Pre-merger hidden states per image, raster order: ``blocks[i]`` is ``(N_i, 4, Dv)``;
    ``deepstack[l][i]`` the same at deepstack layer ``l`` (Qwen3-VL; empty for Qwen2.5-VL)."""

    blocks: list[Tensor]
    deepstack: list[list[Tensor]]
    grids: list[tuple[int, int, int]]  # (t, H/2, W/2): merged-token grid of each image


class _Recorder(nn.Module):
    """Stands in for a merger during the tower pass: keeps its input, returns an empty placeholder of the
    merged shape (the real merger runs later on the kept blocks only)."""

    def __init__(self, merger: nn.Module, unit: int, out_features: int):
        super().__init__()
        self.merger = merger
        self.unit = unit
        self.out_features = out_features
        self.seen: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x
        return x.new_empty(x.shape[0] // self.unit, self.out_features)


def _window_order(visual, grid_thw: Tensor) -> Tensor | None:
    """Qwen2.5-VL: the merged-token order its tower runs in (window by window); None for Qwen3-VL."""
    if not hasattr(visual, "window_size"):
        return None
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)
    return index.to(grid_thw.device)


@contextmanager
def _recording_mergers(visual) -> Iterator[list[_Recorder]]:
    unit = visual.spatial_merge_unit
    main = _Recorder(visual.merger, unit, visual.config.out_hidden_size)
    deep = [_Recorder(m, unit, visual.config.out_hidden_size) for m in getattr(visual, "deepstack_merger_list", [])]
    visual.merger = main
    if deep:
        visual.deepstack_merger_list = nn.ModuleList(deep)
    try:
        yield [main, *deep]
    finally:
        visual.merger = main.merger
        if deep:
            visual.deepstack_merger_list = nn.ModuleList([d.merger for d in deep])


def encode_images(model, images: QwenImages, scorer: ReceivedAttention | None = None) -> TowerOutput:
    """Run the frozen tower (no gradients) and return the pre-merger blocks of each image in raster order."""
    visual = model.model.visual
    unit = visual.spatial_merge_unit
    grid = images.grid_thw.to(visual.device)
    with torch.no_grad(), _recording_mergers(visual) as recorders, \
            (scorer.capture(visual) if scorer is not None else _nothing()):
        visual(images.pixel_values.to(device=visual.device, dtype=visual.dtype), grid_thw=grid)
    order = _window_order(visual, grid)
    merged = [(t, h // visual.spatial_merge_size, w // visual.spatial_merge_size) for t, h, w in grid.tolist()]
    counts = [t * h * w for t, h, w in merged]

    def per_image(states: Tensor, windowed: bool) -> list[Tensor]:
        states = states.reshape(-1, unit, states.shape[-1])
        if windowed and order is not None:  # back to raster order
            states = states[torch.argsort(order)]
        return list(torch.split(states, counts))

    main, *deep = recorders
    return TowerOutput(blocks=per_image(main.seen, True), deepstack=[per_image(d.seen, False) for d in deep],
                       grids=merged)


@contextmanager
def _nothing():
    yield None


# ---------------------------------------------------------------------------------------------- scoring


def full_attention_layers(visual) -> list[int]:
    """The tower layers that attend over the whole image (Qwen2.5-VL: ``fullatt_block_indexes``; Qwen3-VL: all)."""
    depth = len(visual.blocks)
    full = getattr(visual, "fullatt_block_indexes", None)
    return list(range(depth)) if full is None else sorted(i for i in full if 0 <= i < depth)


def scored_layers(visual, spec: FilterSpec) -> list[int]:
    """The layers whose received attention is averaged under ``spec`` (the module docstring's rules)."""
    depth = len(visual.blocks)
    full = full_attention_layers(visual)
    if spec.layers == "last":
        chosen = [depth - 1]
    elif spec.layers == "feature":
        chosen = sorted({*getattr(visual, "deepstack_visual_indexes", ()), depth - 1})
    elif spec.layers == "all":
        chosen = full
    else:
        chosen = spec.layer_indices(depth)
    usable = [i for i in chosen if i in full]
    if not usable:
        raise SentilensError(f"scoring layers '{spec.layers}' name only windowed-attention layers of this tower; "
                             f"its full-attention layers are {full}")
    return usable


class ReceivedAttention:
    """Mean attention each merged token's patches receive, over heads, the image's queries and the scored
    layers. The scored layers compute their own attention block by block
    (:func:`sentilens.mllm.pruning.attention_with_received`)
    and keep the column sums of each softmax block, so the map is never held whole and never computed twice;
    the other layers keep the tower's kernel (SDPA).

    After a captured tower pass, ``scores`` is a list of ``(N_i,)`` float32 tensors (raster order).
    """

    def __init__(self, visual, layers: Sequence[int]):
        self.visual = visual
        self.layers = sorted(set(layers))
        self.scores: list[Tensor] | None = None
        self._sum: Tensor | None = None
        self._parts: dict[int, list[Tensor]] = {}
        self._grid: Tensor | None = None

    @contextmanager
    def capture(self, visual=None) -> Iterator[ReceivedAttention]:
        visual = self.visual
        handles = [visual.register_forward_pre_hook(self._start, with_kwargs=True),
                   visual.register_forward_hook(self._finish)]
        for index in self.layers:
            handles.append(visual.blocks[index].attn.register_forward_hook(self._layer_done(index)))
        try:
            with received_attention({visual.blocks[index].attn: self._sink(index) for index in self.layers}):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._parts.clear()
            self._sum = None

    def _sink(self, index: int):
        def keep(received: Tensor) -> None:  # one call per image (the tower splits its packed sequence)
            self._parts.setdefault(index, []).append(received[0])
        return keep

    def _start(self, module, args, kwargs) -> None:
        self._grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._sum = None
        self._parts.clear()
        self.scores = None

    def _layer_done(self, index: int):
        def hook(module, args, output) -> None:
            received = torch.cat(self._parts.pop(index))  # the layer's images, in the tower's token order
            self._sum = received if self._sum is None else self._sum + received
        return hook

    def _finish(self, module, args, output) -> None:
        if self._sum is None:
            raise RuntimeError("the vision tower ran without reaching the scored layers")
        visual = self.visual
        per_patch = self._sum / len(self.layers)
        per_block = per_patch.view(-1, visual.spatial_merge_unit).mean(dim=1)  # a merged token = its 2x2 block
        order = _window_order(visual, self._grid)
        if order is not None:
            per_block = per_block[torch.argsort(order)]
        counts = (self._grid.prod(dim=-1) // visual.spatial_merge_unit).tolist()
        self.scores = list(torch.split(per_block, counts))
        self._sum = None


# ---------------------------------------------------------------------------------------------- filtering


class QwenTokenFilter:
    """Keeps ``ceil(r * N)`` merged tokens of each image (the module docstring's rules); ``last`` holds each
    image's :class:`~sentilens.mllm.pruning.Selection` (kept pre-merger blocks, kept raster indices, scores)."""

    def __init__(self, model, keep_ratio: float, strategy: FilterSpec | str = "all"):
        self.spec = FilterSpec.parse(strategy) if isinstance(strategy, str) else strategy
        if self.spec.merge or self.spec.native:
            raise SentilensError(f"strategy '{self.spec}' is not available for {QWEN_MODEL_TYPES[model_type(model)]}: "
                                 "+merge and +native are offered for LLaVA towers only (Qwen keeps every kept "
                                 "token's native 3-D position always)")
        keep_count(1, keep_ratio)
        self.keep_ratio = keep_ratio
        visual = model.model.visual
        self.scorer = None if self.spec.select == "random" else ReceivedAttention(visual, scored_layers(visual,
                                                                                                        self.spec))
        self.last: list[Selection] = []

    def select(self, images: QwenImages, tower: TowerOutput) -> list[Tensor]:
        """Kept raster indices of each image, increasing."""
        self.last = []
        starts = [0, *torch.tensor(images.patch_counts()).cumsum(0).tolist()]
        for i, blocks in enumerate(tower.blocks):
            n = blocks.shape[0]
            if self.spec.select == "random":
                patches = images.pixel_values[starts[i]:starts[i + 1]]
                scores = random_priorities(patches.unsqueeze(0), n)[0]
            else:
                scores = self.scorer.scores[i].float().cpu()
            keep = keep_count(n, self.keep_ratio)
            kept = top_patches(-scores if self.spec.select == "inverse" else scores, keep)
            self.last.append(Selection(features=blocks[kept.to(blocks.device)], kept=kept, scores=scores))
        return [k.kept for k in self.last]


# ---------------------------------------------------------------------------------------------- visual tokens


@dataclass
class VisualTokens:
    """One image's visual tokens for the language model."""

    embeds: Tensor  # (k, D_lm)
    deepstack: list[Tensor]  # per deepstack level, (k, D_lm)
    positions: Tensor  # (3, k) long: (t, h, w) of each kept token relative to the image's start position
    extent: int  # how far the image advances the position of the text after it: max(H/2, W/2)

    @property
    def count(self) -> int:
        return self.embeds.shape[0]


def grid_positions(grid: tuple[int, int, int]) -> Tensor:
    """``(3, t*h*w)`` relative (t, h, w) of each merged token of a grid, raster order (as HF's get_rope_index)."""
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def project(merger: nn.Module, blocks: Tensor) -> Tensor:
    """A merger (projector) on ``(k, 4, Dv)`` blocks -> ``(k, D_lm)``."""
    dtype = next(merger.parameters()).dtype
    return merger(blocks.reshape(-1, blocks.shape[-1]).to(dtype))


def visual_tokens(model, images: QwenImages, token_filter: QwenTokenFilter | None = None) -> list[VisualTokens]:
    """Encode, filter, then merge (project) each image's kept blocks; positions kept from the full grid."""
    visual = model.model.visual
    scorer = None if token_filter is None else token_filter.scorer
    tower = encode_images(model, images, scorer)
    kept = (token_filter.select(images, tower) if token_filter is not None
            else [torch.arange(b.shape[0]) for b in tower.blocks])
    device = tower.blocks[0].device if tower.blocks else visual.device
    rows = [k.to(device) for k in kept]
    main = project(visual.merger, torch.cat([b[r] for b, r in zip(tower.blocks, rows, strict=True)]))
    sizes = [r.numel() for r in rows]
    deep_levels = [
        torch.split(project(merger, torch.cat([b[r] for b, r in zip(level, rows, strict=True)])), sizes)
        for merger, level in zip(getattr(visual, "deepstack_merger_list", []), tower.deepstack, strict=False)]
    out = []
    for i, (embeds, grid) in enumerate(zip(torch.split(main, sizes), tower.grids, strict=True)):
        positions = grid_positions(grid)[:, kept[i].cpu()]
        out.append(VisualTokens(embeds=embeds, deepstack=[level[i] for level in deep_levels], positions=positions,
                                extent=max(grid[1], grid[2])))
    return out


# ---------------------------------------------------------------------------------------------- assembly


def token_positions(ids: Sequence[int], image_id: int, visual: VisualTokens | None) -> Tensor:
    """``(3, len)`` M-RoPE positions of one post whose image placeholder is already widened to ``visual``'s
    kept tokens: text counts up by one; the image's tokens sit at ``start + (t, h, w)`` of their own grid
    cell (nothing renumbered); the text after it starts at ``start + extent``, as in the native model."""
    out = torch.empty(3, len(ids), dtype=torch.long)
    position, at = 0, 0
    while at < len(ids):
        if ids[at] == image_id and visual is not None:
            k = visual.count
            out[:, at:at + k] = visual.positions + position
            position += visual.extent
            at += k
        else:
            out[:, at] = position
            position += 1
            at += 1
    return out


def assemble(model, token_ids: Sequence[Sequence[int]], visual: Sequence[VisualTokens | None],
             targets: Sequence[Sequence[int]] | None = None, padding_side: str = "right") -> LmInputs:
    """Pad the posts into one batch, each image placeholder widened to its kept visual tokens; positions
    ``(3, B, L)``; for Qwen3-VL, ``lm_kwargs`` carries the deepstack features and the visual positions."""
    config = model.config
    image_id = config.image_token_id
    pad_id = getattr(config.text_config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    rows, target_rows, positions = [], [], []
    for i, ids in enumerate(token_ids):
        ids = list(ids)
        tgt = list(targets[i]) if targets is not None else None
        count = ids.count(image_id)
        if count != (visual[i] is not None):
            raise ValueError(f"post {i} has {count} image placeholders but {'an' if visual[i] is not None else 'no'} "
                             "image")
        if count:
            at = ids.index(image_id)
            k = visual[i].count
            ids = ids[:at] + [image_id] * k + ids[at + 1:]
            if tgt is not None:
                tgt = tgt[:at] + [-100] * k + tgt[at + 1:]
        rows.append(ids)
        target_rows.append(tgt)
        positions.append(token_positions(ids, image_id, visual[i]))
    width = max(len(r) for r in rows)
    device = model.lm_head.weight.device
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((3, batch, width), dtype=torch.long)
    tgt_tensor = torch.full((batch, width), -100, dtype=torch.long) if targets is not None else None
    for i, ids in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids)
        mask[i, span] = 1
        position_ids[:, i, span] = positions[i]
        if tgt_tensor is not None:
            tgt_tensor[i, span] = torch.tensor(target_rows[i])
    input_ids, mask, position_ids = input_ids.to(device), mask.to(device), position_ids.to(device)
    embeds = model.get_input_embeddings()(input_ids)
    visual_mask = (input_ids == image_id) & mask.bool()
    present = [v for v in visual if v is not None]
    lm_kwargs: dict = {}
    if present:
        features = torch.cat([v.embeds for v in present]).to(device=embeds.device, dtype=embeds.dtype)
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), features)
        levels = len(present[0].deepstack)
        if levels:
            deepstack = [torch.cat([v.deepstack[level] for v in present]).to(device=embeds.device, dtype=embeds.dtype)
                         for level in range(levels)]
            lm_kwargs = {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": deepstack}
    return LmInputs(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                    targets=None if tgt_tensor is None else tgt_tensor.to(device),
                    image_tokens=[0 if v is None else v.count for v in visual], lm_kwargs=lm_kwargs)


def build_inputs(model, token_ids: Sequence[Sequence[int]], images: QwenImages | None,
                 image_index: Sequence[int | None], token_filter: QwenTokenFilter | None = None,
                 targets: Sequence[Sequence[int]] | None = None, padding_side: str = "right") -> LmInputs:
    """Encode, filter and merge the batch's images, then :func:`assemble` the language model's input."""
    visual: list[VisualTokens | None] = [None] * len(token_ids)
    if images is not None and len(images):
        tokens = visual_tokens(model, images, token_filter)
        for i, row in enumerate(image_index):
            if row is not None:
                visual[i] = tokens[row]
    return assemble(model, token_ids, visual, targets, padding_side)


def language_model_hidden(model, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                          visual_pos_masks: Tensor | None = None, deepstack_visual_embeds: list[Tensor] | None = None,
                          **kwargs):
    """The language model on assembled inputs, Qwen3-VL's deepstack features added where the model adds them.

    Tokens appended after the assembled ones (label scoring's answers) are not visual: the visual mask is
    widened with ``False`` to the input's width. A decoding step (one new token, no visual mask) adds none.
    """
    if deepstack_visual_embeds:
        extra = inputs_embeds.shape[1] - visual_pos_masks.shape[1]
        if extra > 0:
            visual_pos_masks = torch.cat([visual_pos_masks, visual_pos_masks.new_zeros(visual_pos_masks.shape[0],
                                                                                       extra)], dim=1)
        kwargs.update(visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack_visual_embeds)
    return model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **kwargs)


# ---------------------------------------------------------------------------------------------- tiny models


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
                    "positive neutral negative informative not informative"]
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


# ---------------------------------------------------------------------------------------------- FLOPs, heatmaps


def prediction_flops(config, image_tokens: int, kept: int, text_tokens: int, answer_tokens: int,
                     scored_layers: int = 0) -> dict:
    """FLOPs (2 per multiply-add) of one post's prediction, by part, as :mod:`sentilens.mllm.flops` counts
    LLaVA's: ``image_tokens`` merged tokens before filtering (0: no image), ``kept`` after it.

    Vision: patch embedding; per layer the qkv and output projections, the MLP (gated, three matrices, in
    Qwen2.5-VL; two in Qwen3-VL) and both attention matmuls, over the whole image in full-attention layers
    and inside a window in windowed ones. Scoring: a scored layer's attention map is the one its output is
    made from, so scoring adds only its column sums (one addition per head and map entry). Projector: the
    merger(s) on the kept tokens only (main and, for Qwen3-VL, each deepstack level). Language model and
    head as for LLaVA.
    """
    vision, text = config.vision_config, config.text_config
    parts = {"vision": 0.0, "scoring": 0.0, "projector": 0.0}
    if image_tokens:
        unit = vision.spatial_merge_size ** 2
        patches, d, mlp = image_tokens * unit, vision.hidden_size, vision.intermediate_size
        depth = vision.depth
        mlp_matrices = 2 if config.model_type == "qwen3_vl" else 3
        full = getattr(vision, "fullatt_block_indexes", None)
        full_layers = depth if full is None else len([i for i in full if 0 <= i < depth])
        window = patches if full is None else min(patches, (vision.window_size // vision.patch_size) ** 2)
        dense = 2 * patches * (4 * d * d + mlp_matrices * d * mlp)
        attention = 4 * patches * d * (full_layers * patches + (depth - full_layers) * window)
        embed = 2 * patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * d
        parts["vision"] = float(embed + depth * dense + attention)
        parts["scoring"] = float(scored_layers * vision.num_heads * patches * patches)
        mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", ()) or ())
        width = unit * d
        parts["projector"] = float(mergers * 2 * kept * (width * width + width * vision.out_hidden_size))
    h = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = text.num_key_value_heads or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    positions = text_tokens + kept + answer_tokens
    per_token = 2 * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * text.intermediate_size)
    parts["language"] = float(text.num_hidden_layers * (positions * per_token
                                                        + 4 * positions * positions * heads * head_dim))
    parts["head"] = float(2 * answer_tokens * h * text.vocab_size)
    parts["total"] = sum(parts.values())
    return parts


def image_tokens_for(image_processor, size: tuple[int, int]) -> int:
    """Merged tokens the image processor makes of a ``(width, height)`` image (its own resize rule)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    cell = image_processor.patch_size * image_processor.merge_size
    height, width = smart_resize(size[1], size[0], factor=cell, min_pixels=image_processor.size["shortest_edge"],
                                 max_pixels=image_processor.size["longest_edge"])
    return (height // cell) * (width // cell)


def picture(image_processor, images: QwenImages, index: int = 0) -> Tensor:
    """``(H, W, 3)`` in [0, 1]: image ``index`` as the tower sees it, rebuilt from its flattened patches."""
    t, gh, gw = images.grid_thw[index].tolist()
    starts = [0, *torch.tensor(images.patch_counts()).cumsum(0).tolist()]
    flat = images.pixel_values[starts[index]:starts[index + 1]].float().cpu()
    p, m = image_processor.patch_size, image_processor.merge_size
    channels = flat.shape[1] // (image_processor.temporal_patch_size * p * p)
    # rows are (gh/m, gw/m, m, m) patches of (C, temporal, p, p) pixels (the processor's flattening)
    grid = flat.view(gh // m, gw // m, m, m, channels, image_processor.temporal_patch_size, p, p)[:, :, :, :, :, 0]
    pixels = grid.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, gh * p, gw * p)
    mean = torch.tensor(image_processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(-1, 1, 1)
    return (pixels * std + mean).clamp(0, 1).permute(1, 2, 0)


def heatmap(model, processor: QwenProcessor, image, aspect: str, token_filter: QwenTokenFilter):
    """(picture, scores (gh, gw), kept (gh, gw) bool, content box) of one decoded image under ``token_filter``,
    from one tower pass with that filter: the kept flags are exactly the tokens the language model sees.
    The grid is the merged-token grid (native resolution: square only for square images)."""
    from sentilens.mllm.inputs import content_box

    images = preprocess_images(processor.image_processor, [image], aspect).to(model.device)
    with torch.no_grad():
        visual_tokens(model, images, token_filter)
    selection = token_filter.last[0]
    _, gh, gw = images.grid_thw[0].tolist()
    merge = processor.image_processor.merge_size
    shape = (gh // merge, gw // merge)
    kept = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    kept[selection.kept.cpu()] = True
    view = picture(processor.image_processor, images)
    box = content_box(image.size, aspect, view.shape[1]) if aspect == "pad" else (
        0.0, 0.0, float(view.shape[1]), float(view.shape[0]))
    return view, selection.scores.float().cpu().view(shape), kept.view(shape), box
