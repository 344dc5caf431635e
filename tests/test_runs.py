"""The one run-directory format: both families write the same files, and runs of the earlier layout
either load as they are or get a one-line error saying how to convert them (which then works)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fusion_helpers import save_tiny_gpt2, save_tiny_resnet
from mllm_helpers import FAST_TINY, small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split
from sentilens.errors import SentilensError
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.model import FusionModel
from sentilens.fusion.train import resume_fusion, train_fusion
from sentilens.mllm.train import mllm_train_config, train_mllm
from sentilens.predict import load_predictor
from sentilens.runs import load_weights, read_json, save_weights

pytestmark = pytest.mark.slow  # trains real models: left out of `make test-fast`, run by `make test`


runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, n_test=8)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    return str(save_tiny_gpt2(folder / "gpt2")), str(save_tiny_resnet(folder / "resnet"))


def fusion_config(encoders, epochs):
    return FusionConfig(text_encoder=encoders[0], image_encoder=encoders[1], image_size=64, epochs=epochs,
                        batch_size=4, seed=3)


def test_both_families_write_the_same_files(data, encoders, tmp_path):
    train_fusion(fusion_config(encoders, 2), data, tmp_path / "fusion", device="cpu")
    train_mllm(mllm_train_config({"data": data, "out": tmp_path / "mllm", **FAST_TINY, "epochs": 2}))
    for run in ("fusion", "mllm"):
        result = runner.invoke(app, ["eval", "--run", str(tmp_path / run), "--data", str(data), "--json"])
        assert result.exit_code == 0, result.output
    names = {run: sorted(p.name for p in (tmp_path / run).iterdir() if p.name != "base-model")
             for run in ("fusion", "mllm")}
    assert names["fusion"] == names["mllm"] == ["config.json", "history.json", "metrics-test.json", "metrics-val.json",
                                                "model.safetensors", "plots", "predictions-val.jsonl"]
    assert [sorted(p.name for p in (tmp_path / run / "plots").iterdir()) for run in ("fusion", "mllm")] == [
        ["training.png"], ["training.png"]]
    for run in ("fusion", "mllm"):
        config, history = read_json(tmp_path / run / "config.json"), read_json(tmp_path / run / "history.json")
        assert config["labels"] == ["positive", "neutral", "negative"]  # the one place labels are kept
        assert [r["epoch"] for r in history] == [1, 2]
        assert all(set(r) == {"epoch", "train_loss", "seconds", "val", "steps"} for r in history)
        assert all(set(step) == {"step", "loss", "lr"} for r in history for step in r["steps"])
        assert [step["step"] for r in history for step in r["steps"]] == list(
            range(1, 1 + sum(len(r["steps"]) for r in history)))  # global steps, counted on across epochs
        assert set(history[0]["val"]) == {"accuracy", "weighted_f1", "macro_f1"}
        rows = [json.loads(line) for line in (tmp_path / run / "predictions-val.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [p.id for p in read_split(data, "val")]
        assert all(r["label"] in config["labels"] for r in rows)


def write_legacy_checkpoint(run, model_weights: dict, optimizer: dict, state: dict) -> None:
    """The fusion layout before the shared format: one checkpoint.safetensors (``model.*`` and ``optimizer.*``
    tensors, the scalar state as JSON metadata) and labels.json beside config.json."""
    tensors = {f"model.{k}": v for k, v in model_weights.items()}
    tensors.update({f"optimizer.{pid}.{name}": value for pid, entry in optimizer["state"].items()
                    for name, value in entry.items()})
    save_weights(run / "checkpoint.safetensors", tensors,
                 metadata={"state": json.dumps({**state, "param_groups": optimizer["param_groups"]})})
    (run / "labels.json").write_text(json.dumps(read_json(run / "config.json")["labels"]))


def test_an_old_fusion_run_predicts_and_resumes_after_upgrade_run(data, encoders, tmp_path, monkeypatch):
    straight = train_fusion(fusion_config(encoders, 3), data, tmp_path / "straight", device="cpu")

    forward, calls = FusionModel.forward, {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # in epoch 2 of 3: 2 training batches + 1 validation batch per epoch
            raise KeyboardInterrupt
        return forward(model, batch)

    monkeypatch.setattr(FusionModel, "forward", interrupted)
    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        train_fusion(fusion_config(encoders, 3), data, old, device="cpu")
    monkeypatch.setattr(FusionModel, "forward", forward)
    # Rewrite the interrupted run in the earlier layout.
    state = read_json(old / "resume" / "state.json")
    moments: dict = {}
    for key, value in load_weights(old / "resume" / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    history = [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_weighted_f1": r["val"]["weighted_f1"]}
               for r in read_json(old / "history.json")]
    write_legacy_checkpoint(old, load_weights(old / "resume" / "trainable.safetensors"),
                            {"state": moments, "param_groups": state["param_groups"]},
                            {"epoch": 1, "best_epoch": 1, "best_val_weighted_f1": history[0]["val_weighted_f1"],
                             "history": history})
    for name in ("resume", "history.json"):
        path = old / name
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()

    posts = read_split(data, "test")
    assert [p.label for p in load_predictor(old, device="cpu").predict(posts)]  # predicts as it is
    with pytest.raises(SentilensError, match="sentilens upgrade-run --run") as err:
        resume_fusion(old, data, device="cpu")
    assert "\n" not in str(err.value) and "checkpoint.safetensors" in str(err.value)

    result = runner.invoke(app, ["upgrade-run", "--run", str(old)])
    assert result.exit_code == 0, result.output
    assert not (old / "checkpoint.safetensors").exists() and not (old / "labels.json").exists()
    resume_fusion(old, data, device="cpu")
    a, b = load_weights(tmp_path / "straight" / "model.safetensors"), load_weights(old / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(old / "metrics-test.json") == straight["test"]
    result = runner.invoke(app, ["upgrade-run", "--run", str(old)])
    assert result.exit_code == 0 and "already in the current layout" in result.output


def test_a_run_with_disagreeing_labels_is_not_upgraded_silently(data, encoders, tmp_path):
    train_fusion(fusion_config(encoders, 1), data, tmp_path / "run", device="cpu")
    (tmp_path / "run" / "labels.json").write_text('["a", "b"]')
    result = runner.invoke(app, ["upgrade-run", "--run", str(tmp_path / "run")])
    assert isinstance(result.exception, SentilensError) and "labels.json" in str(result.exception)
