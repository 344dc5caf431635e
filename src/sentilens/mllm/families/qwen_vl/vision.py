"""The Qwen tower pass, its received-attention scores, the token filter and the merged visual tokens.

The rules (which layers score, what a merged token's score is, deepstack) are the package docstring's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sentilens.errors import SentilensError
from sentilens.mllm.families.qwen_vl.processor import QwenImages, QwenProcessor, picture, preprocess_images
from sentilens.mllm.pruning import (
    FlatUnits,
    Selection,
    Strategy,
    UnitInputs,
    choose,
    gather_rows,
    keep_count,
    layer_indices,
    parse_strategy,
    received_attention,
)
from sentilens.stages import selection as timed_selection

QWEN_MODEL_TYPES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}

QWEN_FAMILY_NAMES = {"qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}
"""``config.model_type`` -> the family name (:data:`sentilens.mllm.families.REGISTRY`)."""


def model_type(model) -> str:
    kind = model.config.model_type
    if kind not in QWEN_MODEL_TYPES:
        raise SentilensError(f"'{kind}' is not a Qwen2.5-VL / Qwen3-VL model")
    return kind


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
            (scorer.capture() if scorer is not None else nullcontext()):
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


# ---------------------------------------------------------------------------------------------- scoring


def full_attention_layers(visual) -> list[int]:
    """The tower layers that attend over the whole image (Qwen2.5-VL: ``fullatt_block_indexes``; Qwen3-VL: all)."""
    depth = len(visual.blocks)
    full = getattr(visual, "fullatt_block_indexes", None)
    return list(range(depth)) if full is None else sorted(i for i in full if 0 <= i < depth)


def scored_layers(visual, strategy: Strategy) -> list[int]:
    """The layers whose received attention is averaged under ``strategy`` (the module docstring's rules)."""
    depth = len(visual.blocks)
    full = full_attention_layers(visual)
    layers = strategy.layers
    if layers == "last":
        chosen = [depth - 1]
    elif layers == "feature":
        chosen = sorted({*getattr(visual, "deepstack_visual_indexes", ()), depth - 1})
    elif layers == "all":
        chosen = full
    else:
        chosen = layer_indices(layers, depth)
    usable = [i for i in chosen if i in full]
    if not usable:
        raise SentilensError(f"scoring layers '{layers}' name only windowed-attention layers of this tower; "
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
    def capture(self) -> Iterator[ReceivedAttention]:
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
            with timed_selection():
                received = torch.cat(self._parts.pop(index))  # the layer's images, in the tower's token order
                self._sum = received if self._sum is None else self._sum + received
        return hook

    def _finish(self, module, args, output) -> None:
        if self._sum is None:
            raise RuntimeError("the vision tower ran without reaching the scored layers")
        with timed_selection():
            self._scores_from_sum()

    def _scores_from_sum(self) -> None:
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
    image's :class:`~sentilens.mllm.pruning.Selection` (kept raster indices, scores)."""

    def __init__(self, model, keep_ratio: float, strategy: Strategy | str = "all"):
        self.strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
        self.strategy.check(QWEN_FAMILY_NAMES[model_type(model)])
        keep_count(1, keep_ratio)
        self.keep_ratio = keep_ratio
        visual = model.model.visual
        self.scorer = ReceivedAttention(visual, scored_layers(visual, self.strategy)) if self.strategy.scored else None
        self.last: list[Selection] = []

    def select(self, images: QwenImages, tower: TowerOutput) -> list[Tensor]:
        """Kept raster indices of each image, increasing."""
        self.last = []
        starts = [0, *torch.tensor(images.patch_counts()).cumsum(0).tolist()]
        if self.scorer is None:  # a unit's row is the merger's input: its 2 x 2 block, concatenated
            with timed_selection():  # the call's images chosen together
                all_scores = self.strategy.batch_unit_scores([
                    UnitInputs(images.pixel_values[starts[i]:starts[i + 1]], blocks.shape[0],
                               keep_count(blocks.shape[0], self.keep_ratio), blocks.reshape(blocks.shape[0], -1))
                    for i, blocks in enumerate(tower.blocks)])
        else:
            all_scores = [self.scorer.scores[i].float().cpu() for i in range(len(tower.blocks))]
        for blocks, scores in zip(tower.blocks, all_scores, strict=True):
            n = blocks.shape[0]
            self.last.append(choose(FlatUnits(n), scores, keep_count(n, self.keep_ratio), self.strategy,
                                    blocks.reshape(n, -1)))
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

    def kept_rows(blocks: list[Tensor]) -> Tensor:  # each image's kept blocks (a merging strategy's means)
        if token_filter is None:
            return torch.cat(blocks)
        return torch.cat([gather_rows(b, selection) for b, selection in zip(blocks, token_filter.last, strict=True)])

    main = project(visual.merger, kept_rows(tower.blocks))
    sizes = [k.numel() for k in kept]
    deep_levels = [
        torch.split(project(merger, kept_rows(level)), sizes)
        for merger, level in zip(getattr(visual, "deepstack_merger_list", []), tower.deepstack, strict=False)]
    out = []
    for i, (embeds, grid) in enumerate(zip(torch.split(main, sizes), tower.grids, strict=True)):
        positions = grid_positions(grid)[:, kept[i].cpu()]
        out.append(VisualTokens(embeds=embeds, deepstack=[level[i] for level in deep_levels], positions=positions,
                                extent=max(grid[1], grid[2])))
    return out


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
