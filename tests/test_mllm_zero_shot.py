"""Zero-shot: ``eval --model`` scores a checkpoint sentilens never trained, and leaves a run folder that the
other commands load (here ``sweep``, ``predict`` and ``export``, whose plain-transformers scores it matches)."""

import json

import pytest
from typer.testing import CliRunner

from cli_helpers import cli, one_line_error
from mllm_helpers import plain_probabilities, small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split

pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("zero-shot-data"), n_train=4, n_val=2, n_test=4)


def real_layout_llava(out):
    """The released LLaVA-1.5 files with random weights of their layout (tests/test_real_layout.py's tool)."""
    from test_real_layout import LLAVA, real_layout

    real_layout().build(LLAVA, out, layers=2, tower_layers=2, width=64, seed=0, check=False)
    return out


@pytest.mark.parametrize("checkpoint", ["tiny:qwen2.5-vl", "llava-1.5 real layout"])
def test_eval_model_scores_a_checkpoint_never_trained_and_leaves_a_run(tmp_path, data, checkpoint):
    from sentilens.mllm.families import get_family

    folder = tmp_path / "checkpoint"
    if checkpoint.startswith("tiny:"):
        get_family(checkpoint.split(":")[1]).build_tiny(folder, corpus=["a post"])
    else:
        real_layout_llava(folder)
    run = tmp_path / "zero-shot"
    result = runner.invoke(app, ["eval", "--model", str(folder), "--data", str(data), "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == len(read_split(data, "test")) and 0 <= metrics["accuracy"] <= 1
    assert json.loads((run / "metrics-test.json").read_text())["accuracy"] == metrics["accuracy"]
    config = json.loads((run / "config.json").read_text())
    assert config["weights"] is None and config["training"]["zero_shot"] is True
    assert config["base_model"] == str(folder.resolve()) and not (run / "model.safetensors").exists()
    # the prompt a new run would train with, saved, so the run keeps it
    assert config["prompt"]["layout"] == "joined" and config["prompt"]["answer_prefix"] is not None
    assert config["prompt"]["chat_template"]

    # evaluated again into the same folder: the same run, the same scores
    again = runner.invoke(app, ["eval", "--model", str(folder), "--data", str(data), "--run", str(run), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == metrics

    result = runner.invoke(app, ["sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4",
                                 "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert rows[1]["kept_tokens"] < rows[0]["kept_tokens"]

    result = runner.invoke(app, ["report", "--runs", str(run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "zero-shot" in (tmp_path / "report" / "report.md").read_text()
    from fastapi.testclient import TestClient

    from sentilens.serve.app import create_app

    with TestClient(create_app(run), base_url="http://127.0.0.1") as client:  # serve takes it as any run
        info = client.get("/v1/model").json()
        assert info["labels"] == config["labels"] and info["config"]["weights"] is None
        answer = client.post("/v1/predict", json={"text": "another terrible storm"})
        assert answer.status_code == 200, answer.text
        assert set(answer.json()["probabilities"]) == set(config["labels"])

    # exported, it is the checkpoint itself with the run's prompt: plain transformers scores as the run predicts
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    from sentilens.predict import load_predictor

    post = next(p for p in read_split(data, "test") if p.image)
    got = load_predictor(run).predict([post])[0].probabilities
    assert config["prompt"]["image_aspect"] == "crop"  # the processor's own fitting, as plain transformers does
    reference = plain_probabilities(out, post.text, post.image)
    assert all(abs(reference[label] - got[label]) < 1e-4 for label in got), (reference, got)
    assert "zero-shot" in load_predictor(run).describe()["description"]
    assert "never fine-tuned" in (out / "README.md").read_text()


def test_eval_model_refuses_a_tiny_model_and_another_run_folder(tmp_path, data, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "eval", "--model", "tiny", "--data", str(data),
                       "--run", str(tmp_path / "r"))
    one_line_error(code, err, "random tiny model", alone=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"family": "fusion"}))
    code, _, err = cli(monkeypatch, capsys, "eval", "--model", "some/model", "--data", str(data), "--run", str(other))
    one_line_error(code, err, "already holds another run", str(other), alone=True)
    code, _, err = cli(monkeypatch, capsys, "eval", "--data", str(data))
    one_line_error(code, err, "--run", "--model", alone=True)


def test_predict_model_labels_a_post_zero_shot_and_reuses_its_run(tmp_path, data, monkeypatch, capsys):
    from sentilens.mllm.families import get_family

    folder = get_family("llava").build_tiny(tmp_path / "checkpoint", corpus=["a post"])
    run = tmp_path / "zero-shot"
    image = next(p.image for p in read_split(data, "test") if p.image)
    args = ["predict", "--model", str(folder), "--labels", "informative, not_informative", "--run", str(run),
            "--image", image, "--text", "the bridge is closed", "--json"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    first = json.loads(out)
    assert set(first["probabilities"]) == {"informative", "not_informative"}
    config = json.loads((run / "config.json").read_text())
    assert config["labels"] == ["informative", "not_informative"] and config["prompt"]["task"] == "informative"
    code, out, err = cli(monkeypatch, capsys, *args)  # the same zero-shot run, loaded back: the same answer
    assert code == 0, err
    assert json.loads(out)["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)
    other = [a if a != "informative, not_informative" else "positive,negative" for a in args]
    code, _, err = cli(monkeypatch, capsys, *other)
    one_line_error(code, err, "for the labels", "give another --run")
    code, _, err = cli(monkeypatch, capsys, "predict", "--model", str(folder), "--text", "hi")
    one_line_error(code, err, "--labels", alone=True)
