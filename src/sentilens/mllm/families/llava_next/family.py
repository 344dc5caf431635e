"""The LLaVA-NeXT adapter (``LlavaNextForConditionalGeneration``); the rules are the package docstring's."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from sentilens.errors import SentilensError
from sentilens.mllm import inputs
from sentilens.mllm.families import PatchView
from sentilens.mllm.families.llava import vision
from sentilens.mllm.families.llava.family import LlavaFamily
from sentilens.mllm.families.llava_next.layout import NEWLINE, AnyResTokenFilter
from sentilens.mllm.families.llava_next.tiny import build_tiny
from sentilens.mllm.pruning import parse_strategy
from sentilens.stages import selection as timed_selection

NEXT_CHAT_TEMPLATE = Path(__file__).with_name("template.jinja").read_text(encoding="utf-8")
"""LLaVA-NeXT-Mistral's format (``llava-v1.6-mistral-7b-hf``): ``[INST] system, image, text, question [/INST]``."""


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
        """The tiny random model (:func:`.tiny.build_tiny`), with this family's chat template."""
        return build_tiny(out_dir, corpus, seed, spec, vision_tower, self.chat_template)

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
        counts = [self.tiles(model, size.tolist()) for size in image_sizes]
        tiles = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts, strict=True)])
        return vision.encode_images(model, tiles), counts  # every tile is an image to LLaVA-1.5's tower

    def visual_tokens(self, model, pixel_values: Tensor, extras: dict[str, Tensor], reducer=None) -> list[Tensor]:
        """Each image's kept tokens in reading order: projected patches, ``image_newline`` at kept row ends."""
        image_sizes = extras["image_sizes"]
        capture = getattr(reducer, "capture", None)
        with capture() if capture is not None else nullcontext():
            features, counts = self.encode_tiles(model, pixel_values, image_sizes)
        layouts = [self.layout(model, size.tolist()) for size in image_sizes]
        per_image = list(torch.split(features, counts))
        if reducer is None:
            slots = layouts
        else:
            real = [pixels[:n] for pixels, n in zip(pixel_values, counts, strict=True)]
            with timed_selection():
                kept = reducer.choose(layouts, counts, real, per_image)  # positions in each layout
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
