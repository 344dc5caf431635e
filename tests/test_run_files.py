"""Issue 15, run directories: corrupt run files are one-line errors (defect 8), and a run stopped during its first
epoch can be run again (defect 10). Real tiny runs of both families, damaged the way a disk, an editor or an
interrupted job would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm_helpers import FAST_TINY, small_manifest, train_tiny_mllm
from sentilens.errors import SentilensError
from sentilens.fusion.config import FusionConfig
from sentilens.mllm.train import mllm_train_config, train_mllm
from sentilens.predict import load_predictor
from serve_helpers import train_tiny_fusion

pytestmark = pytest.mark.slow  # trains a real tiny model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, n_test=4)


@pytest.fixture(scope="module")
def mllm_run(data, tmp_path_factory):
    return train_tiny_mllm(data, tmp_path_factory.mktemp("runs") / "tiny-mllm")


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    return train_tiny_fusion(tmp_path_factory.mktemp("fusion"))


def damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def edit_config(run: Path, **changes) -> None:
    config = json.loads((run / "config.json").read_text())
    config.update(changes)
    (run / "config.json").write_text(json.dumps(config))


def refused(run: Path, *fragments: str) -> str:
    with pytest.raises(SentilensError) as err:
        load_predictor(run, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_weights_of_the_wrong_shape_are_named(mllm_run, fusion_run, tmp_path):
    for run in (mllm_run, fusion_run):
        copy = damaged_copy(run, tmp_path / run.name)
        weights = load_file(str(copy / "model.safetensors"))
        name = next(k for k, v in weights.items() if v.dim() == 2)
        weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
        save_file(weights, str(copy / "model.safetensors"))
        refused(copy, str(copy / "model.safetensors"), name.split(".")[-1])


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"predict_batch_size": 0}, "predict_batch_size"),
    ({"num_image_tokens": "many"}, "num_image_tokens"),
    ({"mode": "half"}, "mode"),
    ({"labels": "positive"}, "labels"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_mllm_config_fields_are_one_line(mllm_run, tmp_path, changes, fragment):
    copy = damaged_copy(mllm_run, tmp_path)
    edit_config(copy, **changes)
    refused(copy, str(copy / "config.json"), fragment)


def test_a_run_of_an_earlier_version_refuses_labels_json_that_disagree_with_its_config(mllm_run, fusion_run, tmp_path):
    """Defect 8: an MLLM run ignored a mismatched labels.json. Runs now keep their labels in config.json only;
    one of an earlier version, which kept them twice, is refused when the two disagree (either family)."""
    for run in (mllm_run, fusion_run):
        copy = damaged_copy(run, tmp_path / run.name)
        labels = json.loads((copy / "config.json").read_text())["labels"]
        (copy / "labels.json").write_text(json.dumps(labels))
        assert load_predictor(copy, device="cpu").labels == labels  # agreeing: an old run predicts as it is
        (copy / "labels.json").write_text(json.dumps(list(reversed(labels))))
        refused(copy, str(copy / "labels.json"), "differ from config.json")


def test_a_base_model_saved_only_as_a_pickle_is_refused_not_unpickled(mllm_run, tmp_path, monkeypatch):
    copy = damaged_copy(mllm_run, tmp_path)
    base = copy / "base-model"
    assert (base / "model.safetensors").is_file()
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    refused(copy, "cannot load the model")


def interrupt(monkeypatch, target: str) -> None:
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, stop)


def test_a_fusion_run_stopped_in_its_first_epoch_can_be_run_again(fusion_run, tmp_path, monkeypatch):
    """Defect 10: the folder left by Ctrl-C in epoch 1 was refused by a rerun ("already holds a run") and by
    --resume ("no checkpoint")."""
    from sentilens.fusion.train import train_fusion

    config = FusionConfig(**{k: v for k, v in json.loads((fusion_run / "config.json").read_text()).items()
                             if k not in ("family", "labels", "text_dim", "image_dim")})
    data = fusion_run.parent / "data"
    out = tmp_path / "again"
    with monkeypatch.context() as patch:
        interrupt(patch, "sentilens.fusion.train._train_epoch")
        with pytest.raises(KeyboardInterrupt):
            train_fusion(config, data, out, device="cpu")
    assert (out / "config.json").is_file() and not (out / "model.safetensors").exists()
    summary = train_fusion(config, data, out, device="cpu")
    assert (out / "model.safetensors").is_file() and summary
    with pytest.raises(SentilensError, match="already holds a run"):
        train_fusion(config, data, out, device="cpu")


def test_an_mllm_run_stopped_in_its_first_epoch_can_be_run_again(data, tmp_path, monkeypatch):
    out = tmp_path / "again"
    options = {"data": data, "out": out, **FAST_TINY, "epochs": 1}
    with monkeypatch.context() as patch:
        interrupt(patch, "sentilens.mllm.train._train_epoch")
        with pytest.raises(KeyboardInterrupt):
            train_mllm(mllm_train_config(options))
    assert (out / "config.json").is_file() and not (out / "model.safetensors").exists()
    with pytest.raises(SentilensError, match="stopped during its first epoch, which starts over"):
        train_mllm(mllm_train_config({**options, "resume": True}))
    train_mllm(mllm_train_config(options))
    assert (out / "model.safetensors").is_file()
    with pytest.raises(SentilensError, match="already a run directory"):
        train_mllm(mllm_train_config(options))
