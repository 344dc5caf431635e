"""Qwen2.5-VL and Qwen3-VL from the command line (issue 14): train mllm on the synthetic set with
--model tiny:<family>, eval, sweep (kept tokens fall with the ratio: ceil(r * N) of the images' N), predict
and explain, all through the checkpoint saved inside the run and loaded back with from_pretrained."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from mllm_helpers import small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("family", "model_type"), [("qwen2.5-vl", "qwen2_5_vl"), ("qwen3-vl", "qwen3_vl")])
def test_train_eval_sweep_predict_explain(tmp_path, family, model_type):
    data = small_manifest(tmp_path, n_train=8, n_val=4, n_test=6)
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "mllm", "--data", str(data), "--out", str(run), "--model", f"tiny:{family}",
                                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "8", "--global-batch-size", "8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["base_model"] == "base-model" and config["training"]["base_model"] == f"tiny:{family}"
    assert json.loads((run / "base-model" / "config.json").read_text())["model_type"] == model_type
    assert config["num_image_tokens"] == 36

    result = runner.invoke(app, ["eval", "--run", str(run), "--data", str(data), "--keep-ratio", "0.4", "--json"])
    assert result.exit_code == 0, result.output
    test = read_split(data, "test")
    with_image = sum(p.image is not None for p in test)  # the 128-px images: 6 x 6 tokens each; text-only: 0
    assert json.loads(result.stdout)["mean_kept_tokens"] == pytest.approx(math.ceil(0.4 * 36) * with_image / len(test))

    result = runner.invoke(app, ["sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4",
                                 "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [(r["ratio"], r["kept_tokens"]) for r in rows] == [(1.0, 36), (0.4, 15)]
    assert rows[1]["gflops_per_post"] < rows[0]["gflops_per_post"]

    posts = tmp_path / "posts.jsonl"
    image = next(p.image for p in test if p.image)
    posts.write_text(json.dumps({"id": "a", "text": "what a day", "image": image}) + "\n"
                     + json.dumps({"id": "b", "text": "no picture"}) + "\n")
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", "--run", str(run), "--input", str(posts), "--output", str(out),
                                 "--keep-ratio", "0.2"])
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["kept_tokens"] for p in predictions] == [math.ceil(0.2 * 36), 0]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)

    heat = tmp_path / "heat.png"
    result = runner.invoke(app, ["explain", "--run", str(run), "--image", image, "--text", "hello", "--out", str(heat),
                                 "--keep-ratio", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["kept_patches"], info["patches"]) == (math.ceil(0.3 * 36), 36) and heat.is_file()
