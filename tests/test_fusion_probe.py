"""The ``probe`` variant: a logistic regression on frozen pooled features, stored as a normal run.

Reference: scikit-learn's own ``StandardScaler`` + ``LogisticRegression`` fitted on the same cached
features with the C the run chose; the run's predictor (a torch module rebuilt from safetensors)
must give its ``predict_proba``, for three labels (multinomial) and for two (one coefficient row).
"""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from fusion_helpers import save_tiny_gpt2, save_tiny_resnet, subset_manifest
from sentilens.cli import app
from sentilens.data.records import SPLITS, Post, read_manifest, read_split, write_manifest
from sentilens.data.synth import make_synthetic
from sentilens.errors import SentilensError
from sentilens.fusion.cache import FeatureCache, featurize
from sentilens.fusion.config import parse_fusion_config
from sentilens.fusion.encoders import build_encoders
from sentilens.fusion.probe import C_GRID
from sentilens.predict import load_predictor
from sentilens.runs import load_config

SIZE = 32
runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    make_synthetic(root / "synth", n=240, seed=1, image_size=SIZE)
    data = subset_manifest(root / "synth", root / "data", {"train": 160, "val": 40, "test": 40})
    return {"data": data, "gpt2": save_tiny_gpt2(root / "gpt2"), "resnet": save_tiny_resnet(root / "resnet"),
            "cache": root / "cache"}


def two_label_manifest(src, dst):
    """The synthetic posts without the neutral ones: a two-label task."""
    splits = read_manifest(src)
    kept = {s: [Post(p.id, p.text, p.image, p.label, p.meta) for p in splits[s] if p.label != "neutral"]
            for s in SPLITS}
    write_manifest(dst, kept, ["negative", "positive"])
    return dst


def train_probe(setup, data, out):
    result = runner.invoke(app, ["train", "fusion", "--data", str(data), "--out", str(out), "--variant", "probe",
                                 "--text-encoder", str(setup["gpt2"]), "--image-encoder", str(setup["resnet"]),
                                 "--image-size", str(SIZE), "--cache", str(setup["cache"]), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def sklearn_reference(setup, data, out, c):
    config = parse_fusion_config(load_config(out))
    encoders = build_encoders(config, "cpu")
    splits = read_manifest(data)

    def matrix(split):
        features, _ = featurize(splits[split], *encoders, FeatureCache(setup["cache"]))
        return np.array([np.concatenate([f.text["pooled"].numpy(), f.image["pooled"].numpy()]) for f in features],
                        dtype=np.float64)

    scaler = StandardScaler().fit(matrix("train"))
    model = LogisticRegression(C=c, max_iter=2000, random_state=0).fit(
        scaler.transform(matrix("train")), [p.label for p in splits["train"]])
    return dict(zip(model.classes_, model.predict_proba(scaler.transform(matrix("test"))).T, strict=True))


@pytest.mark.parametrize("labels", [3, 2])
def test_probe_run_predicts_what_scikit_learn_predicts(setup, tmp_path, labels):
    data = setup["data"] if labels == 3 else two_label_manifest(setup["data"], tmp_path / "binary")
    summary = train_probe(setup, data, tmp_path / "run")
    assert summary["probe"]["C"] in C_GRID
    assert [row["C"] for row in summary["probe"]["search"]] == list(C_GRID)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "metrics-test.json", "metrics-val.json", "model.safetensors", "predictions-val.jsonl"]

    reference = sklearn_reference(setup, data, tmp_path / "run", summary["probe"]["C"])
    test = read_split(data, "test")
    predictions = load_predictor(tmp_path / "run", device="cpu").predict(test)
    for label, column in reference.items():
        np.testing.assert_allclose([p.probabilities[label] for p in predictions], column, atol=1e-5)

    result = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["confusion"] == summary["test"]["confusion"]
    assert evaluated["accuracy_ci"][0] <= evaluated["accuracy"] <= evaluated["accuracy_ci"][1]
    if labels == 2:
        assert evaluated["positive_label"] == "positive" and 0 <= evaluated["binary_f1"] <= 1


def test_probe_cannot_fine_tune(setup, tmp_path):
    result = runner.invoke(app, ["train", "fusion", "--data", str(setup["data"]), "--out", str(tmp_path / "run"),
                                 "--variant", "probe", "--fine-tune-text"])
    assert isinstance(result.exception, SentilensError) and "frozen features" in str(result.exception)
    assert not (tmp_path / "run").exists()
