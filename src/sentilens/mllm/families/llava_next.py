"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, LLaVA-1.6): any-resolution tiles, and how they are filtered.

How the model sees an image (transformers' ``modeling_llava_next`` and its image processor):

- The image processor picks the grid resolution (``image_grid_pinpoints``) that keeps most of the
  image, resizes the image into it (aspect kept, centred, padded) and cuts ``nh x nw`` crops of
  the tower's size; a *base* tile, the whole image resized to one tile, comes first. Every tile
  goes through the same CLIP tower on its own, so **every tile has its own CLS token**.
- The language model reads the base tile's ``g x g`` patches, then the crops stitched into one
  ``(nh g) x (nw g)`` grid with the padding rows/columns cut off (``unpad_image``), read row by
  row with an ``image_newline`` embedding after each row. ``N = g^2 + H' (W' + 1)`` visual tokens.

Filtering (issue 14), and why:

- **Scores.** Each patch is scored by the CLS attention *of its own tile* (the paper's Eq. 3,
  averaged over the chosen layers, :class:`sentilens.mllm.pruning.AttentionScorer` on the tower's
  pass over all tiles). A tile's CLS summarises that tile only, so it is the natural judge of
  its patches; the base tile's CLS sees the whole image at low resolution and scores the
  global view. Each row is a softmax over one tile's tokens, so scores of different tiles are on
  the same scale (a share of one CLS's attention) and are ranked together.
- **Budget over the whole image.** The top patches are chosen across all tiles at once: a tile
  showing the post's subject keeps many patches, a tile of sky few or none. Padding patches that
  ``unpad_image`` removes are never candidates.
- **Newline tokens** are handled by one rule: *a row's newline stays exactly when at least one
  patch of that row stays*, and the newline counts against the budget like a patch. Why: the
  newline marks where a row of the crop grid ends, which the language model was trained to read
  after every row; keeping it for rows that still have patches keeps that layout, while a row
  with nothing left has nothing to end. It costs the language model as much as a patch, so it is
  counted: with ``N`` the native visual-token count (patches and newlines), exactly
  ``k = ceil(r N)`` tokens reach the language model, and ``r = 1`` is the native model.
  Patches are taken in score order; a patch opening a new crop row costs 2 (itself and the
  row's newline), one in an open row or in the base tile 1. When one token of budget is left
  and the next patch would open a row, it is passed over for the next patch that costs 1; if
  none is left, the best row-opening patch is taken and the lowest-scored patch whose removal
  closes no row is given back, so the count is always exactly ``k``.
- **Order.** Kept tokens stay in the native reading order (base tile, then the grid row by row,
  each kept row's newline after its patches).
- ``random`` keeps a seeded draw under the same rule; ``inverse`` the lowest scores; ``+merge``
  is not offered (its contextual tokens have no place in the row layout).

Fine-tuning trains the projector and the language model as for LLaVA-1.5; the ``image_newline``
embedding stays as the checkpoint has it (frozen with the tower: it marks row ends the language
model already reads).

The heatmap (``explain``) draws the crops stitched together (the image at full resolution, padded
to a square grid); the base tile's patches are filtered too but not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sentilens.errors import SentilensError
from sentilens.mllm import inputs
from sentilens.mllm.families import PatchView
from sentilens.mllm.families.llava import LlavaFamily
from sentilens.mllm.pruning import (
    Strategy,
    TiledTokenFilter,
    choose,
    encoder_layers,
    keep_count,
    layer_indices,
    parse_strategy,
)

NEXT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[INST] ' + (message['content'] if message['content'] is string else message['content'][0]['text'])"
    " + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if loop.first -%}{{- '[INST] ' -}}{%- endif -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- else -%}{{- part['text'] + ('\\n' if not loop.last else '') -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + (message['content'] if message['content'] is string else message['content'][0]['text'])"
    " + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""LLaVA-NeXT-Mistral's format (``llava-v1.6-mistral-7b-hf``): ``[INST] system, image, text, question [/INST]``."""

NEWLINE = -1
"""A newline slot in an image's layout (patch slots hold the row of the image's flattened tile features)."""


def tiny_pinpoints(size: int) -> list[list[int]]:
    """The tiny model's grid resolutions: 1 x 2, 2 x 1 and 2 x 2 tiles (LLaVA-NeXT's are 2 x 1 ... 3 x 1 of 336)."""
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


class LlavaNextFamily(LlavaFamily):
    name = "llava-next"
    hf_class = "LlavaNextForConditionalGeneration"
    processor_class = "LlavaNextProcessor"
    model_types = ("llava_next",)
    pretrains_tower = True
    default_image_aspect = "crop"
    """The processor fits any aspect itself (resize into the best grid, padded): ``crop`` hands it the image."""

    @property
    def chat_template(self) -> str:
        return NEXT_CHAT_TEMPLATE

    # --- checkpoints -------------------------------------------------------------------------
    def build_tiny(self, out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
                   vision_tower: str | Path | None = None) -> Path:
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
                                       num_additional_image_tokens=1, chat_template=NEXT_CHAT_TEMPLATE)
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

    # --- images ------------------------------------------------------------------------------
    def image_inputs(self, processor, images: Sequence, aspect: str) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B, tiles, 3, S, S)`` pixel values (base tile first, zero tiles pad the batch) and ``image_sizes``."""
        if aspect == "pad":
            colour = inputs.pad_colour(processor.image_processor)
            images = [inputs.pad_to_square(image, colour) for image in images]
        out = processor.image_processor(list(images), return_tensors="pt")
        return out["pixel_values"], {"image_sizes": torch.as_tensor(out["image_sizes"], dtype=torch.long)}

    def layout(self, model, image_size: Sequence[int]) -> Tensor:
        """The native reading order of one image's visual tokens, ``(N,)``: each slot the row of the image's
        flattened tile features (``tile * g^2 + patch``, base tile 0) or :data:`NEWLINE`.

        Built by running transformers' own reshaping (``pack_image_features``: grid, ``unpad_image``,
        a newline after each row) on patch indices instead of features.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        config = model.config
        g = config.vision_config.image_size // config.vision_config.patch_size
        patches = g * g
        base = torch.arange(patches)
        tiles = self.tiles(model, image_size)
        if tiles == 1:
            return torch.cat([base, torch.tensor([NEWLINE])])
        nh, nw = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints,
                                             config.vision_config.image_size)
        grid = torch.arange(patches, patches * tiles).view(nh, nw, g, g).permute(0, 2, 1, 3).reshape(nh * g, nw * g)
        grid = unpad_image(grid[None], list(image_size))[0]
        grid = torch.cat([grid, torch.full((grid.shape[0], 1), NEWLINE)], dim=1)
        return torch.cat([base, grid.flatten()])

    def tiles(self, model, image_size: Sequence[int]) -> int:
        """Tower passes of one image of ``image_size = (height, width)``: the base tile and the crops."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = model.config
        return image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)

    def num_image_tokens(self, model, processor) -> int:
        """The largest ``N`` any image can have: the largest grid, nothing unpadded."""
        config = model.config
        g = config.vision_config.image_size // config.vision_config.patch_size
        return max(g * g + (h // config.vision_config.image_size * g) * (w // config.vision_config.image_size * g + 1)
                   for h, w in config.image_grid_pinpoints)

    def image_token_count(self, model, processor, size: tuple[int, int]) -> tuple[int, int]:
        height_width = (size[1], size[0])
        return len(self.layout(model, height_width)), self.tiles(model, height_width)

    # --- visual tokens -----------------------------------------------------------------------
    def encode_tiles(self, model, pixel_values: Tensor, image_sizes: Tensor) -> tuple[Tensor, list[int]]:
        """Feature-layer patch states of every real tile of the batch, ``(tiles, g^2, Dv)`` (CLS dropped),
        and the tile count of each image. One tower pass; a reducer's capture sees it."""
        config = model.config
        counts = [self.tiles(model, size.tolist()) for size in image_sizes]
        tiles = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts, strict=True)])
        tower = self.vision_tower(model)
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        with torch.no_grad():
            out = tower(tiles.to(device=tower.device, dtype=tower.dtype), output_hidden_states=True)
            states = [out.hidden_states[layer] for layer in layers]
            if config.vision_feature_select_strategy == "default":
                states = [s[:, 1:] for s in states]
            return torch.cat(states, dim=-1), counts

    def visual_tokens(self, model, pixel_values: Tensor, extras: dict[str, Tensor], reducer=None) -> list[Tensor]:
        """Each image's kept tokens in reading order: projected patches, ``image_newline`` at kept row ends."""
        image_sizes = extras["image_sizes"]
        capture = getattr(reducer, "capture", None)
        with capture(model) if capture is not None else nullcontext():
            features, counts = self.encode_tiles(model, pixel_values, image_sizes)
        layouts = [self.layout(model, size.tolist()) for size in image_sizes]
        per_image = list(torch.split(features, counts))
        if reducer is None:
            slots = layouts
        else:
            real = [pixels[:n] for pixels, n in zip(pixel_values, counts, strict=True)]
            kept = reducer.choose(layouts, counts, real)  # positions in each layout
            slots = [layout[positions] for layout, positions in zip(layouts, kept, strict=True)]
        projector = self.projector(model)
        newline = model.model.image_newline
        out = []
        for feats, slot in zip(per_image, slots, strict=True):
            rows = feats.reshape(-1, feats.shape[-1])
            is_patch = slot >= 0
            projected = projector(rows[slot[is_patch].to(rows.device)].to(projector.linear_1.weight.dtype))
            tokens = newline.to(projected.dtype).expand(len(slot), -1).clone()
            tokens[is_patch.to(tokens.device)] = projected
            out.append(tokens)
        return out

    def make_reducer(self, model, keep_ratio: float, strategy: str = "all") -> AnyResTokenFilter:
        return AnyResTokenFilter(self.vision_tower(model), keep_ratio, parse_strategy(strategy),
                                 model.config.vision_feature_layer)

    # --- heatmap -----------------------------------------------------------------------------
    def patch_view(self, model, builder, post, reducer: AnyResTokenFilter) -> PatchView:
        """The crops stitched into the image at full resolution, padded to a square grid, with each patch's
        own-tile CLS attention and kept flag; padding patches (cut by ``unpad_image``) score 0, never kept."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        config = model.config
        batch = inputs.make_batch(builder, [post]).to(model.lm_head.weight.device)
        image_size = batch.image_extras["image_sizes"][0].tolist()
        with torch.no_grad():
            self.visual_tokens(model, batch.pixel_values, batch.image_extras, reducer)
        selection = reducer.last[0]
        size = config.vision_config.image_size
        g = size // config.vision_config.patch_size
        tiles = self.tiles(model, image_size)
        if tiles == 1:
            raise SentilensError("this image was given one tile only; no crop grid to draw")
        nh, nw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)
        side = max(nh, nw) * g
        scores = torch.zeros(side * side)
        kept = torch.zeros(side * side, dtype=torch.bool)
        layout = self.layout(model, image_size)
        # patch row t * g^2 + p of crop t = (i, j) sits at grid cell (i g + p // g, j g + p % g)
        crop = layout >= g * g
        feature_row = layout[crop] - g * g
        tile, patch = feature_row // (g * g), feature_row % (g * g)
        cell = (tile // nw * g + patch // g) * side + tile % nw * g + patch % g
        scores[cell] = selection.scores.float().cpu()[crop]
        kept_slots = torch.zeros(len(layout), dtype=torch.bool)
        kept_slots[selection.kept.cpu()] = True
        kept[cell] = kept_slots[crop]
        shown = torch.zeros(side * side, dtype=torch.bool)
        shown[cell] = True
        crops = inputs.denormalised(batch.pixel_values[0, 1:tiles], builder.processor.image_processor)
        picture = torch.zeros(3, side * config.vision_config.patch_size, side * config.vision_config.patch_size)
        for t in range(tiles - 1):
            i, j = divmod(t, nw)
            picture[:, i * size:(i + 1) * size, j * size:(j + 1) * size] = crops[t]
        height, width = image_size
        scale = min(nw * size / width, nh * size / height)
        new_w, new_h = int(width * scale), int(height * scale)
        x0, y0 = (nw * size - new_w) // 2, (nh * size - new_h) // 2
        return PatchView(picture=picture.permute(1, 2, 0), scores=scores.view(side, side), kept=kept.view(side, side),
                         score_name="CLS attention of each crop's own tile",
                         content=(float(x0), float(y0), float(x0 + new_w), float(y0 + new_h)),
                         shown=shown.view(side, side))


def choose_slots(layout: Tensor, priority: Tensor, budget: int, base_patches: int) -> Tensor:
    """The kept slots (sorted, reading order) of one image: exactly ``budget`` tokens under the newline rule of
    the module docstring. ``priority`` ``(N,)``: higher is kept first (newline entries are ignored);
    ``base_patches``: the first slots, the base tile, which have no newlines."""
    n = len(layout)
    if budget >= n:
        return torch.arange(n)
    is_patch = layout != NEWLINE
    newline_at = (~is_patch).nonzero().flatten().tolist()
    row = torch.full((n,), -1, dtype=torch.long)
    start = base_patches
    for r, end in enumerate(newline_at):
        row[start:end + 1] = r
        start = end + 1
    order = torch.sort(torch.where(is_patch, priority.float(), float("-inf")), descending=True, stable=True).indices
    order = order[: int(is_patch.sum())].tolist()
    rows = row.tolist()
    taken = [False] * n
    count_in_row = [0] * len(newline_at)
    left = budget
    for slot in order:
        r = rows[slot]
        cost = 1 if r < 0 or count_in_row[r] else 2
        if cost > left:
            continue
        taken[slot] = True
        if r >= 0:
            count_in_row[r] += 1
            taken[newline_at[r]] = True
        left -= cost
        if left == 0:
            break
    if left == 1:  # every patch that costs 1 is taken: open the best closed row, give back one patch
        opener = next(s for s in order if not taken[s])
        givable = [s for s in order if taken[s] and (rows[s] < 0 or count_in_row[rows[s]] > 1)]
        give = givable[-1]
        taken[give] = False
        if rows[give] >= 0:
            count_in_row[rows[give]] -= 1
        taken[opener] = True
        count_in_row[rows[opener]] += 1
        taken[newline_at[rows[opener]]] = True
    return torch.tensor([s for s in range(n) if taken[s]], dtype=torch.long)


@dataclass
class RowUnits:
    """One image's slots (:meth:`LlavaNextFamily.layout`) under the newline rule: a row's newline is kept with
    its first kept patch and counts against the budget (:func:`choose_slots`)."""

    layout: Tensor
    base_patches: int

    @property
    def size(self) -> int:
        return len(self.layout)

    def pick(self, priorities: Tensor, budget: int) -> Tensor:
        return choose_slots(self.layout, priorities, budget, self.base_patches)


class AnyResTokenFilter(TiledTokenFilter):
    """LLaVA-NeXT's filter (module docstring): own-tile CLS scores, one budget over the image, the newline rule.

    :meth:`LlavaNextFamily.visual_tokens` enters :meth:`capture` around its tower pass over all tiles,
    then asks :meth:`choose` for each image's kept slots; ``last`` keeps each image's
    :class:`~sentilens.mllm.pruning.Selection` (kept slots, per-slot scores; newline slots score 0).
    """

    family = "llava-next"

    def __init__(self, tower, keep_ratio: float, strategy: Strategy, vision_feature_layer):
        super().__init__(tower, keep_ratio, strategy,
                         layer_indices(strategy.layers, len(encoder_layers(tower)), vision_feature_layer))
        self.tile_patches = (tower.config.image_size // tower.config.patch_size) ** 2

    @torch.no_grad()
    def choose(self, layouts: list[Tensor], tiles: list[int], pixels: list[Tensor]) -> list[Tensor]:
        """Kept slots of each image (sorted): ``layouts`` from :meth:`LlavaNextFamily.layout`, ``tiles`` the tile
        counts, ``pixels`` each image's real tiles (seeds of the ``random`` baseline)."""
        if not self.strategy.scored:
            tile_scores = [self.strategy.unit_scores(p, len(layout))
                           for p, layout in zip(pixels, layouts, strict=True)]
        else:
            per_tile = torch.split(self.tile_scores(), tiles)
            tile_scores = []
            for scores, layout in zip(per_tile, layouts, strict=True):
                flat = scores.reshape(-1)
                tile_scores.append(torch.where(layout >= 0, flat[layout.clamp(min=0)], 0.0))
        self.last = []
        kept = []
        for layout, scores, count in zip(layouts, tile_scores, tiles, strict=True):
            base = 0 if count == 1 else self.tile_patches  # one tile: its patches form the one row
            selection = choose(RowUnits(layout, base), scores, keep_count(len(layout), self.keep_ratio),
                               self.strategy)
            kept.append(selection.kept)
            self.last.append(selection)
        return kept

