"""LLaVA-NeXT (issue 14): the tiny model through the same path as a real checkpoint, native parity at r = 1,
own-tile CLS scores against an eager reference, exactly ceil(r N) tokens with the newline rule, batched = one by
one, and train / eval / sweep / explain from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mllm_helpers import eval_sweep_predict_explain, image_posts, small_manifest, tiny_family_model
from sentilens.cli import app
from sentilens.errors import SentilensError
from sentilens.mllm.families import family_of
from sentilens.mllm.families.llava_next.layout import NEWLINE, choose_slots
from sentilens.mllm.inputs import build_inputs, language_model_hidden, make_batch
from sentilens.mllm.scoring import label_log_probs

LABELS = ["positive", "neutral", "negative"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_family_model(tmp_path_factory.mktemp("next") / "ckpt", "llava-next")


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    """Images of three aspect ratios (2 x 2, 2 x 1 and 1 x 2 crop grids, with padding cut off), and a text-only post."""
    folder = tmp_path_factory.mktemp("images")
    specs = [((120, 100), (220, 40, 30)), ((90, 128), (20, 40, 200)), ((300, 100), (240, 240, 90))]
    return image_posts(folder, specs, step=7, slope=3)


def native_counts(model, posts):
    """Visual tokens per image post by transformers' own processor (placeholder count it writes)."""
    processor = model.processor
    counts = []
    for post in posts:
        if post.image:
            out = processor(images=[Image.open(post.image).convert("RGB")], text=["<image>"], return_tensors="pt")
            counts.append(int((out["input_ids"] == processor.image_token_id).sum()))
    return counts


def test_the_tiny_model_loads_through_from_pretrained_as_llava_next(tiny):
    model, builder = tiny
    assert type(model.vlm).__name__ == "LlavaNextForConditionalGeneration"
    assert builder.family.name == "llava-next"
    assert builder.render("hi", True).startswith("[INST] ") and builder.render("hi", True).endswith(" [/INST]")


def test_identity_reproduces_native_llava_next_logits(tiny, posts):
    model, builder = tiny
    llava, processor = model.vlm, model.processor
    batch = make_batch(builder, posts)
    images = [Image.open(p.image).convert("RGB") for p in posts if p.image]
    native_inputs = processor(images=images, text=[builder.render(p.text, p.image is not None) for p in posts],
                              return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        native = llava(**native_inputs).logits
        for reducer in (None, family_of(llava).make_reducer(llava, 1.0)):
            ours = build_inputs(llava, batch, reducer=reducer, padding_side="right")
            logits = llava.lm_head(language_model_hidden(llava, ours).last_hidden_state)
            assert torch.equal(ours.input_ids, native_inputs["input_ids"])
            real = ours.attention_mask.bool()
            torch.testing.assert_close(logits[real], native[real], atol=1e-5, rtol=1e-5)
    counts = native_counts(model, posts)
    assert [n for n in ours.image_tokens if n] == counts and len(set(counts)) == 3


def eager_own_tile_cls(tower, tiles, layers):
    """CLS attention of each tile over its own patches, recomputed from the hidden states (no hooks), layer mean."""
    with torch.no_grad():
        hidden = tower(tiles, output_hidden_states=True).hidden_states
        rows = []
        for index in layers:
            layer = tower.encoder.layers[index]
            attn = layer.self_attn
            h = layer.layer_norm1(hidden[index])
            b, t, d = h.shape
            q = attn.q_proj(h).view(b, t, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, attn.num_heads, -1).transpose(1, 2)
            weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
            rows.append(weights[:, :, 0, 1:].mean(dim=1))
        return torch.stack(rows).mean(dim=0)


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.7])
def test_exactly_ceil_r_n_tokens_with_newlines_kept_for_rows_that_keep_patches(tiny, posts, ratio):
    model, builder = tiny
    llava = model.vlm
    family = family_of(llava)
    batch = make_batch(builder, posts)
    reducer = family.make_reducer(llava, ratio)
    with torch.no_grad():
        tokens = family.visual_tokens(llava, batch.pixel_values, batch.image_extras, reducer)
    counts = native_counts(model, posts)
    assert [t.shape[0] for t in tokens] == [math.ceil(ratio * n) for n in counts]
    tower = family.vision_tower(llava)
    for i, size in enumerate(batch.image_extras["image_sizes"]):
        layout = family.layout(llava, size.tolist())
        selection = reducer.last[i]
        kept = set(selection.kept.tolist())
        # own-tile CLS attention, from an independent eager computation
        n_tiles = family.tiles(llava, size.tolist())
        eager = eager_own_tile_cls(tower, batch.pixel_values[i, :n_tiles], range(len(tower.encoder.layers)))
        patch = layout >= 0
        torch.testing.assert_close(selection.scores[patch], eager.reshape(-1)[layout[patch]], atol=1e-5, rtol=1e-4)
        # the newline rule: a row's newline stays exactly when one of its patches stays
        newlines = (layout == NEWLINE).nonzero().flatten().tolist()
        start = 36  # the base tile's 6 x 6 patches come first
        for end in newlines:
            assert (end in kept) == any(s in kept for s in range(start, end))
            start = end + 1
        # newline slots carry the model's image_newline embedding
        newline_rows = [j for j, s in enumerate(sorted(kept)) if layout[s] == NEWLINE]
        for j in newline_rows:
            torch.testing.assert_close(tokens[i][j], llava.model.image_newline.detach())


def test_choose_slots_counts_newlines_and_swaps_when_one_token_is_left():
    # slots: 0 base patch | row 0: patch 1, newline 2 | row 1: patch 3, newline 4
    layout = torch.tensor([0, 1, NEWLINE, 2, NEWLINE])
    priority = torch.tensor([0.95, 0.9, 0.0, 0.8, 0.0])
    assert choose_slots(layout, priority, 3, base_patches=1).tolist() == [0, 1, 2]
    # 4 tokens: base (1) + row 0 (2) leaves 1, row 1 costs 2: the base patch is given back for row 1
    assert choose_slots(layout, priority, 4, base_patches=1).tolist() == [1, 2, 3, 4]
    assert choose_slots(layout, priority, 5, base_patches=1).tolist() == [0, 1, 2, 3, 4]
    # an open row's next patch costs 1: row 0 = patches 1, 2 then newline 3
    layout = torch.tensor([0, 1, 2, NEWLINE, 3, NEWLINE])
    priority = torch.tensor([0.1, 0.9, 0.2, 0.0, 0.85, 0.0])
    assert choose_slots(layout, priority, 3, base_patches=1).tolist() == [1, 2, 3]  # 0.2 in an open row beats 0.1
    assert choose_slots(layout, priority, 4, base_patches=1).tolist() == [1, 3, 4, 5]


def test_batched_equals_one_by_one_with_different_kept_counts(tiny, posts):
    model, builder = tiny
    llava = model.vlm
    family = family_of(llava)
    answers = [builder.answer_ids[label] for label in builder.labels]
    with torch.no_grad():
        inputs = build_inputs(llava, make_batch(builder, posts), reducer=family.make_reducer(llava, 0.3),
                              padding_side="left")
        batched = label_log_probs(llava, inputs, answers)
        assert len({n for n in inputs.image_tokens if n}) == 3
        for i, post in enumerate(posts):
            alone = build_inputs(llava, make_batch(builder, [post]), reducer=family.make_reducer(llava, 0.3),
                                 padding_side="left")
            assert alone.image_tokens[0] == inputs.image_tokens[i]
            torch.testing.assert_close(label_log_probs(llava, alone, answers)[0], batched[i], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_train_eval_sweep_predict_explain_from_the_command_line(tmp_path):
    data = small_manifest(tmp_path, n_train=8, n_val=4, n_test=6)
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "mllm", "--data", str(data), "--out", str(run), "--model", "tiny:llava-next",
                                 "--tiny-vision", "random", "--epochs", "1", "--lr", "3e-3", "--batch-size", "8",
                                 "--global-batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["base_model"] == "base-model" and config["training"]["base_model"] == "tiny:llava-next"
    assert json.loads((run / "base-model" / "config.json").read_text())["model_type"] == "llava_next"
    eval_sweep_predict_explain(runner, run, data, tmp_path)


def test_merge_strategies_are_refused_in_one_line(tiny):
    llava = tiny[0].vlm
    with pytest.raises(SentilensError, match=r"^strategy 'feature\+merge': \+merge is not available for LLaVA-NeXT "
                                             r"\(its contextual tokens have no place in the row layout\); use"):
        family_of(llava).make_reducer(llava, 0.5, "feature+merge")
    with pytest.raises(SentilensError, match=r"^strategy 'all\+native': \+native is offered for LLaVA-1.5 only, not "
                                             r"LLaVA-NeXT; use"):
        family_of(llava).make_reducer(llava, 0.5, "all+native")
