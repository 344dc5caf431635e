"""Ensemble runs (``sentilens ensemble``, ``sentilens/ensemble/``): the weighted mean of the members' own
probabilities, checked against the members loaded on their own, the decision offsets against the rule
computed here, and one-line refusals that leave nothing behind."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from fusion_helpers import save_tiny_gpt2, save_tiny_resnet, subset_manifest
from mllm_helpers import small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split
from sentilens.decision import tune_offsets
from sentilens.ensemble.build import build_ensemble
from sentilens.errors import SentilensError
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.train import train_fusion
from sentilens.metrics import classification_metrics
from sentilens.predict import Predictor, describe_run, load_predictor

pytestmark = pytest.mark.slow  # trains real (tiny) models: left out of `make test-fast`, run by `make test`


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A manifest and two tiny fusion runs that disagree: another variant, another seed."""
    folder = tmp_path_factory.mktemp("ensemble")
    source = small_manifest(folder / "source", n_train=16, n_val=8, n_test=8, mixed=True)
    data = subset_manifest(source, folder / "data")
    encoders = {"text_encoder": str(save_tiny_gpt2(folder / "gpt2")),
                "image_encoder": str(save_tiny_resnet(folder / "resnet")), "image_size": 64, "batch_size": 8}
    runs = []
    for name, variant, seed in (("full", "full", 0), ("text", "text", 1)):
        train_fusion(FusionConfig(variant=variant, seed=seed, epochs=2, **encoders), data, folder / name, device="cpu")
        runs.append(folder / name)
    return data, runs


def member_probabilities(runs, posts):
    """Each original run's probabilities, from its own predictor: the reference the ensemble must match."""
    stacked = []
    for run in runs:
        predictor = load_predictor(run, device="cpu")
        stacked.append([[p.probabilities[label] for label in predictor.labels] for p in predictor.predict(posts)])
    return np.array(stacked), predictor.labels


def test_an_ensemble_predicts_the_weighted_mean_of_its_members_probabilities(made, tmp_path):
    data, runs = made
    summary = build_ensemble(runs, tmp_path / "ens", weights=[1.0, 3.0])
    assert sorted(p.name for p in (tmp_path / "ens" / "members").iterdir()) == ["1-full", "2-text"]
    assert summary["weights"] == [1.0, 3.0] and "test" not in summary  # no data given: nothing scored
    posts = read_split(data, "test")
    stacked, labels = member_probabilities(runs, posts)
    assert not np.allclose(stacked[0], stacked[1])  # the members disagree, so the weights matter
    expected = (1.0 * stacked[0] + 3.0 * stacked[1]) / 4.0
    ensemble = load_predictor(tmp_path / "ens", device="cpu")
    assert isinstance(ensemble, Predictor) and ensemble.family == "ensemble" and ensemble.labels == labels
    predictions = ensemble.predict(posts)
    got = np.array([[p.probabilities[label] for label in labels] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [p.label for p in predictions] == [labels[i] for i in expected.argmax(axis=1)]
    described = ensemble.describe()
    assert described["description"].startswith("ensemble of 2 runs: 1-full (weight 1): fusion full (")
    assert "2-text (weight 3): fusion text (" in described["description"]
    assert described["base_model"].count(" | ") == 1 and described["config"]["members"] == 2
    assert describe_run(tmp_path / "ens") == described


def test_offsets_chosen_on_val_are_the_rule_applied_to_the_mean_and_eval_agrees(made, tmp_path):
    data, runs = made
    summary = build_ensemble(runs, tmp_path / "ens", data_dir=data, tune_decision=True)
    val, test = read_split(data, "val"), read_split(data, "test")
    stacked, labels = member_probabilities(runs, val)
    mean = stacked.mean(axis=0)
    truth = np.array([labels.index(p.label) for p in val])
    offsets, before, after = tune_offsets(mean, truth)
    config = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert config["decision_offsets"] == offsets and config["family"] == "ensemble"
    assert summary["decision"]["val_weighted_f1_argmax"] == before and summary["decision"]["val_weighted_f1_tuned"] \
        == after >= before
    # the test split under the offsets, by hand: softmax(log mean + b)
    test_mean = member_probabilities(runs, test)[0].mean(axis=0)
    scores = np.log(test_mean) + np.array(offsets)
    by_hand = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    predicted = [labels[i] for i in by_hand.argmax(axis=1)]
    expected = classification_metrics([p.label for p in test], predicted, labels)["weighted_f1"]
    saved = json.loads((tmp_path / "ens" / "metrics-test.json").read_text())
    assert saved["weighted_f1"] == pytest.approx(expected) == summary["test"]["weighted_f1"]
    result = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "ens"), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weighted_f1"] == pytest.approx(expected)
    output = tmp_path / "predictions.jsonl"
    result = CliRunner().invoke(app, ["predict", "--run", str(tmp_path / "ens"), "--input",
                                      str(data / "test.jsonl"), "--output", str(output)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    np.testing.assert_allclose([[r["probabilities"][label] for label in labels] for r in rows], by_hand, atol=1e-6)
    result = CliRunner().invoke(app, ["report", "--runs", str(tmp_path / "ens"), "--runs", str(runs[0]),
                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 runs" in (tmp_path / "report" / "report.md").read_text()


def test_the_ensemble_folder_stands_alone(made, tmp_path):
    data, runs = made
    copies = [tmp_path / "a", tmp_path / "b"]
    for run, copy in zip(runs, copies, strict=True):
        shutil.copytree(run, copy)
    build_ensemble(copies, tmp_path / "ens")
    posts = read_split(data, "test")
    before = [p.probabilities for p in load_predictor(tmp_path / "ens", device="cpu").predict(posts)]
    for copy in copies:
        shutil.rmtree(copy)  # the members were copied in: the sources can go
    assert [p.probabilities for p in load_predictor(tmp_path / "ens", device="cpu").predict(posts)] == before


def test_the_ensemble_offers_only_label_probabilities(made, tmp_path):
    data, runs = made
    build_ensemble(runs, tmp_path / "ens")
    ensemble = load_predictor(tmp_path / "ens", device="cpu")
    can = ensemble.capabilities
    assert (can.supports_keep_ratio, can.supports_explain, can.decodings, can.strategies, can.runtimes) == \
        (False, False, ("score",), (), ())
    assert ensemble.with_options(decode="score") is ensemble
    for options in ({"decode": "generate"}, {"strategy": "feature"}):
        with pytest.raises(SentilensError, match="not supported by this ensemble run"):
            ensemble.with_options(**options)
    post = read_split(data, "test")[0]
    with pytest.raises(SentilensError, match="keep-ratio"):
        ensemble.predict([post], keep_ratio=0.5)
    with pytest.raises(SentilensError, match="explain"):
        ensemble.explain(post, 0.5)
    with pytest.raises(SentilensError, match="--runtime onnx is not supported by this ensemble run"):
        load_predictor(tmp_path / "ens", runtime="onnx")


def relabelled(run, folder, labels):
    copy = folder / f"relabelled-{run.name}"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["labels"] = labels(config["labels"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("case", ["one run", "labels differ", "not empty", "inside a member", "weights",
                                  "negative weight", "offsets without data", "not a run", "unfinished"])
def test_a_bad_ensemble_is_one_line_and_leaves_nothing(made, tmp_path, case):
    data, runs = made
    out = tmp_path / "ens"
    args, message = [], ""
    if case == "one run":
        args, message = ["--run", str(runs[0])], "needs at least two runs"
    elif case == "labels differ":
        other = relabelled(runs[1], tmp_path, lambda labels: labels[::-1])
        args, message = ["--run", str(runs[0]), "--run", str(other)], "differ from the first run's"
    elif case == "not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args, message = ["--run", str(runs[0]), "--run", str(runs[1])], "not an empty folder"
    elif case == "inside a member":
        out = runs[0] / "ensemble"
        args, message = ["--run", str(runs[0]), "--run", str(runs[1])], "lies inside this member run"
    elif case == "weights":
        args, message = ["--run", str(runs[0]), "--run", str(runs[1]), "--weight", "1"], "1 weights for 2 members"
    elif case == "negative weight":
        args, message = ["--run", str(runs[0]), "--run", str(runs[1]), "--weight", "1", "--weight", "-1"], \
            "above zero"
    elif case == "offsets without data":
        args, message = ["--run", str(runs[0]), "--run", str(runs[1]), "--tune-decision"], "give --data"
    elif case == "not a run":
        args, message = ["--run", str(runs[0]), "--run", str(data)], "not a run directory"
    elif case == "unfinished":
        unfinished = tmp_path / "unfinished"
        shutil.copytree(runs[1], unfinished)
        (unfinished / "resume").mkdir()
        (unfinished / "resume" / "state.json").write_text("{}")  # what a run stopped between epochs holds
        args, message = ["--run", str(runs[0]), "--run", str(unfinished)], "has not finished training"
    result = CliRunner().invoke(app, ["ensemble", *args, "--out", str(out)])
    assert result.exit_code != 0 and isinstance(result.exception, SentilensError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    if case == "not empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]  # the user's file, nothing added
    else:
        assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".building-" in p.name]


def test_a_damaged_ensemble_names_the_member(made, tmp_path):
    data, runs = made
    build_ensemble(runs, tmp_path / "ens")
    members = tmp_path / "ens" / "members"
    config = json.loads((members / "2-text" / "config.json").read_text())
    config["labels"] = config["labels"][::-1]
    (members / "2-text" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SentilensError, match="differ from the ensemble's") as found:
        load_predictor(tmp_path / "ens", device="cpu")
    assert found.value.path == str(members / "2-text" / "config.json")
    shutil.rmtree(members / "2-text")
    with pytest.raises(SentilensError, match="member '2-text' is missing"):
        load_predictor(tmp_path / "ens", device="cpu")


def test_the_service_serves_an_ensemble_as_any_run(made, tmp_path):
    from fastapi.testclient import TestClient

    from sentilens.data.records import Post
    from sentilens.serve.app import create_app

    data, runs = made
    build_ensemble(runs, tmp_path / "ens")
    text = "worst day ever, everything went wrong"
    expected = load_predictor(tmp_path / "ens", device="cpu").predict([Post("p", text, None)])[0]
    with TestClient(create_app(tmp_path / "ens"), base_url="http://127.0.0.1") as client:
        info = client.get("/v1/model").json()
        assert info["family"] == "ensemble" and info["run"] == "ens" and info["supports_keep_ratio"] is False
        answer = client.post("/v1/predict", json={"text": text})
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] == expected.label
        assert answer.json()["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
        refused = client.post("/v1/predict", json={"text": text, "keep_ratio": 0.5})
        assert refused.status_code == 422 and "keep" in refused.text, refused.text


def test_the_ensemble_command_prints_the_scores_and_the_offsets(made, tmp_path):
    data, runs = made
    result = CliRunner().invoke(app, ["ensemble", "--run", str(runs[0]), "--run", str(runs[1]), "--weight", "2",
                                      "--weight", "1", "--out", str(tmp_path / "ens"), "--data", str(data),
                                      "--tune-decision"])
    assert result.exit_code == 0, result.output
    assert "on val" in result.stdout and "on test" in result.stdout
    assert "decision offsets chosen on val: positive +0.0" in result.stdout
    assert "ensemble of 2 runs saved in" in result.stdout
    config = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert config["weights"] == [2.0, 1.0] and len(config["decision_offsets"]) == 3
    result = CliRunner().invoke(app, ["ensemble", "--run", str(runs[0]), "--run", str(runs[1]), "--out",
                                      str(tmp_path / "plain"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["members"] == {"1-full": str(runs[0]), "2-text": str(runs[1])}
