"""``sentilens export``: plain transformers loads the exported folder and scores the labels as the run's predictor.

The reference (``mllm_helpers.plain_probabilities``) uses no sentilens code: the exported
``sentilens_prompt.json`` (the conversation and the answers), the folder's own chat template, tokenizer
and image processor, and the model class's own forward on the prompt followed by each answer.
"""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli_helpers import cli, one_line_error
from mllm_helpers import FAST_TINY, plain_probabilities, small_manifest
from sentilens.cli import app
from sentilens.data.records import Post

pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("export-data"), n_train=16, n_val=4, n_test=4)


@pytest.fixture(scope="module")
def square_image(tmp_path_factory):
    """A square picture (LLaVA's padding to a square leaves it as it is) with distinct quarters."""
    path = tmp_path_factory.mktemp("export-img") / "square.png"
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    image.paste((20, 160, 60), (56, 0, 112, 56))
    image.paste((10, 10, 10), (0, 56, 56, 112))
    image.save(path)
    return path


@pytest.mark.parametrize("model, mode", [("tiny", "lora"), ("tiny:qwen2.5-vl", "full")])
def test_an_exported_run_loads_in_plain_transformers_and_scores_as_the_predictor(tmp_path, data, square_image,
                                                                                  model, mode):
    from sentilens.mllm.train import mllm_train_config, train_mllm
    from sentilens.predict import load_predictor

    run = tmp_path / "run"
    train_mllm(mllm_train_config({"data": data, "out": run, **FAST_TINY, "base_model": model, "epochs": 1,
                                  "mode": mode, "lora": {"r": 4, "alpha": 8}}))
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["merged_lora"] == (mode == "lora") and written["dtype"] == "float32"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "chat_template.jinja", "README.md", "sentilens_prompt.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert names & {"preprocessor_config.json", "processor_config.json"}  # the image processor (v5: either file)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    readme = (out / "README.md").read_text()
    info = json.loads((out / "sentilens_prompt.json").read_text())
    assert info["question"] in readme and "Token pruning is not applied" in readme

    # the training is in the exported weights: the projector and (merged LoRA, or full) language model moved
    from safetensors.torch import load_file

    base = load_file(run / "base-model" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    moved = [name for name, tensor in exported.items()
             if name in base and not torch.equal(tensor, base[name].to(tensor.dtype))]
    tower = ("vision_tower", "visual")
    assert any(".layers." in name and "_proj" in name and not name.startswith(tower) for name in moved), moved
    assert any("multi_modal_projector" in name or "merger" in name for name in moved), moved
    assert not any(name.startswith(tower) and "merger" not in name for name in moved), moved
    assert set(exported) == set(base)  # the base's own names: no LoRA tensors left

    # a smaller copy for serving: the dtype asked for, the same names
    half = tmp_path / "exported-bf16"
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(half), "--dtype", "bfloat16", "--json"])
    assert result.exit_code == 0, result.output
    halved = load_file(half / "model.safetensors")
    assert set(halved) == set(exported) and {t.dtype for t in halved.values()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"

    predictor = load_predictor(run)
    posts = [Post("a", "sun and sea, love it", str(square_image)), Post("b", "another terrible storm", None)]
    for post, got in zip(posts, predictor.predict(posts), strict=True):
        reference = plain_probabilities(out, post.text, post.image)
        assert reference.keys() == got.probabilities.keys()
        for label, p in reference.items():
            assert abs(p - got.probabilities[label]) < 1e-4, (post.id, label, p, got.probabilities[label])


def test_export_refuses_a_fusion_run_and_a_folder_with_files_in_one_line(tmp_path, monkeypatch, capsys):
    fusion = tmp_path / "fusion-run"
    fusion.mkdir()
    (fusion / "config.json").write_text(json.dumps({"family": "fusion", "labels": ["a", "b"]}))
    code, _, err = cli(monkeypatch, capsys, "export", "--run", str(fusion), "--out", str(tmp_path / "out"))
    one_line_error(code, err, "fusion run", "config.json", alone=True)
    assert not (tmp_path / "out").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    mllm = tmp_path / "mllm-run"
    mllm.mkdir()
    (mllm / "config.json").write_text(json.dumps({"family": "mllm"}))
    code, _, err = cli(monkeypatch, capsys, "export", "--run", str(mllm), "--out", str(mine))
    one_line_error(code, err, "not empty", str(mine), alone=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("model", ["tiny:llava-next", "tiny:smolvlm", "tiny:qwen3-vl"])
def test_every_family_exports_a_checkpoint_that_loads_whole_and_scores_text_as_the_predictor(tmp_path, data, model):
    from transformers import AutoModelForImageTextToText

    from sentilens.mllm.export import export_run
    from sentilens.mllm.train import mllm_train_config, train_mllm
    from sentilens.predict import load_predictor

    run = tmp_path / "run"
    train_mllm(mllm_train_config({"data": data, "out": run, **FAST_TINY, "base_model": model, "epochs": 1,
                                  "mode": "lora", "lora": {"r": 4, "alpha": 8}}))
    out = tmp_path / "exported"
    assert export_run(run, out)["merged_lora"]
    _, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert {key: list(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    post = Post("t", "another terrible storm, the bridge is closed", None)
    got = load_predictor(run).predict([post])[0].probabilities
    reference = plain_probabilities(out, post.text, None)
    assert all(abs(reference[label] - got[label]) < 1e-4 for label in got), (reference, got)


def test_a_failed_export_leaves_nothing_behind(tmp_path, data, monkeypatch, capsys):
    import errno

    from sentilens.mllm import export as export_module
    from sentilens.mllm.train import mllm_train_config, train_mllm

    run = tmp_path / "runs" / "run"
    train_mllm(mllm_train_config({"data": data, "out": run, **FAST_TINY, "epochs": 1}))

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export_module, "write_json", full_disk)
    out = tmp_path / "exports" / "model"
    code, _, err = cli(monkeypatch, capsys, "export", "--run", str(run), "--out", str(out))
    one_line_error(code, err, "No space left on device")
    assert list((tmp_path / "exports").iterdir()) == []  # neither the folder nor its temporary
