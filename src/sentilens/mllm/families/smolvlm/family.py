"""The SmolVLM adapter (SmolVLM2's ``SmolVLMForConditionalGeneration``, SmolVLM v1's
``Idefics3ForConditionalGeneration``); the rules are the package docstring's."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from sentilens.mllm import inputs
from sentilens.mllm.families import ModelFamily, PatchView
from sentilens.mllm.families.smolvlm.layout import ShuffleTokenFilter, SmolVisual
from sentilens.mllm.families.smolvlm.processor import PAD, TEXT, SmolProcessor
from sentilens.mllm.families.smolvlm.tiny import build_tiny
from sentilens.mllm.pruning import (
    encoder_layers,
    gather_rows,
    keep_count,
    layer_indices,
    parse_strategy,
)
from sentilens.stages import selection as timed_selection

SMOL_CHAT_TEMPLATE = Path(__file__).with_name("template.jinja").read_text(encoding="utf-8")
"""SmolVLM-Instruct's format (``<|im_start|>User:<image>...<end_of_utterance>\\nAssistant:``), text parts on lines."""


class SmolVLMFamily(ModelFamily):
    name = "smolvlm"
    hf_class = "SmolVLMForConditionalGeneration"
    processor_class = "SmolProcessor"
    model_types = ("smolvlm", "idefics3")
    classes_by_type = {"idefics3": "Idefics3ForConditionalGeneration"}
    """SmolVLM v1 (the 256M / 500M / 2B Instruct releases) is an Idefics3 checkpoint: the same tower, connector,
    pixel shuffle, image layout text and text model under the same names as SmolVLM2."""
    unquantized_modules = ("vision_model", "connector", "lm_head")
    pretrains_tower = False
    default_image_aspect = "crop"
    """The processor fits any aspect itself (resize, tiles of the image as it is): ``crop`` hands it the image."""
    lora_pattern = r".*text_model\..*"

    @property
    def chat_template(self) -> str:
        return SMOL_CHAT_TEMPLATE

    # --- checkpoints -------------------------------------------------------------------------
    def load_processor(self, source: str):
        return SmolProcessor.from_pretrained(source)

    def build_tiny(self, out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
                   vision_tower: str | Path | None = None) -> Path:
        """The tiny random model (:func:`.tiny.build_tiny`), with this family's chat template."""
        return build_tiny(out_dir, corpus, seed, spec, vision_tower, self.chat_template)

    # --- parts -------------------------------------------------------------------------------
    def vision_tower(self, model) -> nn.Module:
        return model.model.vision_model

    def projector(self, model) -> nn.Module:
        return model.model.connector

    def language_model(self, model) -> nn.Module:
        return model.model.text_model

    # --- images ------------------------------------------------------------------------------
    def image_inputs(self, processor, images: Sequence, aspect: str) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B, tiles, 3, S, S)`` pixel values (zero tiles pad the batch), and per image its ``grid`` (rows,
        cols; 0, 0 for an image that is its global tile alone) and its unfiltered span in the language
        model's input: ``span_ids`` (layout text and image tokens, by the checkpoint's tokenizer) and
        ``span_tile`` (the tile of each image token, :data:`TEXT` for layout text, :data:`PAD` past the end)."""
        pixels, grid = self.tiles_of(processor.image_processor, images, aspect)
        spans = []
        for rows, cols in grid.tolist():
            ids = torch.tensor(processor.tokenizer(processor.image_prompt(rows, cols),
                                                   add_special_tokens=False)["input_ids"])
            image = ids == processor.image_token_id
            starts = image & ~torch.cat([torch.tensor([False]), image[:-1]])  # first token of each tile's run
            tile = torch.where(image, torch.cumsum(starts.long(), 0) - 1, TEXT)
            spans.append((ids, tile))
        width = max(len(ids) for ids, _ in spans)
        span_ids = torch.full((len(spans), width), 0, dtype=torch.long)
        span_tile = torch.full((len(spans), width), PAD, dtype=torch.long)
        for i, (ids, tile) in enumerate(spans):
            span_ids[i, :len(ids)] = ids
            span_tile[i, :len(ids)] = tile
        return pixels, {"grid": grid, "span_ids": span_ids, "span_tile": span_tile}

    def tiles_of(self, image_processor, images: Sequence, aspect: str) -> tuple[Tensor, Tensor]:
        """The image processor's tiles ``(B, tiles, 3, S, S)`` and each image's ``(rows, cols)``."""
        if aspect == "pad":
            colour = inputs.pad_colour(image_processor)
            images = [inputs.pad_to_square(image, colour) for image in images]
        out = image_processor([[image] for image in images], return_tensors="pt", return_row_col_info=True)
        grid = torch.tensor([[rows[0], cols[0]] for rows, cols in zip(out["rows"], out["cols"], strict=True)])
        return out["pixel_values"], grid

    def tokens_per_tile(self, model) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor ** 2

    def num_image_tokens(self, model, processor) -> int:
        """The largest ``N``: the image processor's largest split (``size / tile`` a side) plus the global tile."""
        image_processor = processor.image_processor
        side = image_processor.size["longest_edge"] // image_processor.max_image_size["longest_edge"]
        return (side * side + (1 if side > 1 else 0)) * self.tokens_per_tile(model)

    def tile_count(self, grid: Sequence[int]) -> int:
        rows, cols = (int(v) for v in grid)
        return rows * cols + 1 if rows or cols else 1

    def image_token_count(self, model, processor, size: tuple[int, int]) -> tuple[int, int]:
        from PIL import Image

        _, grid = self.tiles_of(processor.image_processor, [Image.new("RGB", size)], "crop")
        tiles = self.tile_count(grid[0].tolist())
        return tiles * self.tokens_per_tile(model), tiles

    def prediction_flops(self, model, processor, size: tuple[int, int] | None, keep_ratio: float | None,
                         strategy: str, text_tokens: int, answer_tokens: int) -> dict[str, float]:
        """:func:`sentilens.mllm.flops.prediction_flops` on a LLaVA-shaped view of the SmolVLM config: the tower
        per tile (no CLS: ``(S / P)^2 - 1`` patches stand in), the projector on the kept tokens' ``s^2 D``-wide
        rows, the language model on the kept tokens plus the layout text (2 tokens a tile, a newline a row)."""
        from types import SimpleNamespace

        from sentilens.mllm.flops import prediction_flops

        config = model.config
        vision = config.vision_config
        view = SimpleNamespace(
            vision_config=SimpleNamespace(image_size=vision.image_size, patch_size=vision.patch_size,
                                          hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                                          num_hidden_layers=vision.num_hidden_layers),
            text_config=config.text_config,
            vision_feature_layer=[-1] * config.scale_factor ** 2)
        if size is None:
            return prediction_flops(view, 0, text_tokens, answer_tokens)
        parsed = parse_strategy(strategy)
        scored = 0
        if keep_ratio is not None and parsed.scored:
            scored = len(layer_indices(parsed.layers, len(encoder_layers(self.vision_tower(model))), -1))
        n, tiles = self.image_token_count(model, processor, size)
        kept = n if keep_ratio is None else keep_count(n, keep_ratio)
        layout = 2 * tiles + (2 if tiles > 1 else 0)
        parts = prediction_flops(view, kept, text_tokens + layout, answer_tokens, scored, tiles=tiles)
        return parts

    # --- visual tokens -----------------------------------------------------------------------
    def shuffle_groups(self, model) -> Tensor:
        """``(tokens per tile, s^2)``: the patches (row-major indices in a tile) each language-model token stands
        for, from the connector's own ``pixel_shuffle`` run on patch indices."""
        connector = self.projector(model)
        vision = model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        index = torch.arange(patches, dtype=torch.float64).view(1, patches, 1)
        return connector.pixel_shuffle(index, connector.scale_factor)[0].round().long()

    def encode_tiles(self, model, pixel_values: Tensor, grid: Tensor) -> tuple[Tensor, list[int]]:
        """The tower's last hidden states of every real tile, ``(tiles, patches, Dv)``, and each image's tile
        count. One tower pass; a reducer's capture sees it."""
        counts = [self.tile_count(g.tolist()) for g in grid]
        tiles = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts, strict=True)])
        tower = self.vision_tower(model)
        with torch.no_grad():
            states = tower(pixel_values=tiles.to(device=tower.device, dtype=tower.dtype)).last_hidden_state
        return states, counts

    def visual_tokens(self, model, pixel_values: Tensor, extras: dict[str, Tensor], reducer=None) -> list[SmolVisual]:
        grid = extras["grid"]
        capture = getattr(reducer, "capture", None)
        with capture() if capture is not None else nullcontext():
            states, counts = self.encode_tiles(model, pixel_values, grid)
        connector = self.projector(model)
        shuffled = connector.pixel_shuffle(states, connector.scale_factor)  # (tiles, tokens per tile, s^2 Dv)
        per_tile = shuffled.shape[1]
        per_image = list(torch.split(shuffled, counts))
        if reducer is None:
            kept = [torch.arange(n * per_tile) for n in counts]
        else:
            real = [pixels[:n] for pixels, n in zip(pixel_values, counts, strict=True)]
            unit_rows = [rows.reshape(-1, rows.shape[-1]) for rows in per_image]
            with timed_selection():
                kept = reducer.choose(counts, real, self.shuffle_groups(model), unit_rows)
        out = []
        for i, (rows, chosen) in enumerate(zip(per_image, kept, strict=True)):
            flat = rows.reshape(-1, rows.shape[-1])
            projection = connector.modality_projection
            picked = flat if reducer is None else gather_rows(flat, reducer.last[i])
            features = projection(picked.to(projection.proj.weight.dtype))
            tile_counts = torch.bincount(chosen.cpu() // per_tile, minlength=rows.shape[0])
            tile = extras["span_tile"][i].cpu()
            ids = extras["span_ids"][i].cpu()[tile != PAD]
            tile = tile[tile != PAD]
            # keep every layout-text token and the first k_t image slots of tile t (its kept tokens, in order)
            rank = torch.zeros_like(tile)
            for t in range(rows.shape[0]):
                run = tile == t
                rank[run] = torch.arange(int(run.sum()))
            keep = (tile == TEXT) | (rank < tile_counts[tile.clamp(min=0)])
            out.append(SmolVisual(ids=ids[keep], features=features))
        return out

    def make_reducer(self, model, keep_ratio: float, strategy: str = "all") -> ShuffleTokenFilter:
        return ShuffleTokenFilter(self.vision_tower(model), keep_ratio, parse_strategy(strategy))

    # --- the language model ------------------------------------------------------------------
    def assemble(self, model, token_ids, visual, targets=None, padding_side: str = "right", extras=None):
        """LLaVA's assembly with each image's whole span (layout text + kept visual tokens) in place of its
        placeholder; then the span's real token ids are written back and ``image_tokens`` counts the visual ones."""
        embed = model.get_input_embeddings()
        image_id = model.config.image_token_id
        spans = []
        for v in visual:
            if v is None:
                spans.append(None)
                continue
            ids = v.ids.to(embed.weight.device)
            rows = embed(ids)
            spans.append(rows.masked_scatter((ids == image_id)[:, None], v.features.to(rows.dtype)))
        built = inputs.assemble(model, token_ids, spans, targets, padding_side)
        built.input_ids = built.input_ids.clone()  # the embedding saved the placeholder ids for its backward
        for i, v in enumerate(visual):
            if v is not None:
                slots = (built.input_ids[i] == image_id) & built.attention_mask[i].bool()
                built.input_ids[i, slots] = v.ids.to(built.input_ids.device)
        built.image_tokens = [0 if v is None else v.count for v in visual]
        return built

    # --- heatmap -----------------------------------------------------------------------------
    def patch_view(self, model, builder, post, reducer: ShuffleTokenFilter) -> PatchView:
        """The tiles stitched into the image at full resolution (the global tile too, when it is alone),
        each pixel-shuffle block with its token's score and kept flag, padded to a square grid."""
        batch = inputs.make_batch(builder, [post]).to(model.lm_head.weight.device)
        with torch.no_grad():
            self.visual_tokens(model, batch.pixel_values, batch.image_extras, reducer)
        selection = reducer.last[0]
        rows, cols = (int(v) for v in batch.image_extras["grid"][0])
        tiles = self.tile_count((rows, cols))
        shown = list(range(tiles - 1)) if tiles > 1 else [0]
        rows, cols = (rows, cols) if tiles > 1 else (1, 1)
        vision = model.config.vision_config
        s = model.config.scale_factor
        per_side = vision.image_size // vision.patch_size // s  # token cells a tile side
        side = max(rows, cols) * per_side
        scores = torch.zeros(side, side)
        kept = torch.zeros(side, side, dtype=torch.bool)
        shown_cells = torch.zeros(side, side, dtype=torch.bool)
        kept_set = torch.zeros(selection.scores.numel(), dtype=torch.bool)
        kept_set[selection.kept.cpu()] = True
        per_tile = per_side * per_side
        for t in shown:
            r, c = divmod(t, cols)
            block = slice(t * per_tile, (t + 1) * per_tile)
            cells = (slice(r * per_side, (r + 1) * per_side), slice(c * per_side, (c + 1) * per_side))
            scores[cells] = selection.scores[block].float().cpu().view(per_side, per_side)
            kept[cells] = kept_set[block].view(per_side, per_side)
            shown_cells[cells] = True
        size = vision.image_size
        picture = torch.zeros(3, side // per_side * size, side // per_side * size)
        for t in shown:
            r, c = divmod(t, cols)
            picture[:, r * size:(r + 1) * size, c * size:(c + 1) * size] = inputs.denormalised(
                batch.pixel_values[0, t], builder.processor.image_processor)
        return PatchView(picture=picture.permute(1, 2, 0), scores=scores, kept=kept,
                         score_name="mean attention received (no CLS), per pixel-shuffle block",
                         content=(0.0, 0.0, float(cols * size), float(rows * size)), shown=shown_cells)
