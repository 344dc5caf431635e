"""Loading and freezing: the tiny checkpoint round trip, what trains in each mode, clear loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mllm_helpers import tiny_model
from sentilens.data.records import Post
from sentilens.errors import SentilensError
from sentilens.mllm.families.llava.tiny import build_tiny
from sentilens.mllm.inputs import make_batch
from sentilens.mllm.model import load_checkpoint, prepare_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny(folder)
    return folder


@pytest.fixture(scope="module")
def training_posts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    posts = []
    for i, (colour, label) in enumerate([((230, 200, 40), "positive"), ((30, 30, 60), "negative")] * 2):
        Image.new("RGB", (100, 100), colour).save(folder / f"{i}.png")
        posts.append(Post(str(i), f"post number {i}", str(folder / f"{i}.png"), label))
    return posts


def test_tiny_checkpoint_loads_back_through_from_pretrained(checkpoint):
    llava, processor = load_checkpoint(checkpoint)
    again, _ = load_checkpoint(checkpoint)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert llava.config.vision_config.model_type == "clip_vision_model"
    assert processor.tokenizer.decode(processor.tokenizer("héllo, 世界 ✓")["input_ids"],
                                      skip_special_tokens=True) == "héllo, 世界 ✓"
    assert all(torch.equal(a, b) for a, b in zip(llava.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_training_steps_leave_the_vision_tower_bitwise_unchanged(checkpoint, training_posts):
    model, builder = tiny_model(checkpoint, training=True)
    llava = model.vlm
    tower = {k: v.clone() for k, v in llava.model.vision_tower.state_dict().items()}
    projector = {k: v.clone() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    language = {k: v.clone() for k, v in llava.model.language_model.state_dict().items()}
    assert not any(p.requires_grad for p in llava.model.vision_tower.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not llava.model.vision_tower.training and llava.model.language_model.training
    for _ in range(3):
        loss = model(make_batch(builder, training_posts, with_targets=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, llava.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert all(not torch.equal(v, llava.model.multi_modal_projector.state_dict()[k]) for k, v in projector.items())
    changed = [not torch.equal(v, llava.model.language_model.state_dict()[k]) for k, v in language.items()]
    assert sum(changed) == len(changed), "every language-model tensor trains in full mode"
    assert set(model.trainable_state()) == {n for n, _ in model.net.named_parameters()
                                            if not n.startswith("model.vision_tower.")}


def test_lora_trains_adapters_and_the_projector_only(checkpoint):
    model, _ = tiny_model(checkpoint, mode="lora", training=True)
    names = set(model.trainable_state())
    assert names and all("lora_" in n or "multi_modal_projector" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)
    assert not any("vision_tower" in n for n in names if "lora_" in n), "no adapters in the vision tower"


def test_qlora_without_cuda_is_a_clear_error(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: QLoRA is allowed")
    with pytest.raises(SentilensError, match="QLoRA needs a CUDA GPU"):
        prepare_model(checkpoint, "qlora")


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(SentilensError, match="cannot load the model"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SentilensError, match="'llama' checkpoint; the MLLM family supports LlavaForCondition"):
        load_checkpoint(tmp_path / "llama")
