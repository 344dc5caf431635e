"""SmolVLM (issue 14): the tiny model through the same path as a real checkpoint, native parity at r = 1
(prompts expanded by transformers' own layout function), received-attention scores per pixel-shuffle block
against an eager reference, exactly ceil(r N) visual tokens with the layout text intact, batched = one by
one, and train / eval / sweep / explain from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mllm_helpers import (
    eval_sweep_predict_explain,
    image_posts,
    interrupt_after_first_epoch,
    small_manifest,
    tiny_family_model,
)
from sentilens.cli import app
from sentilens.errors import SentilensError
from sentilens.mllm.families import family_of
from sentilens.mllm.inputs import build_inputs, language_model_hidden, make_batch
from sentilens.mllm.scoring import label_log_probs

LABELS = ["positive", "neutral", "negative"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_family_model(tmp_path_factory.mktemp("smol") / "ckpt", "smolvlm")


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    """A 2 x 2 split, a 1 x 2 split, a 2 x 1 split (each with its global tile), and a text-only post."""
    folder = tmp_path_factory.mktemp("images")
    specs = [((120, 100), (220, 40, 30)), ((300, 100), (20, 40, 200)), ((100, 300), (240, 240, 90))]
    return image_posts(folder, specs, step=5, slope=7)


def native_inputs(builder, batch, posts):
    """Token ids as transformers' SmolVLM processor writes them: each <image> replaced by its
    ``get_image_prompt_string`` layout (its own function), then tokenized; right-padded."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    processor = builder.processor
    grids = iter(batch.image_extras["grid"].tolist())
    rows = []
    for post in posts:
        text = builder.render(post.text, post.image is not None)
        if post.image:
            r, c = next(grids)
            text = text.replace("<image>", get_image_prompt_string(r, c, processor.image_seq_len,
                                                                   "<fake_token_around_image>", "<image>",
                                                                   "<global-img>"))
        rows.append(builder._encode(text))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), processor.tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def test_the_tiny_model_loads_through_from_pretrained_as_smolvlm(tiny, posts):
    model, builder = tiny
    assert type(model.vlm).__name__ == "SmolVLMForConditionalGeneration"
    assert builder.family.name == "smolvlm"
    grid = make_batch(builder, posts).image_extras["grid"].tolist()
    assert grid == [[2, 2], [1, 2], [2, 1]]


def test_identity_reproduces_native_smolvlm_logits(tiny, posts):
    model, builder = tiny
    llava = model.vlm
    batch = make_batch(builder, posts)
    ids, mask = native_inputs(builder, batch, posts)
    with torch.no_grad():
        native = llava(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values).logits
        for reducer in (None, family_of(llava).make_reducer(llava, 1.0)):
            ours = build_inputs(llava, batch, reducer=reducer, padding_side="right")
            assert torch.equal(ours.input_ids, ids) and torch.equal(ours.attention_mask, mask)
            logits = llava.lm_head(language_model_hidden(llava, ours).last_hidden_state)
            real = ours.attention_mask.bool()
            torch.testing.assert_close(logits[real], native[real], atol=1e-5, rtol=1e-5)
    per_tile = builder.processor.image_seq_len
    assert ours.image_tokens == [5 * per_tile, 3 * per_tile, 0, 3 * per_tile]


def eager_received(tower, tiles):
    """Attention each patch receives (mean over queries, heads, all layers), from the hidden states (no hooks)."""
    with torch.no_grad():
        hidden = tower(pixel_values=tiles, output_hidden_states=True).hidden_states
        assert len(hidden) == len(tower.encoder.layers) + 1
        rows = []
        for index, layer in enumerate(tower.encoder.layers):
            attn = layer.self_attn
            h = layer.layer_norm1(hidden[index])
            b, t, _ = h.shape
            q = attn.q_proj(h).view(b, t, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, attn.num_heads, -1).transpose(1, 2)
            rows.append(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=(1, 2)))
        return torch.stack(rows).mean(dim=0)


def block_groups(patches_a_side: int, scale: int) -> torch.Tensor:
    """The patches (row-major) under each language-model token: the s x s block at token row i, column j."""
    tokens = patches_a_side // scale
    return torch.tensor([[(i * scale + di) * patches_a_side + j * scale + dj for di in range(scale)
                          for dj in range(scale)] for i in range(tokens) for j in range(tokens)])


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.7])
def test_exactly_ceil_r_n_visual_tokens_scored_per_pixel_shuffle_block(tiny, posts, ratio):
    model, builder = tiny
    llava = model.vlm
    family = family_of(llava)
    batch = make_batch(builder, posts)
    vision = llava.config.vision_config
    side = vision.image_size // vision.patch_size
    groups = block_groups(side, llava.config.scale_factor)
    assert sorted(family.shuffle_groups(llava).sort(dim=1).values.tolist()) == sorted(groups.tolist())
    reducer = family.make_reducer(llava, ratio)
    with torch.no_grad():
        inputs = build_inputs(llava, batch, reducer=reducer, padding_side="left")
        full = build_inputs(llava, batch, padding_side="left")
    counts = [n for n in full.image_tokens if n]
    assert [n for n in inputs.image_tokens if n] == [math.ceil(ratio * n) for n in counts]
    layout = (full.input_ids != llava.config.image_token_id) & full.attention_mask.bool()
    kept_layout = (inputs.input_ids != llava.config.image_token_id) & inputs.attention_mask.bool()
    assert layout.sum(dim=1).tolist() == kept_layout.sum(dim=1).tolist(), "the layout text stays whole"
    tower = family.vision_tower(llava)
    for i, grid in enumerate(batch.image_extras["grid"].tolist()):
        tiles = family.tile_count(grid)
        eager = eager_received(tower, batch.pixel_values[i, :tiles])
        by_token = eager[:, groups.flatten()].view(tiles, *groups.shape).mean(dim=-1).reshape(-1)
        torch.testing.assert_close(reducer.last[i].scores, by_token, atol=1e-5, rtol=1e-4)
        kept = reducer.last[i].kept
        dropped = torch.ones(by_token.numel(), dtype=torch.bool)
        dropped[kept] = False
        if dropped.any():
            assert by_token[kept].min() >= by_token[dropped].max() - 1e-6


def test_batched_equals_one_by_one_with_different_kept_counts(tiny, posts):
    model, builder = tiny
    llava = model.vlm
    family = family_of(llava)
    answers = [builder.answer_ids[label] for label in builder.labels]
    with torch.no_grad():
        inputs = build_inputs(llava, make_batch(builder, posts), reducer=family.make_reducer(llava, 0.3),
                              padding_side="left")
        batched = label_log_probs(llava, inputs, answers)
        assert len({n for n in inputs.image_tokens if n}) == 2  # 5 tiles and 3 tiles
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
    result = runner.invoke(app, ["train", "mllm", "--data", str(data), "--out", str(run), "--model", "tiny:smolvlm",
                                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "8", "--global-batch-size", "8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "base-model" / "config.json").read_text())["model_type"] == "smolvlm"
    eval_sweep_predict_explain(runner, run, data, tmp_path)
    result = runner.invoke(app, ["train", "mllm", "--data", str(data), "--out", str(tmp_path / "run2"),
                                 "--model", "tiny:smolvlm", "--tiny-vision", "pretrained"])
    assert result.exit_code != 0 and "cannot be pretrained" in str(result.exception)


@pytest.mark.slow
def test_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """train mllm --resume on SmolVLM with LoRA: interrupted after epoch 1 of 2, resumed, it ends with the
    uninterrupted run's losses and weights (adapters and connector)."""
    from sentilens.mllm.train import mllm_train_config, train_mllm
    from sentilens.runs import load_weights

    data = small_manifest(tmp_path, n_train=8, n_val=4, n_test=4)
    options = {"data": data, "epochs": 2, "base_model": "tiny:smolvlm", "mode": "lora",
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "lr": 3e-3, "batch_size": 4, "global_batch_size": 4,
               "eval_batch_size": 8}
    train_mllm(mllm_train_config({**options, "out": tmp_path / "straight"}))
    interrupt_after_first_epoch(monkeypatch, options, tmp_path / "resumed")
    train_mllm(mllm_train_config({"out": tmp_path / "resumed", "resume": True}))

    straight = json.loads((tmp_path / "straight" / "history.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert len(resumed) == 2
    assert [h["train_loss"] for h in resumed] == pytest.approx([h["train_loss"] for h in straight], abs=1e-6)
    a = load_weights(tmp_path / "straight" / "model.safetensors")
    b = load_weights(tmp_path / "resumed" / "model.safetensors")
    assert any("lora_" in k for k in a) and any("connector" in k for k in a)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(SentilensError, match="nothing to resume"):
        train_mllm(mllm_train_config({**options, "out": tmp_path / "resumed", "resume": True}))


def test_merge_strategies_are_refused_in_one_line(tiny):
    llava = tiny[0].vlm
    with pytest.raises(SentilensError, match=r"^strategy 'all\+merge': \+merge is not available for SmolVLM; use"):
        family_of(llava).make_reducer(llava, 0.5, "all+merge")
    with pytest.raises(SentilensError, match=r"^strategy 'random\+native': \+native is offered for LLaVA-1.5 only"):
        family_of(llava).make_reducer(llava, 0.5, "random+native")
