"""The tiny LLaVA's pretrained vision tower: what it learns (against eager attention maps), the cache, the copy
into the LLaVA checkpoint, and fine-tuning that keeps it frozen."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel

from mllm_helpers import FAST_TINY, small_manifest
from sentilens.data.synth import LABELS, SCENE_CLASSES, synth_image
from sentilens.errors import SentilensError
from sentilens.mllm import tower as tower_module
from sentilens.mllm.families.llava.tiny import build_tiny
from sentilens.mllm.model import TinySpec, load_checkpoint, tiny_image_processor
from sentilens.mllm.tower import (
    BACKGROUND,
    REPORT,
    TowerRecipe,
    corpus_pixels,
    patch_targets,
    pretrained_tower,
    tower_key,
)
from sentilens.mllm.train import TOWER_REPORT, mllm_train_config, train_mllm
from sentilens.runs import read_json

SPEC = TinySpec()  # 96 px, 16 px patches: a 6 x 6 grid
QUICK = TowerRecipe(images=48, held_out=12, epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def quick_tower(tmp_path_factory):
    cache = tmp_path_factory.mktemp("towers")
    return cache, pretrained_tower(SPEC, QUICK, cache)


def test_corpus_images_are_labelled_by_the_scene_they_show():
    pixels, targets, patches = corpus_pixels(SPEC, QUICK, 9, offset=3)
    assert pixels.shape == (9, 3, 96, 96) and pixels.dtype == torch.uint8 and patches.shape == (9, 36)
    for i, target in enumerate(targets.tolist()):
        image, scene, box, _ = synth_image(LABELS[(3 + i) % 3], QUICK.frame_size, tower_module.CORPUS_SEED + 3 + i)
        assert SCENE_CLASSES[target] == (scene if scene in SCENE_CLASSES else "objects")
        assert torch.equal(patches[i], patch_targets(SPEC, QUICK.frame_size, box, target))
        assert set(patches[i].tolist()) == {target, BACKGROUND}  # the box (>= 36 % of the side) covers whole patches
        # the image as the checkpoint's processor prepares it, before normalisation
        unit = tiny_image_processor(SPEC)([image], do_normalize=False, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(pixels[i], torch.round(unit * 255).to(torch.uint8))


def test_the_recipe_draws_its_corpus_with_its_own_cue_side():
    small = QUICK.model_copy(update={"cue_side": (0.2, 0.25)})
    assert tower_key(SPEC, small) != tower_key(SPEC, QUICK)
    _, targets, patches = corpus_pixels(SPEC, small, 6)
    for i, target in enumerate(targets.tolist()):
        _, _, box, _ = synth_image(LABELS[i % 3], small.frame_size, tower_module.CORPUS_SEED + i, (0.2, 0.25))
        assert round(128 * 0.2) <= box[2] - box[0] <= round(128 * 0.25)
        assert torch.equal(patches[i], patch_targets(SPEC, small.frame_size, box, target))


def test_a_patch_is_labelled_with_the_cue_when_at_least_half_of_it_lies_in_the_box():
    # 128-px frame -> 96 px: box [10, 10, 50, 50] becomes [7.5, 7.5, 37.5, 37.5] on a 6 x 6 grid of 16-px patches.
    # Patch (0, 1) spans x 16-32 (all in) and y 0-16 (8.5 of 16 in): 0.53 >= 0.5. Patch (0, 0): 0.53 x 0.53 = 0.28.
    # Patch (1, 2) spans x 32-48: 5.5 of 16 in, 0.34. So the cue class sits on patches (0, 1), (1, 0), (1, 1) only.
    targets = patch_targets(SPEC, 128, [10, 10, 50, 50], scene=3)
    assert [i for i, t in enumerate(targets.tolist()) if t != BACKGROUND] == [1, 6, 7]
    assert targets[7] == 3 and BACKGROUND == len(SCENE_CLASSES)
    whole = patch_targets(SPEC, 128, [0, 0, 64, 64], scene=0)  # [0, 0, 48, 48]: the top-left 3 x 3 patches exactly
    assert whole.view(6, 6)[:3, :3].eq(0).all() and int(whole.eq(0).sum()) == 9


def test_the_tower_is_cached_and_a_second_call_reuses_it(quick_tower, monkeypatch):
    cache, folder = quick_tower
    report = read_json(folder / REPORT)
    assert TowerRecipe(**report["recipe"]) == QUICK and report["key"] == folder.name == tower_key(SPEC, QUICK)
    assert sum(report["class_counts"].values()) == QUICK.images and 0.0 <= report["held_out_accuracy"] <= 1.0

    def no_training(*_):
        raise AssertionError("pretrained again although cached")

    monkeypatch.setattr(tower_module, "pretrain_tower", no_training)
    assert pretrained_tower(SPEC, QUICK, cache) == folder
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no partial folder left behind
    assert tower_key(SPEC, QUICK.model_copy(update={"seed": 1})) != folder.name
    assert tower_key(SPEC.model_copy(update={"vision_layers": 2}), QUICK) != folder.name
    assert tower_key(SPEC.model_copy(update={"text_layers": 5}), QUICK) == folder.name  # the LM is not the tower's


def test_build_tiny_copies_the_pretrained_tower_bitwise_and_refuses_another_shape(quick_tower, tmp_path):
    _, folder = quick_tower
    build_tiny(tmp_path / "ckpt", vision_tower=folder)
    llava, _ = load_checkpoint(tmp_path / "ckpt")
    expected = CLIPVisionModel.from_pretrained(folder).state_dict()
    loaded = llava.model.vision_tower.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(SentilensError, match="shape"):
        build_tiny(tmp_path / "other", spec=SPEC.model_copy(update={"vision_hidden": 32}), vision_tower=folder)


def test_fine_tuning_starts_from_the_cached_tower_and_keeps_it_frozen(quick_tower, tmp_path, monkeypatch):
    cache, folder = quick_tower
    data = small_manifest(tmp_path / "data", n_train=8, n_val=4, n_test=4)
    monkeypatch.setattr(tower_module, "pretrain_tower", lambda *_: pytest.fail("the cached tower was not reused"))
    options = {**FAST_TINY, "tiny_vision": "pretrained", "tiny_tower": QUICK.model_dump(), "cache": cache}
    train_mllm(mllm_train_config({"data": data, "out": tmp_path / "run", "epochs": 1, **options}))
    assert read_json(tmp_path / "run" / "base-model" / TOWER_REPORT)["key"] == folder.name
    from sentilens.predict import load_predictor

    tuned = load_predictor(tmp_path / "run").model.vlm.model.vision_tower.state_dict()
    expected = CLIPVisionModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(tuned[k], expected[k]) for k in expected)


def test_pretraining_teaches_the_scenes_and_moves_cls_attention_onto_the_cue(tmp_path):
    """Against the eager attention maps of the saved tower, on images the corpus never held."""
    recipe = TowerRecipe(images=600, held_out=150, epochs=4, batch_size=32)
    folder = pretrained_tower(SPEC, recipe, tmp_path)
    accuracy = read_json(folder / REPORT)["held_out_accuracy"]
    assert accuracy >= 0.6  # twice the most frequent class (objects, 1/3): a short recipe, well above chance
    processor = tiny_image_processor(SPEC)

    def mass_over_area(tower: CLIPVisionModel) -> float:
        ratios = []
        for i in range(60):
            image, _, (x0, y0, x1, y1), _ = synth_image(LABELS[i % 3], 128, 777_000 + i)
            pixels = processor([image], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                maps = tower(pixels, output_attentions=True).attentions
            scores = torch.stack([m[0, :, 0, 1:].mean(dim=0) for m in maps]).mean(dim=0).view(6, 6)
            cover = torch.zeros(96, 96)  # 128 px -> 96 px: box edges scale by 3/4
            cover[round(y0 * 0.75):round(y1 * 0.75), round(x0 * 0.75):round(x1 * 0.75)] = 1
            per_patch = cover.view(6, 16, 6, 16).mean(dim=(1, 3))
            ratios.append(float((scores * per_patch).sum() / scores.sum() / per_patch.mean()))
        return sum(ratios) / len(ratios)

    trained = CLIPVisionModel.from_pretrained(folder, attn_implementation="eager").eval()
    torch.manual_seed(0)
    untrained = CLIPVisionModel(trained.config).eval()
    assert mass_over_area(untrained) == pytest.approx(1.0, abs=0.1)
    learnt = mass_over_area(trained)
    assert learnt >= 1.5, learnt
