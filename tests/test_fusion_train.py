"""Training the fusion family end to end on the synthetic set, through the CLI where a user would.

One module-level ablation (text, image, full) fills a feature cache that the other tests reuse.
Images are drawn at 64 px and encoded at 64 px so the whole module stays within seconds on a CPU.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from fusion_helpers import EncoderCalls, save_tiny_gpt2, save_tiny_resnet, subset_manifest  # noqa: F401
from sentilens.cli import app
from sentilens.data.records import read_manifest, read_split, read_stats
from sentilens.data.synth import make_synthetic
from sentilens.errors import SentilensError
from sentilens.fusion.cache import FeatureCache
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.model import FusionModel
from sentilens.fusion.predictor import FusionPredictor
from sentilens.fusion.train import resume_fusion, train_fusion
from sentilens.predict import evaluate, load_predictor
from sentilens.runs import load_history, load_weights, read_json

pytestmark = pytest.mark.slow  # trains real models: left out of `make test-fast`, run by `make test`


SIZE = 64
runner = CliRunner()



@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    make_synthetic(folder, n=400, seed=0, image_size=SIZE)
    return folder


@pytest.fixture(scope="module")
def ablation(synth, tmp_path_factory):
    """``sentilens ablate fusion`` on text, image and full, with encoder calls counted."""
    out, cache = tmp_path_factory.mktemp("ablation"), tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SENTILENS_QUIET", "1")
        calls = EncoderCalls(mp)
        result = runner.invoke(app, ["ablate", "fusion", "--data", str(synth), "--out", str(out), "--variants",
                                     "text,image,full", "--image-size", str(SIZE), "--epochs", "8",
                                     "--cache", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    return {"out": out, "cache": cache, "calls": calls, "json": json.loads(result.stdout)}


def test_full_beats_each_modality_by_the_margin_the_synthetic_set_guarantees(synth, ablation):
    ceilings = read_stats(synth)["source"]["ceilings"]
    accuracy = {row["variant"]: row["accuracy"] for row in ablation["json"]["variants"]}
    # By construction one modality reaches at most 55 % (text) / 70 % (image) and both 100 %: a 30-point gap.
    # Half of it is required, leaving room for a 40-post test split and a short training.
    margin = (ceilings["both"] - max(ceilings["text_only"], ceilings["image_only"])) / 2
    assert accuracy["full"] >= max(accuracy["text"], accuracy["image"]) + margin, accuracy
    assert accuracy["full"] >= ceilings["image_only"] + margin, accuracy


def test_ablation_writes_the_table_and_one_run_per_variant(ablation):
    out, table = ablation["out"], ablation["json"]
    assert read_json(out / "ablation.json") == table
    assert [row["variant"] for row in table["variants"]] == ["probe", "text", "image", "full"]  # the baseline always
    markdown = (out / "ablation.md").read_text()
    for row in table["variants"]:
        assert f"| {row['variant']} |" in markdown and f"{row['accuracy']:.4f}" in markdown
        metrics = read_json(out / row["run"] / "metrics-test.json")
        assert metrics["accuracy"] == row["accuracy"]
        assert read_json(out / row["run"] / "config.json")["variant"] == row["variant"]


def test_ablation_encodes_each_content_once(synth, ablation):
    posts = [p for split in read_manifest(synth).values() for p in split]
    calls = ablation["calls"]
    assert calls.text == len({p.text for p in posts})  # duplicates encoded once, then shared by every variant
    assert calls.image == len(posts)
    assert ablation["json"]["cache"] == {"text_hits": 0, "text_encoded": calls.text, "image_hits": 0,
                                         "image_encoded": calls.image}


def test_a_second_run_reads_every_feature_from_the_cache(synth, ablation, tmp_path, monkeypatch):
    calls = EncoderCalls(monkeypatch)
    summary = train_fusion(FusionConfig(variant="concat", image_size=SIZE, epochs=1), synth, tmp_path / "run",
                           cache=FeatureCache(ablation["cache"]), device="cpu")
    assert (calls.text, calls.image) == (0, 0)
    n = sum(len(split) for split in read_manifest(synth).values())
    assert summary["cache"] == {"text_hits": n, "text_encoded": 0, "image_hits": n, "image_encoded": 0}


def train_until_interrupted(monkeypatch, at_call: int, config, data, run_dir, cache) -> None:
    """``train_fusion`` stopped by a KeyboardInterrupt at the head's ``at_call``-th forward pass (as Ctrl-C would)."""
    forward, calls = FusionModel.forward, {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return forward(model, batch)

    monkeypatch.setattr(FusionModel, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_fusion(config, data, run_dir, cache=cache, device="cpu")
    monkeypatch.setattr(FusionModel, "forward", forward)


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(synth, ablation, tmp_path, monkeypatch):
    cache = FeatureCache(ablation["cache"])
    data = subset_manifest(synth, tmp_path / "small", {"train": 96, "val": 40, "test": 40})
    config = FusionConfig(variant="full", image_size=SIZE, epochs=3, seed=7)
    straight = train_fusion(config, data, tmp_path / "straight", cache=cache, device="cpu")

    # in epoch 2 of 3: 3 training batches + 1 validation batch per epoch
    train_until_interrupted(monkeypatch, 6, config, data, tmp_path / "resumed", cache)
    assert not (tmp_path / "resumed" / "metrics-test.json").exists()
    assert read_json(tmp_path / "resumed" / "resume" / "state.json")["epochs_done"] == 1
    assert len(read_json(tmp_path / "resumed" / "history.json")) == 1
    with pytest.raises(SentilensError, match="--resume"):
        train_fusion(config, data, tmp_path / "resumed", cache=cache, device="cpu")
    resumed = resume_fusion(tmp_path / "resumed", data, cache=cache, device="cpu")

    for name in ("metrics-val.json", "metrics-test.json"):
        assert read_json(tmp_path / "resumed" / name) == read_json(tmp_path / "straight" / name)
    assert resumed["best_epoch"] == straight["best_epoch"]
    a = load_weights(tmp_path / "straight" / "model.safetensors")
    b = load_weights(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def without_time(history):
        return [{k: v for k, v in record.items() if k != "seconds"} for record in history]

    history = read_json(tmp_path / "resumed" / "history.json")
    assert without_time(history) == without_time(read_json(tmp_path / "straight" / "history.json"))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert not (tmp_path / "resumed" / "resume").exists()  # training finished: the resume state is gone


def test_eval_and_predict_through_the_cli_use_the_run_directory(synth, ablation, tmp_path):
    run = ablation["out"] / "full"
    result = runner.invoke(app, ["eval", "--run", str(run), "--data", str(synth), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["confusion"] == read_json(run / "metrics-test.json")["confusion"]
    for key in ("accuracy_ci", "weighted_f1_ci"):
        low, high = evaluated[key]
        assert low <= evaluated[key.removesuffix("_ci")] <= high
        assert evaluated[key] == read_json(run / "metrics-test.json")[key]

    posts = read_split(synth, "test")[:5]
    (tmp_path / "posts.jsonl").write_text("".join(json.dumps({"id": p.id, "text": p.text, "image": p.image}) + "\n"
                                                  for p in posts))
    result = runner.invoke(app, ["predict", "--run", str(run), "--input", str(tmp_path / "posts.jsonl"),
                                 "--output", str(tmp_path / "preds.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    direct = load_predictor(run, device="cpu").predict(posts)
    assert [r["id"] for r in rows] == [p.id for p in posts]
    for row, pred in zip(rows, direct, strict=True):
        assert row["label"] == pred.label == max(row["probabilities"], key=row["probabilities"].get)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert row["kept_tokens"] is None

    result = runner.invoke(app, ["eval", "--run", str(run), "--data", str(synth), "--keep-ratio", "0.5"])
    assert isinstance(result.exception, SentilensError) and "MLLM" in str(result.exception)


def test_a_text_only_manifest_trains_and_evaluates(synth, ablation, tmp_path, monkeypatch):
    data = subset_manifest(synth, tmp_path / "text-only", {"train": 96, "val": 40, "test": 40}, drop_images=True)
    calls = EncoderCalls(monkeypatch)
    result = runner.invoke(app, ["train", "fusion", "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--epochs", "2", "--image-size", str(SIZE), "--cache", str(ablation["cache"]),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert calls.image == 0 and calls.text == 0  # texts are the synthetic set's, already cached
    summary = json.loads(result.stdout)
    assert summary["cache"]["image_hits"] == summary["cache"]["image_encoded"] == 0
    result = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == len(read_split(data, "test"))
    (prediction,) = load_predictor(tmp_path / "run", device="cpu").predict(read_split(data, "test")[:1])
    assert prediction.label in read_stats(data)["labels"]


def test_fine_tuned_gpt2_and_resnet_from_local_folders(synth, tmp_path, monkeypatch):
    gpt2, resnet = save_tiny_gpt2(tmp_path / "gpt2"), save_tiny_resnet(tmp_path / "resnet")
    data = subset_manifest(synth, tmp_path / "small", {"train": 48, "val": 16, "test": 16})
    calls = EncoderCalls(monkeypatch)
    config = FusionConfig(text_encoder=str(gpt2), image_encoder=str(resnet), image_size=SIZE, prompt="sentiment",
                          fine_tune_text=True, fine_tune_image=True, epochs=2, batch_size=16)
    summary = train_fusion(config, data, tmp_path / "run", cache=FeatureCache(tmp_path / "cache"), device="cpu")
    assert calls.text == 0 and calls.image == 0  # fine-tuned encoders run live, never cached
    saved = read_json(tmp_path / "run" / "config.json")
    assert saved["family"] == "fusion" and saved["text_dim"] == 32 and saved["image_dim"] == 16
    weights = load_weights(tmp_path / "run" / "model.safetensors")
    pretrained = load_weights(gpt2 / "model.safetensors")
    tuned = {k.removeprefix("text_encoder."): v for k, v in weights.items() if k.startswith("text_encoder.")}
    assert tuned and not torch.equal(tuned["h.0.attn.c_attn.weight"], pretrained["transformer.h.0.attn.c_attn.weight"])
    cnn = {k.removeprefix("image_encoder."): v for k, v in weights.items() if k.startswith("image_encoder.")}
    cnn_pretrained = load_weights(resnet / "model.safetensors")
    changed = [k for k, v in cnn.items() if k.endswith(".weight") and not torch.equal(v, cnn_pretrained[k])]
    assert cnn.keys() == cnn_pretrained.keys() and changed  # the CNN was trained and saved whole
    predictor = FusionPredictor.from_run(tmp_path / "run", device="cpu")
    metrics = evaluate(predictor, read_split(data, "test"))
    assert metrics["confusion"] == summary["test"]["confusion"]


def test_the_papers_recipe_is_a_valid_config():
    from sentilens.fusion.config import PROMPTS, recipe_config

    config = recipe_config("configs/fusion_crisismmd.yaml", {"epochs": 3})
    assert (config.image_encoder, config.text_encoder, config.variant) == ("microsoft/resnet-50", "gpt2", "full")
    assert config.prompt_template == PROMPTS["informative"]
    assert (config.lr, config.batch_size, config.dropout, config.epochs) == (1e-3, 32, 0.5, 3)
    # the paper trains end to end: both encoders are fine-tuned, each at its own rate
    assert config.fine_tune_text and config.fine_tune_image and config.text_lr < config.image_lr < config.lr


def test_every_fusion_recipe_is_a_valid_config():
    from pathlib import Path

    from sentilens.fusion.config import recipe_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("fusion_*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        recipe_config(recipe, {})  # raises with the recipe's name on a bad field
    tweets = recipe_config("configs/fusion_tweets_mpnet.yaml", {"epochs": 1})
    assert (tweets.text_encoder, tweets.text_top_layers, tweets.tune_decision, tweets.epochs) == (
        "all-mpnet-base-v2", 1, True, 1)


def test_balanced_class_weights_are_n_over_k_times_count():
    from sentilens.data.records import Post
    from sentilens.fusion.train import _class_weights

    labels = ["positive"] * 6 + ["neutral"] * 3 + ["negative"]
    posts = [Post(str(i), "t", None, label) for i, label in enumerate(labels)]
    config = FusionConfig(labels=["positive", "neutral", "negative"], class_weight="balanced")
    assert _class_weights(config, posts, "cpu").tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert _class_weights(config.model_copy(update={"class_weight": "none"}), posts, "cpu") is None


def test_patience_stops_once_validation_stops_improving(synth, ablation, tmp_path):
    data = subset_manifest(synth, tmp_path / "small", {"train": 96, "val": 40, "test": 40})
    config = FusionConfig(variant="text", image_size=SIZE, epochs=30, patience=2, lr=3e-2)
    summary = train_fusion(config, data, tmp_path / "run", cache=FeatureCache(ablation["cache"]), device="cpu")
    assert summary["epochs"] < 30  # a 96-post head at lr 3e-2 stops improving long before 30 epochs
    assert summary["epochs"] - summary["best_epoch"] == 2
    history = [h["val"]["weighted_f1"] for h in load_history(tmp_path / "run")]
    assert len(history) == summary["epochs"]
    assert history[summary["best_epoch"] - 1] == max(history)
    assert all(f1 <= max(history) for f1 in history[summary["best_epoch"]:])


def test_text_top_layers_train_only_the_top_and_predict_like_their_cached_path(synth, tmp_path):
    from safetensors.torch import load_file

    from sentilens.fusion.cache import featurize
    from sentilens.fusion.encoders import embedded_text_path

    data = subset_manifest(synth, tmp_path / "small", {"train": 64, "val": 24, "test": 24}, drop_images=True)
    result = runner.invoke(app, ["train", "fusion", "--data", str(data), "--out", str(tmp_path / "run"), "--variant",
                                 "text", "--epochs", "2", "--text-top-layers", "2", "--cache", str(tmp_path / "cache"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    weights = load_weights(tmp_path / "run" / "model.safetensors")
    pretrained = load_file(embedded_text_path() / "model.safetensors")  # the released file, as published
    tuned = {k.removeprefix("text_encoder."): v for k, v in weights.items() if k.startswith("text_encoder.")}
    # exactly the top two of MiniLM's six layers are saved, named as in the released file, and they moved
    assert tuned.keys() == {k for k in pretrained if k.startswith(("encoder.layer.4.", "encoder.layer.5."))}
    assert any(not torch.equal(v, pretrained[k]) for k, v in tuned.items())
    predictor = load_predictor(tmp_path / "run", device="cpu")
    for k, v in tuned.items():  # the predicting encoder carries them; the layers below are the released ones
        assert torch.equal(predictor.text_encoder.model.state_dict()[k], v)
    assert torch.equal(predictor.text_encoder.model.state_dict()["encoder.layer.3.output.dense.weight"],
                       pretrained["encoder.layer.3.output.dense.weight"])
    posts = read_split(data, "test")
    live = torch.tensor([[p.probabilities[label] for label in predictor.labels] for p in predictor.predict(posts)])
    cached = predictor.probabilities(featurize(posts, *predictor.feature_encoders, None)[0], posts)
    assert torch.allclose(live, cached, atol=1e-5)  # one whole-encoder pass == cached lower states + top layers
    features = featurize(posts, *predictor.feature_encoders, None)[0]
    predictor.text_top.layers.train()  # as training leaves them when it scores val after an epoch
    assert torch.equal(predictor.probabilities(features, posts), predictor.probabilities(features, posts))
    assert torch.allclose(predictor.probabilities(features, posts), cached, atol=1e-6)
    assert evaluate(predictor, posts)["confusion"] == summary["test"]["confusion"]


def test_text_top_layers_resume_where_they_stopped(synth, tmp_path, monkeypatch):
    data = subset_manifest(synth, tmp_path / "small", {"train": 64, "val": 16, "test": 16}, drop_images=True)
    cache = FeatureCache(tmp_path / "cache")
    config = FusionConfig(variant="text", epochs=2, seed=3, text_top_layers=1, batch_size=32)
    train_fusion(config, data, tmp_path / "straight", cache=cache, device="cpu")
    # epoch 2: 2 training batches + 1 validation batch per epoch
    train_until_interrupted(monkeypatch, 4, config, data, tmp_path / "resumed", cache)
    resume_fusion(tmp_path / "resumed", data, cache=cache, device="cpu")
    a = load_weights(tmp_path / "straight" / "model.safetensors")
    b = load_weights(tmp_path / "resumed" / "model.safetensors")
    assert any(k.startswith("text_encoder.encoder.layer.5.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_top_layers_refuse_what_they_cannot_do():
    from pydantic import ValidationError

    for fields in ({"variant": "probe", "text_top_layers": 1}, {"variant": "image", "text_top_layers": 1},
                   {"variant": "text", "text_top_layers": 1, "fine_tune_text": True}):
        with pytest.raises(ValidationError):
            FusionConfig(**fields)


def test_tuned_decision_offsets_are_saved_and_every_prediction_path_applies_them(synth, ablation, tmp_path):
    import numpy as np

    data = subset_manifest(synth, tmp_path / "small", {"train": 96, "val": 60, "test": 60}, drop_images=True)
    # one epoch at a low rate: a weak head, whose plain argmax leaves room for the offsets
    args = ["train", "fusion", "--data", str(data), "--variant", "text", "--epochs", "1", "--lr", "1e-4",
            "--cache", str(ablation["cache"]), "--json"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "tuned"), "--tune-decision"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    labels = read_stats(data)["labels"]
    offsets = read_json(tmp_path / "tuned" / "config.json")["decision_offsets"]
    assert list(summary["decision"]["offsets"]) == labels and list(summary["decision"]["offsets"].values()) == offsets
    assert any(offsets), "the weak head should leave something for the offsets to fix"
    assert summary["decision"]["val_weighted_f1_tuned"] > summary["decision"]["val_weighted_f1_argmax"]
    assert summary["val"]["weighted_f1"] == pytest.approx(summary["decision"]["val_weighted_f1_tuned"])

    # Independent of the predictor's own rule: the untuned probabilities, shifted by hand.
    posts = read_split(data, "test")
    predictor = load_predictor(tmp_path / "tuned", device="cpu")
    live = predictor.predict(posts)
    predictor.set_decision_offsets(None)
    plain = np.array([[p.probabilities[label] for label in labels] for p in predictor.predict(posts)])
    expected = [labels[i] for i in (np.log(plain) + np.array(offsets)).argmax(axis=1)]
    assert [p.label for p in live] == expected
    shifted = np.exp(np.log(plain) + offsets)
    assert np.allclose([[p.probabilities[label] for label in labels] for p in live],
                       shifted / shifted.sum(axis=1, keepdims=True), atol=1e-5)
    result = runner.invoke(app, ["eval", "--run", str(tmp_path / "tuned"), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["confusion"] == summary["test"]["confusion"]

    # The same run trained without the flag, given its offsets afterwards, is the same model.
    from sentilens.fusion.train import choose_run_decision_offsets

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "later")])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "later" / "config.json")["decision_offsets"] is None
    later = choose_run_decision_offsets(tmp_path / "later", data, FeatureCache(ablation["cache"]), device="cpu")
    assert read_json(tmp_path / "later" / "config.json")["decision_offsets"] == offsets
    assert later["test"]["confusion"] == summary["test"]["confusion"]
    assert read_json(tmp_path / "later" / "metrics-test.json")["confusion"] == summary["test"]["confusion"]


def test_offsets_written_by_hand_decide_every_label(synth, ablation, tmp_path):
    data = subset_manifest(synth, tmp_path / "small", {"train": 64, "val": 16, "test": 16}, drop_images=True)
    config = FusionConfig(variant="text", epochs=1)
    train_fusion(config, data, tmp_path / "run", cache=FeatureCache(ablation["cache"]), device="cpu")
    saved = read_json(tmp_path / "run" / "config.json")
    labels = saved["labels"]
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "decision_offsets": [0.0, 50.0, 0.0]}))
    predictions = load_predictor(tmp_path / "run", device="cpu").predict(read_split(data, "test"))
    assert {p.label for p in predictions} == {labels[1]}
