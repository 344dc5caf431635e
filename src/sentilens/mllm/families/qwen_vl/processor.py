"""The Qwen processor and image preprocessing: the checkpoint's own tokenizer and image processor.

transformers' ``Qwen2_5_VLProcessor``/``Qwen3VLProcessor`` require a video processor, which needs
torchvision; posts have no video, so :class:`QwenProcessor` is the one processor shim
(:mod:`sentilens.mllm.processor`) with the checkpoint's image processor (``Qwen2VLImageProcessor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sentilens.mllm.inputs import denormalised
from sentilens.mllm.processor import CheckpointProcessor

CHATML_TEMPLATE = (Path(__file__).with_name("template.jinja")).read_text(encoding="utf-8")
"""The Qwen chat format (ChatML, image wrapped in vision start/end tokens) the tiny models ship;
real checkpoints bring their own template."""


class QwenProcessor(CheckpointProcessor):
    """The checkpoint's tokenizer and image processor (:class:`~sentilens.mllm.processor.CheckpointProcessor`)."""

    default_image_token = "<|image_pad|>"


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
    return denormalised(pixels, image_processor).permute(1, 2, 0)
