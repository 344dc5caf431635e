"""Both families under ``accelerate launch`` with two CPU processes: fusion training (the main process
trains, the other returns), then sharded prediction and evaluation equal to one process's."""

import json

import pytest

from fusion_helpers import save_tiny_gpt2, save_tiny_resnet
from launch_helpers import launch_sentilens
from mllm_helpers import small_manifest
from sentilens import distributed
from sentilens.data.records import read_split
from sentilens.predict import evaluate, load_predictor
from sentilens.runs import read_json


@pytest.mark.slow
def test_fusion_trains_once_and_predicts_sharded_under_two_processes(tmp_path):
    data = small_manifest(tmp_path / "data", n_train=16, n_val=6, n_test=9)  # 9 test posts: uneven shards
    gpt2, resnet = save_tiny_gpt2(tmp_path / "gpt2"), save_tiny_resnet(tmp_path / "resnet")
    run = tmp_path / "run"
    done = launch_sentilens("train", "fusion", "--data", str(data), "--out", str(run), "--text-encoder", str(gpt2),
                            "--image-encoder", str(resnet), "--image-size", "64", "--epochs", "2",
                            "--batch-size", "8", "--cache", str(tmp_path / "cache"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON document: only the main process trained and printed
    assert summary["epochs"] == 2 and len(read_json(run / "history.json")) == 2
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "history.json", "metrics-test.json",
                                                     "metrics-val.json", "model.safetensors", "plots",
                                                     "predictions-val.jsonl"]

    posts = read_split(data, "test")
    done = launch_sentilens("predict", "--run", str(run), "--input", str(data / "test.jsonl"), "--output",
                            str(tmp_path / "preds.jsonl"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    single = load_predictor(run, device="cpu").predict(posts)
    assert [r["id"] for r in sharded] == [p.id for p in posts]
    assert [r["label"] for r in sharded] == [p.label for p in single]
    for row, prediction in zip(sharded, single, strict=True):
        assert all(abs(row["probabilities"][k] - prediction.probabilities[k]) < 1e-5 for k in prediction.probabilities)

    done = launch_sentilens("eval", "--run", str(run), "--data", str(data), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout)
    expected = evaluate(load_predictor(run, device="cpu"), posts)
    assert metrics["n"] == len(posts) == 9 and metrics["confusion"] == expected["confusion"]
    assert read_json(run / "metrics-test.json")["confusion"] == expected["confusion"]


def test_one_process_is_the_main_process_on_the_cpu(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    assert distributed.predict_sharded(lambda items: [2 * x for x in items], [1, 2, 3]) == [2, 4, 6]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert not distributed.is_main_process() and str(distributed.default_device()) == "cpu"
