"""Token filtering inside the MLLM predictor (tiny LLaVA runs): r = 1 identity, the kept features reaching
the language model, batched = one by one, LoRA runs, and the `sweep` / `explain` commands."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mllm_helpers import FAST_TINY, small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split
from sentilens.errors import SentilensError
from sentilens.mllm.families.llava.vision import encode_images, make_reducer
from sentilens.mllm.inputs import build_inputs, language_model_hidden, make_batch
from sentilens.mllm.pruning import top_patches
from sentilens.mllm.train import mllm_train_config, train_mllm
from sentilens.predict import evaluate, load_predictor

pytestmark = pytest.mark.slow  # trains real models: left out of `make test-fast`, run by `make test`


TINY_RUN = {**FAST_TINY, "epochs": 1}
PATCHES = 36  # the tiny LLaVA: 96 px / 16 px patches


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, n_test=8)


@pytest.fixture(scope="module")
def full_run(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    train_mllm(mllm_train_config({"data": manifest, "out": out, **TINY_RUN}))
    return out


@pytest.fixture(scope="module")
def lora_run(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    train_mllm(mllm_train_config({"data": manifest, "out": out, "mode": "lora", "lora": {"r": 4, "alpha": 8},
                                  **TINY_RUN}))
    return out


def logits_of(predictor, posts, reducer):
    llava = predictor.model.vlm
    with torch.no_grad():
        inputs = build_inputs(llava, make_batch(predictor.builder, posts), reducer=reducer, padding_side="left")
        return inputs, llava.lm_head(language_model_hidden(llava, inputs).last_hidden_state)


@pytest.mark.parametrize("run", ["full_run", "lora_run"])
def test_keep_ratio_one_reproduces_the_unfiltered_logits_exactly(run, manifest, request):
    predictor = load_predictor(request.getfixturevalue(run))
    posts = read_split(manifest, "test")
    plain_inputs, plain = logits_of(predictor, posts, None)
    kept_inputs, kept = logits_of(predictor, posts, make_reducer(predictor.model.vlm, 1.0))
    assert kept_inputs.image_tokens == plain_inputs.image_tokens
    assert torch.equal(kept_inputs.inputs_embeds, plain_inputs.inputs_embeds)
    assert torch.equal(kept, plain)
    assert [p.probabilities for p in predictor.predict(posts, keep_ratio=1.0)] == [
        p.probabilities for p in predictor.predict(posts)]


def test_the_language_model_sees_exactly_the_top_patches_of_the_eager_reference(full_run, manifest):
    predictor = load_predictor(full_run)
    llava = predictor.model.vlm
    posts = [p for p in read_split(manifest, "test") if p.image][:3]
    batch = make_batch(predictor.builder, posts)
    eager = copy.deepcopy(llava.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager(batch.pixel_values, output_attentions=True).attentions
    reference = torch.stack([m[:, :, 0, 1:].mean(dim=1) for m in maps]).mean(dim=0)
    features = encode_images(llava, batch.pixel_values)
    count = math.ceil(0.3 * PATCHES)

    def by_reference(feats, pixel_values):
        return [feats[i, top_patches(reference[i], count)] for i in range(feats.shape[0])]

    ref_inputs, ref_logits = logits_of(predictor, posts, by_reference)
    inputs, logits = logits_of(predictor, posts, make_reducer(llava, 0.3))
    assert inputs.image_tokens == [count] * 3
    assert (inputs.input_ids == llava.config.image_token_id).sum(dim=1).tolist() == [count] * 3
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert features.shape == (3, PATCHES, 64)


@pytest.mark.parametrize("strategy", ["all+native", "random+native"])
def test_native_positions_equal_the_full_sequence_with_the_dropped_tokens_masked_out(full_run, manifest, strategy):
    """The independent reference for +native: the r = 1 input (every visual token at its own position) with the
    dropped visual tokens masked out of attention. The paper's renumbered sequence is another computation."""
    predictor = load_predictor(full_run)
    llava = predictor.model.vlm
    posts = [p for p in read_split(manifest, "test") if p.image][:3]
    reducer = make_reducer(llava, 0.3, strategy)
    inputs, logits = logits_of(predictor, posts, reducer)
    full_inputs, _ = logits_of(predictor, posts, None)
    assert inputs.image_tokens == [math.ceil(0.3 * PATCHES)] * 3
    mask = full_inputs.attention_mask.clone()
    for i, selection in enumerate(reducer.last):
        slots = (full_inputs.input_ids[i] == llava.config.image_token_id).nonzero().flatten()
        assert len(slots) == PATCHES
        dropped = torch.ones(PATCHES, dtype=torch.bool)
        dropped[selection.kept] = False
        mask[i, slots[dropped]] = 0
        # positions: the kept tokens at the image's first position plus their patch index, the text after as at r = 1
        native = inputs.position_ids[i][inputs.input_ids[i] == llava.config.image_token_id]
        assert native.tolist() == (full_inputs.position_ids[i, slots[0]] + selection.kept).tolist()
        assert inputs.position_ids[i, -1] == full_inputs.position_ids[i, -1]
    with torch.no_grad():
        reference = llava.lm_head(language_model_hidden(llava, full_inputs, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(logits[:, -1], reference[:, -1], atol=1e-5, rtol=1e-5)
    renumbered = logits_of(predictor, posts, make_reducer(llava, 0.3, strategy.removesuffix("+native")))[1]
    assert (renumbered[:, -1] - reference[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["all", "feature", "all+merge", "all+native", "random+native", "lm:0"])
@pytest.mark.parametrize("run", ["full_run", "lora_run"])
def test_filtered_batches_equal_one_by_one(run, strategy, manifest, request):
    predictor = load_predictor(request.getfixturevalue(run)).with_options(strategy=strategy)
    posts = read_split(manifest, "test")
    assert {p.id for p in posts} >= {"long", "text-only"}
    batched = predictor.predict(posts, keep_ratio=0.3)
    predictor.batch_size = 1
    alone = predictor.predict(posts, keep_ratio=0.3)
    assert [p.kept_tokens for p in batched] == [0 if p.image is None else math.ceil(0.3 * PATCHES) for p in posts]
    assert [p.kept_tokens for p in alone] == [p.kept_tokens for p in batched]
    for a, b in zip(batched, alone, strict=True):
        assert a.label == b.label
        assert all(abs(a.probabilities[k] - b.probabilities[k]) <= 1e-5 for k in a.probabilities)


def test_an_lm_stage_strategy_predicts_counts_its_flops_and_draws_no_heatmap(full_run, manifest):
    predictor = load_predictor(full_run).with_options(strategy="lm:0")
    posts = read_split(manifest, "test")
    image_post = next(p for p in posts if p.image)
    whole, pruned = predictor.flops_per_post([image_post]), predictor.flops_per_post([image_post], keep_ratio=0.3)
    assert pruned["vision"] == whole["vision"] and pruned["projector"] == whole["projector"]  # the tower sees all
    assert pruned["language"] < whole["language"] and pruned["total"] < whole["total"]
    scored = predictor.predict(posts, keep_ratio=0.3)
    generated = predictor.with_options(decode="generate").predict(posts, keep_ratio=0.3)
    assert [p.kept_tokens for p in generated] == [p.kept_tokens for p in scored]
    assert [p.kept_tokens for p in scored] == [0 if p.image is None else math.ceil(0.3 * PATCHES) for p in posts]
    with pytest.raises(SentilensError, match=r"^strategy 'lm:0' prunes inside the language model"):
        predictor.explain(image_post, 0.3)
    with pytest.raises(SentilensError, match=r"LM layer 9 leaves no layer after it in a \d+-layer language model"):
        predictor.with_options(strategy="lm:9")
    with pytest.raises(SentilensError, match=r"^bad scoring layers '40': .*the tower has \d+ layers"):
        predictor.with_options(strategy="40")


def record_visual_tokens(monkeypatch) -> dict[str, list[int]]:
    """The visual-token count of every post the training steps ('train') and the val pass ('val') build."""
    from sentilens.mllm import model as model_module
    from sentilens.mllm import scoring as scoring_module

    seen = {"train": [], "val": []}

    def recording(stage, build):
        def wrapper(*args, **kwargs):
            inputs = build(*args, **kwargs)
            seen[stage].extend(inputs.image_tokens)
            return inputs
        return wrapper

    monkeypatch.setattr(model_module, "build_inputs", recording("train", model_module.build_inputs))
    monkeypatch.setattr(scoring_module, "build_inputs", recording("val", scoring_module.build_inputs))
    return seen


@pytest.mark.parametrize("train_keep_ratio, tokens", [(None, 36), (0.5, 18)])
def test_training_filters_only_when_the_flag_says_so(manifest, tmp_path, monkeypatch, train_keep_ratio, tokens):
    seen = record_visual_tokens(monkeypatch)
    out = tmp_path / "run"
    train_mllm(mllm_train_config({"data": manifest, "out": out, **TINY_RUN, "train_keep_ratio": train_keep_ratio}))
    for stage in ("train", "val"):
        assert seen[stage] and set(seen[stage]) <= {0, tokens}, (stage, seen[stage])
        assert tokens in seen[stage]
    assert json.loads((out / "config.json").read_text())["training"]["train_keep_ratio"] == train_keep_ratio


def test_token_dropout_thins_training_images_only(manifest, tmp_path, monkeypatch):
    seen = record_visual_tokens(monkeypatch)
    out = tmp_path / "run"
    train_mllm(mllm_train_config({"data": manifest, "out": out, **TINY_RUN, "epochs": 2, "token_dropout": 0.25}))
    images = [n for n in seen["train"] if n]
    assert set(seen["val"]) <= {0, PATCHES} and PATCHES in seen["val"], "val reads whole images"
    assert all(math.ceil(0.25 * PATCHES) <= n <= PATCHES for n in images)
    assert PATCHES in images and any(n < PATCHES for n in images), images
    assert json.loads((out / "config.json").read_text())["training"]["token_dropout"] == 0.25
    with pytest.raises(SentilensError, match="not both"):
        train_mllm(mllm_train_config({"data": manifest, "out": tmp_path / "b", **TINY_RUN, "token_dropout": 0.25,
                                      "train_keep_ratio": 0.5}))
    with pytest.raises(SentilensError, match="LLaVA-1.5 only"):
        train_mllm(mllm_train_config({"data": manifest, "out": tmp_path / "c", **TINY_RUN, "token_dropout": 0.25,
                                      "base_model": "tiny:smolvlm"}))


def test_sweep_writes_table_4_and_the_plot(full_run, manifest):
    result = CliRunner().invoke(app, ["sweep", "--run", str(full_run), "--data", str(manifest), "--ratios",
                                      "0.5,0.05", "--strategy", "all,feature+merge", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((full_run / "sweep.json").read_text())
    rows = sweep["rows"]
    assert [(r["strategy"], r["ratio"]) for r in rows] == [
        ("all", 1.0), ("all", 0.5), ("all", 0.05), ("feature+merge", 1.0), ("feature+merge", 0.5),
        ("feature+merge", 0.05)]
    assert [r["kept_tokens"] for r in rows] == [36, 18, 2] * 2
    assert [r["reference_run"] for r in rows] == [True, False, False] * 2
    assert all(r["speedup"] == r["end_to_end_speedup"] == 1.0 for r in rows if r["ratio"] == 1.0)
    for row in rows:  # one pass: the speedup is the ratio of model times (decoding left out), end to end of the calls
        reference = next(r for r in rows if r["strategy"] == row["strategy"] and r["ratio"] == 1.0)
        assert row["speedup"] == pytest.approx(reference["total_ms"] / row["total_ms"], rel=1e-6)
        assert row["end_to_end_speedup"] == pytest.approx(
            reference["latency_ms_per_post"] / row["latency_ms_per_post"], rel=1e-6)
        assert row["speedup_of_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    assert all(0 <= r["accuracy"] <= 1 and r["latency_ms_per_post"] > 0 for r in rows)
    for row in rows:  # the time split: image decoding apart, vision + LM prefill inside the total
        assert row["vision_ms"] > 0 and row["lm_ms"] > 0 and row["total_ms"] > 0 and row["image_decode_ms"] > 0
        assert row["vision_ms"] + row["lm_ms"] <= row["total_ms"] * 1.001
        # the whole call = the split's total + the image decoding (one pass, repeats = 1)
        assert row["total_ms"] + row["image_decode_ms"] == pytest.approx(row["latency_ms_per_post"], rel=1e-6)
        assert 0 < row["selection_ms"] < row["vision_ms"], row  # the CLS scoring + the pick, inside the tower stage
        assert "kept_tokens_per_layer" not in row, "a vision-stage method's tokens are the same in every LM layer"
    assert "selection" not in sweep and all("selected" not in r for r in rows)
    assert sweep["n"] == 8 and sweep["split"] == "test"
    with Image.open(full_run / "plots" / "sweep.png") as plot:
        assert plot.size == (1100, 420)


def test_sweep_every_runs_each_registered_method_a_llava_run_can_run(full_run, manifest):
    """LLaVA-1.5 runs every method of the registry (the family every method supports), each at the budget."""
    result = CliRunner().invoke(app, ["sweep", "--run", str(full_run), "--data", str(manifest), "--ratios", "0.5",
                                      "--strategy", "every", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((full_run / "sweep.json").read_text())
    names = ["all", "feature", "all+merge", "all+native", "random", "random+native", "inverse", "lm:0", "divprune",
             "downsample", "fastv:0", "dart:0", "visionzip", "cdpruner", "dpp"]
    assert [(r["strategy"], r["ratio"]) for r in sweep["rows"]] == [(n, r) for n in names for r in (1.0, 0.5)]
    assert "refused_strategies" not in sweep
    vision = {r["strategy"]: r["kept_tokens"] for r in sweep["rows"] if r["ratio"] == 0.5
              and not r["strategy"].startswith(("lm:", "fastv", "dart"))}
    assert set(vision.values()) == {18}, vision  # ceil(0.5 x 36) for every vision-stage method
    layers = load_predictor(full_run).lm_layers()
    for row in sweep["rows"]:
        assert row["selection_ms"] >= 0
        if row["strategy"].startswith(("lm:", "fastv", "dart")):  # K = 0: layer 0 sees all 36, the others the kept
            assert row["kept_tokens_per_layer"] == [36] + [row["kept_tokens"]] * (layers - 1)
            assert row["selection_ms"] < row["lm_ms"]
        else:
            assert "kept_tokens_per_layer" not in row


def test_sweep_selection_cost_times_the_method_s_own_choosing(full_run, manifest, monkeypatch):
    """A method made slower in its own scoring by a known 20 ms an image shows it in selection_ms, not elsewhere."""
    from sentilens.mllm.pruning import DiversityPrune, parse_strategy
    from sentilens.mllm.sweep import run_sweep

    plain = DiversityPrune.batch_unit_scores

    def slow(self, units):  # the family hands the call's images over together: 20 ms for each
        time.sleep(0.02 * len(units))
        return plain(self, units)

    posts = read_split(manifest, "test")
    images = sum(1 for p in posts if p.image)
    predictor = load_predictor(full_run)
    before = {r["ratio"]: r for r in run_sweep(predictor, posts, [0.5], [parse_strategy("divprune")], 1)["rows"]}
    monkeypatch.setattr(DiversityPrune, "batch_unit_scores", slow)
    after = {r["ratio"]: r for r in run_sweep(predictor, posts, [0.5], [parse_strategy("divprune")], 1)["rows"]}
    for ratio in (1.0, 0.5):
        added = after[ratio]["selection_ms"] - before[ratio]["selection_ms"]
        assert added >= 20 * images / len(posts) * 0.95, (ratio, added)
        assert after[ratio]["selection_ms"] < after[ratio]["vision_ms"]


def test_select_on_val_chooses_on_val_and_reports_on_test(full_run, manifest):
    ratios = [1.0, 0.5, 0.05]
    result = CliRunner().invoke(app, ["sweep", "--run", str(full_run), "--data", str(manifest), "--ratios",
                                      "1,0.5,0.05", "--repeats", "1", "--select-on", "val"])
    assert result.exit_code == 0, result.output
    assert "chosen on val" in result.output
    sweep = json.loads((full_run / "sweep.json").read_text())
    predictor = load_predictor(full_run)
    val = read_split(manifest, "val")
    f1 = {r: evaluate(predictor, val, keep_ratio=r)["weighted_f1"] for r in ratios}
    expected = min(r for r in ratios if f1[r] == max(f1.values()))  # ties: fewer tokens
    chosen = sweep["selection"]
    assert (chosen["on"], chosen["ratio"], chosen["strategy"], chosen["n"]) == ("val", expected, "all", len(val))
    assert [c["weighted_f1"] for c in chosen["candidates"]] == pytest.approx([f1[r] for r in ratios])
    assert [row["ratio"] for row in sweep["rows"] if row["selected"]] == [expected]
    test_metrics = evaluate(predictor, read_split(manifest, "test"), keep_ratio=expected)
    assert chosen["test"]["weighted_f1"] == pytest.approx(test_metrics["weighted_f1"])
    same = CliRunner().invoke(app, ["sweep", "--run", str(full_run), "--data", str(manifest), "--select-on", "test"])
    assert same.exit_code != 0 and "choose on another one" in str(same.exception)


def test_report_chooses_the_method_per_budget_on_the_sweep_s_val_rows(full_run, manifest, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "--run", str(full_run), "--data", str(manifest), "--ratios", "0.5",
                                 "--strategy", "all,random", "--repeats", "1", "--select-on", "val"])
    assert result.exit_code == 0, result.output
    candidates = json.loads((full_run / "sweep.json").read_text())["selection"]["candidates"]
    val = {c["strategy"]: c["weighted_f1"] for c in candidates if c["ratio"] == 0.5}
    expected = "all" if val["all"] >= val["random"] else "random"  # ties: the method listed first
    result = runner.invoke(app, ["report", "--runs", str(full_run), "--out", str(tmp_path / "r"), "--split", "val"])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"| 0.5 | `{expected}` | {val[expected]:.3f} |" in report  # the default: chosen on val
    assert (tmp_path / "r" / "plots" / "methods-full.png").is_file()
    result = runner.invoke(app, ["report", "--runs", str(full_run), "--out", str(tmp_path / "t"), "--split", "val",
                                 "--select-on", "train"])
    assert result.exit_code == 0, result.output
    assert "This sweep holds no train rows" in (tmp_path / "t" / "report.md").read_text()


def test_sweep_rejects_bad_ratios(full_run, manifest):
    result = CliRunner().invoke(app, ["sweep", "--run", str(full_run), "--data", str(manifest), "--ratios", "0.5,1.5"])
    assert result.exit_code != 0
    assert "keep ratio must be in (0, 1]" in str(result.exception)


def test_explain_draws_heatmap_and_mask_with_the_predicted_label(full_run, manifest, tmp_path):
    post = next(p for p in read_split(manifest, "test") if p.image)
    out = tmp_path / "heat.png"
    result = CliRunner().invoke(app, ["explain", "--run", str(full_run), "--image", post.image, "--text", post.text,
                                      "--out", str(out), "--keep-ratio", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kept_patches"] == 9 and info["patches"] == PATCHES
    expected = load_predictor(full_run).predict([post], keep_ratio=0.25)[0]
    assert info["label"] == expected.label
    with Image.open(out) as png:
        assert png.size == (1000, 500)


def test_explain_shows_the_padding_of_a_wide_image_as_padding(full_run, tmp_path):
    config = json.loads((full_run / "config.json").read_text())
    assert config["prompt"]["image_aspect"] == "pad" == config["training"]["image_aspect"], "tiny runs pad"
    wide = tmp_path / "wide.png"
    Image.new("RGB", (192, 96), (200, 30, 30)).save(wide)
    out = tmp_path / "heat.png"
    result = CliRunner().invoke(app, ["explain", "--run", str(full_run), "--image", str(wide), "--out", str(out),
                                      "--keep-ratio", "1", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    # 192 x 96 padded to 192 x 192, seen at 96 px: the image covers rows 24..72; patch rows 0 and 5 (16 px each)
    # lie wholly in the padding, 2 rows x 6 patches; at r = 1 every patch is kept, padding included
    assert info["content_box"] == [0.0, 24.0, 96.0, 72.0]
    assert info["padding_patches"] == 12 and info["padding_patches_kept"] == 12
    with Image.open(out) as png:
        assert png.size == (1000, 500)


def test_prediction_stages_are_recorded_only_when_asked(full_run, manifest):
    from sentilens.stages import record_stages

    predictor = load_predictor(full_run)
    posts = read_split(manifest, "test")
    with record_stages() as stages:
        predictor.predict(posts, keep_ratio=0.5)
    # "select": the CLS scoring the tower pass adds and the pick, inside "vision"
    assert set(stages) == {"image", "vision", "lm", "select"} and all(v > 0 for v in stages.values())
    assert stages["select"] < stages["vision"]
    predictor.predict(posts, keep_ratio=0.5)
    assert set(stages) == {"image", "vision", "lm", "select"}, "nothing is recorded outside record_stages"
    text_only = [p for p in posts if p.image is None]
    with record_stages() as stages:
        predictor.predict(text_only)
    assert "vision" not in stages, "a text-only post never runs the vision tower"
