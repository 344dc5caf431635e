"""The paper's recipe (configs/mvsa_single_llava15_7b_paper.yaml): Table 1's bare question, generated
labels, and `eval --compare-decodings` reporting how often generation and label scoring agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mllm_helpers import FAST_TINY, small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split
from sentilens.metrics import classification_metrics
from sentilens.mllm.train import mllm_train_config, train_mllm
from sentilens.predict import load_predictor

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "mvsa_single_llava15_7b_paper.yaml"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, n_test=8)


@pytest.fixture(scope="module")
def paper_run(manifest, tmp_path_factory):
    """The tiny model trained with the paper recipe's prompt and decoding (one epoch)."""
    out = tmp_path_factory.mktemp("runs") / "paper"
    options = {"data": manifest, "out": out, **FAST_TINY, "epochs": 1, "gradient_checkpointing": False}
    train_mllm(mllm_train_config(options, PAPER))
    return out


def test_paper_recipe_has_the_papers_hyper_parameters(tmp_path):
    config = mllm_train_config({"data": tmp_path, "out": tmp_path / "run"}, PAPER)
    assert config.base_model == "llava-hf/llava-1.5-7b-hf" and config.mode == "full"
    assert (config.learning_rate, config.epochs, config.global_batch_size) == (2e-5, 10, 16)
    assert (config.question, config.label_list, config.decode) == (
        "What is the sentiment of the given text?", False, "generate")
    assert config.image_aspect == "pad"


def test_paper_run_asks_the_bare_question_and_generates(paper_run, manifest):
    config = json.loads((paper_run / "config.json").read_text())
    assert config["decode"] == "generate" and config["prompt"]["label_list"] is False
    predictor = load_predictor(paper_run)
    prompt = predictor.builder.render("a sunny day", has_image=True)
    assert prompt.endswith("What is the sentiment of the given text? ASSISTANT:"), prompt
    assert "Answer with one of" not in prompt
    saved = [json.loads(line) for line in (paper_run / "predictions-val.jsonl").read_text().splitlines()]
    assert all("answer" in row["extra"] for row in saved), "validation decodes as the run does: by generation"


def test_eval_reports_the_agreement_of_both_decodings(paper_run, manifest):
    result = CliRunner().invoke(app, ["eval", "--run", str(paper_run), "--data", str(manifest), "--split", "test",
                                      "--compare-decodings", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    posts = read_split(manifest, "test")
    predictor = load_predictor(paper_run)
    generated = predictor.with_options(decode="generate").predict(posts)
    scored = predictor.with_options(decode="score").predict(posts)
    truth = [p.label for p in posts]
    agree = sum(g.label == s.label for g, s in zip(generated, scored, strict=True)) / len(posts)
    compared = metrics["decodings"]
    assert compared["agreement"] == pytest.approx(agree)
    for name, predictions in (("generate", generated), ("score", scored)):
        expected = classification_metrics(truth, [p.label for p in predictions], predictor.labels)
        assert compared[name]["accuracy"] == pytest.approx(expected["accuracy"])
        assert compared[name]["weighted_f1"] == pytest.approx(expected["weighted_f1"])
    assert metrics["accuracy"] == compared["generate"]["accuracy"], "the headline is the run's own decoding"
    assert compared["generate"]["unparsable"] == sum(not p.extra["parsed"] for p in generated)


def test_both_families_merge_a_recipe_and_the_command_line_alike(tmp_path):
    """One rule: a given option replaces the recipe's value, an option left out (None) keeps it."""
    from sentilens.fusion.config import recipe_config

    fusion = recipe_config(REPO / "configs" / "fusion_crisismmd.yaml", {"image_size": 64, "text_lr": None})
    assert (fusion.image_size, fusion.text_lr, fusion.variant) == (64, 2e-5, "full")
    mllm = mllm_train_config({"data": tmp_path, "out": tmp_path / "run", "epochs": 2, "learning_rate": None},
                             REPO / "configs" / "mvsa_single_llava15_7b.yaml")
    assert (mllm.epochs, mllm.learning_rate, mllm.base_model) == (2, 2e-5, "llava-hf/llava-1.5-7b-hf")
