"""How an image is fitted to the vision tower: LLaVA-1.5's pad-to-square (the default for LLaVA-1.5
checkpoints and the tiny model) keeps both ends of a wide image, the processor's centre crop cuts them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm_helpers import tiny_model
from sentilens.data.records import Post
from sentilens.mllm.inputs import content_box, make_batch
from sentilens.mllm.prompt import PromptBuilder, PromptSettings
from sentilens.mllm.train import default_image_aspect

RED, GREEN, BLUE = (255, 0, 0), (0, 160, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def wide_post(tmp_path_factory):
    """A 2:1 image (192 x 96): a red band on the left edge, a blue band on the right, green between."""
    image = Image.new("RGB", (192, 96), GREEN)
    image.paste(RED, (0, 0, 24, 96))
    image.paste(BLUE, (168, 0, 192, 96))
    path = tmp_path_factory.mktemp("img") / "wide.png"
    image.save(path)
    return Post("wide", "a wide picture", str(path))


def tower_view(tiny, post, aspect):
    """The tower's input for ``post`` under ``aspect``, normalisation undone: (96, 96, 3) in [0, 1]."""
    model, builder = tiny
    builder = PromptBuilder(builder.processor, PromptSettings(image_aspect=aspect), builder.labels,
                            builder.num_image_tokens)
    pixels = make_batch(builder, [post]).pixel_values[0]
    processor = builder.processor.image_processor
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (processor.image_mean, processor.image_std))
    return (pixels * std + mean).permute(1, 2, 0), torch.tensor(processor.image_mean)


def close(pixel, colour, tol=0.05):
    return bool((pixel - torch.tensor(colour, dtype=torch.float32) / 255).abs().max() < tol)


def test_pad_keeps_both_edges_of_a_2_to_1_image_visible_to_the_model(tiny, wide_post):
    view, mean = tower_view(tiny, wide_post, "pad")
    assert view.shape == (96, 96, 3)
    middle = 48  # the image is centred: rows 24..72 of the 96-px square, the rest is padding
    assert close(view[middle, 2], RED) and close(view[middle, 93], BLUE), "both ends of the long side are kept"
    assert close(view[middle, 48], GREEN)
    for row in (0, 10, 85, 95):  # padding rows are the processor's mean colour (normalised to zero)
        assert (view[row] - mean).abs().max() < 1 / 255 + 1e-4
    assert content_box((192, 96), "pad", 96) == (0.0, 24.0, 96.0, 72.0)


def test_crop_cuts_the_edges_the_pad_keeps(tiny, wide_post):
    view, _ = tower_view(tiny, wide_post, "crop")
    assert close(view[48, 2], GREEN) and close(view[48, 93], GREEN)
    reds = ((view - torch.tensor(RED) / 255).abs().amax(-1) < 0.05).sum()
    assert reds == 0, "the centre crop of a 2:1 image loses its left and right quarters"
    assert content_box((192, 96), "crop", 96) == (0.0, 0.0, 96.0, 96.0)


@pytest.mark.parametrize(("base", "aspect"), [
    ("tiny", "pad"), ("llava-hf/llava-1.5-7b-hf", "pad"), ("liuhaotian/llava-v1.5-13b", "pad"),
    ("/models/LLaVA_1_5-7b", "pad"), ("llava-hf/bakLlava-v1-hf", "crop"), ("/models/my-llava", "crop")])
def test_default_image_aspect_is_pad_for_llava_15_and_tiny(base, aspect):
    assert default_image_aspect(base) == aspect
