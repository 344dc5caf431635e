"""The language model's input built from per-image features: native LLaVA parity, reducers with
different kept counts per image, the capture hook, and one-pass label scoring against a plain sum."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from mllm_helpers import tiny_model
from sentilens.data.records import Post
from sentilens.mllm.families.llava.vision import encode_images
from sentilens.mllm.inputs import build_inputs, language_model_hidden, make_batch
from sentilens.mllm.scoring import label_log_probs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    specs = [((120, 100), (220, 40, 30)), ((90, 128), (20, 40, 200)), ((128, 128), (240, 240, 90))]
    paths = []
    for i, (size, colour) in enumerate(specs):
        img = Image.new("RGB", size, colour)
        img.paste((10, 10, 10), (0, 0, size[0] // 3, size[1] // 2))
        paths.append(folder / f"{i}.png")
        img.save(paths[-1])
    return [
        Post("a", "sun and sea, love it", str(paths[0])),
        Post("b", "a much longer text about yet another storm ruining the whole weekend again", str(paths[1])),
        Post("c", "text only", None),
        Post("d", "ok", str(paths[2])),
    ]


def test_identity_path_reproduces_native_llava_logits(tiny, posts):
    model, builder = tiny
    llava, processor = model.vlm, model.processor
    batch = make_batch(builder, posts)
    with torch.no_grad():
        ours = build_inputs(llava, batch, padding_side="right")
        logits = llava.lm_head(language_model_hidden(llava, ours).last_hidden_state)
        images = [Image.open(p.image).convert("RGB") for p in posts if p.image]
        native_inputs = processor(images=images, text=[builder.render(p.text, p.image is not None) for p in posts],
                                  return_tensors="pt", padding=True, padding_side="right")
        native = llava(**native_inputs).logits
    assert torch.equal(ours.input_ids, native_inputs["input_ids"])
    assert torch.equal(ours.attention_mask, native_inputs["attention_mask"])
    real = ours.attention_mask.bool()
    torch.testing.assert_close(logits[real], native[real], atol=1e-5, rtol=1e-5)
    assert ours.image_tokens == [36, 36, 0, 36]


def test_encode_images_is_the_feature_layer_without_cls(tiny, posts):
    model, builder = tiny
    llava = model.vlm
    pixels = make_batch(builder, posts).pixel_values
    with torch.no_grad():
        hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        native = llava.get_image_features(pixel_values=pixels).pooler_output
    features = encode_images(llava, pixels)
    assert torch.equal(features, hidden[-2][:, 1:])
    with torch.no_grad():
        projected = llava.model.multi_modal_projector(features)
    torch.testing.assert_close(projected, torch.stack(list(native)), atol=1e-6, rtol=1e-6)


class KeepFirst:
    """A reducer keeping the first k_i rows of image i, recording that it captured the tower's own pass."""

    def __init__(self, counts, tower):
        self.counts = counts
        self.tower = tower
        self.tower_calls_inside = 0

    @contextmanager
    def capture(self):
        handle = self.tower.register_forward_hook(lambda *_: self._count())
        try:
            yield
        finally:
            handle.remove()

    def _count(self):
        self.tower_calls_inside += 1

    def __call__(self, features, pixel_values):
        assert features.shape[0] == pixel_values.shape[0] == len(self.counts)
        return [f[:k] for f, k in zip(features, self.counts, strict=True)]


def test_different_kept_counts_in_one_batch_match_one_by_one(tiny, posts):
    model, builder = tiny
    llava = model.vlm
    image_posts = [p for p in posts if p.image]
    counts = [5, 36, 1]
    answers = [builder.answer_ids[label] for label in builder.labels]
    reducer = KeepFirst(counts, llava.model.vision_tower)
    with torch.no_grad():
        inputs = build_inputs(llava, make_batch(builder, posts), reducer=reducer, padding_side="left")
        batched = label_log_probs(llava, inputs, answers)
    assert reducer.tower_calls_inside == 1, "the reducer sees the very tower pass that made the features"
    assert inputs.image_tokens == [5, 36, 0, 1]
    assert (inputs.input_ids == llava.config.image_token_id).sum(dim=1).tolist() == [5, 36, 0, 1]
    k = iter(counts)
    for i, post in enumerate(posts):
        single = KeepFirst([next(k)], llava.model.vision_tower) if post.image else None
        with torch.no_grad():
            alone = build_inputs(llava, make_batch(builder, [post]), reducer=single, padding_side="left")
            torch.testing.assert_close(label_log_probs(llava, alone, answers)[0], batched[i], atol=1e-5, rtol=1e-5)
    assert len(image_posts) == 3


def test_reducer_must_return_one_tensor_per_image(tiny, posts):
    model, builder = tiny
    with pytest.raises(ValueError, match="one \\(k, 64\\) tensor per image"):
        build_inputs(model.vlm, make_batch(builder, posts), reducer=lambda f, p: list(f)[:1])


def test_one_pass_label_scoring_equals_summed_token_log_probs(tiny, posts):
    model, builder = tiny
    llava = model.vlm
    answers = [builder.answer_ids[label] for label in builder.labels]
    with torch.no_grad():
        scores = label_log_probs(llava, build_inputs(llava, make_batch(builder, posts), padding_side="left"), answers)
        for i, post in enumerate(posts):
            for c, label in enumerate(builder.labels):
                batch = make_batch(builder, [dataclasses.replace(post, label=label)], with_targets=True)
                inputs = build_inputs(llava, batch)
                log_probs = llava.lm_head(language_model_hidden(llava, inputs).last_hidden_state)[0, :-1]
                log_probs = log_probs.log_softmax(dim=-1)
                targets = inputs.targets[0, 1:]
                scored = targets != -100
                expected = log_probs[scored].gather(-1, targets[scored][:, None]).sum()
                assert scored.sum() == len(answers[c])
                torch.testing.assert_close(scores[i, c], expected, atol=1e-5, rtol=1e-5)
