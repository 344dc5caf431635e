"""Training a person can watch (sentilens.training_log): the curve, the live line, the trackers.

The fast tests check the pieces on hand-made histories; the two runs (fusion, tiny LLaVA) train for real with
``--log-with tensorboard`` and read the event files back against ``history.json``.
"""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sentilens.cli import app
from sentilens.errors import SentilensError
from sentilens.training_log import PLOT, TrainingLog, best_epoch, check_tracker, plot_training

runner = CliRunner()


def history_of(scores: list[float | None], steps: int = 3) -> list[dict]:
    history, step = [], 0
    for epoch, score in enumerate(scores, 1):
        record = {"epoch": epoch, "train_loss": 1.0 / epoch, "seconds": 0.1,
                  "steps": [{"step": (step := step + 1), "loss": 1.0 / epoch + i / 10, "lr": 1e-3}
                            for i in range(steps)]}
        if score is not None:
            record["val"] = {"accuracy": score, "weighted_f1": score, "macro_f1": score}
        history.append(record)
    return history


def test_the_best_epoch_is_the_first_with_the_highest_val_f1_or_the_last_without_val():
    assert best_epoch(history_of([0.5, 0.8, 0.8, 0.7])) == 2
    assert best_epoch(history_of([None, None, None])) == 3
    assert best_epoch([]) is None


def test_the_curve_is_drawn_from_history_alone(tmp_path):
    path = plot_training(history_of([0.5, 0.8, 0.7]), tmp_path / "plots" / "training.png", "run")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 380)
    plot_training(history_of([None, None], steps=0), tmp_path / "bare.png")  # no val, no steps: still a curve
    assert not list(tmp_path.glob("**/*.tmp.png"))


def test_the_live_line_shows_epoch_step_loss_lr_and_the_last_val_score(tmp_path, monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")
    history: list[dict] = []
    with TrainingLog(tmp_path, history, epochs=2, steps_per_epoch=2, title="t") as log:
        status = lambda: log._bar.tasks[0].fields["status"]  # noqa: E731
        log.step(0.75, 2e-5)
        assert status() == "epoch 1/2  step 1/2  loss 0.7500  lr 2.00e-05  val F1 -"
        log.step(0.5, 1e-5)
        log.epoch({"epoch": 1, "train_loss": 0.625, "seconds": 1.0,
                   "val": {"accuracy": 0.5, "weighted_f1": 0.4321, "macro_f1": 0.4}})
        log.step(0.25, 5e-6)
        assert status() == "epoch 2/2  step 1/2  loss 0.2500  lr 5.00e-06  val F1 0.4321"
        assert log._bar.tasks[0].total == 4 and log._bar.tasks[0].completed == 3  # one bar, so the ETA is the run's
    assert history[0]["steps"] == [{"step": 1, "loss": 0.75, "lr": 2e-5}, {"step": 2, "loss": 0.5, "lr": 1e-5}]
    assert (tmp_path / PLOT).is_file()


def test_a_resumed_log_numbers_its_steps_after_the_saved_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")
    history = history_of([0.5, 0.6])
    with TrainingLog(tmp_path, history, epochs=3, steps_per_epoch=3, title="t") as log:
        log.step(0.1, 1e-3)
    assert log.steps[0]["step"] == 7


def test_a_tracker_that_is_not_installed_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SentilensError, match=r"--log-with mlflow: the mlflow package is not installed "
                                             r"\(pip install 'sentilens\[mlflow\]'\)"):
        check_tracker("mlflow")
    with pytest.raises(SentilensError, match="choose one of tensorboard, mlflow, wandb"):
        check_tracker("neptune")
    from sentilens.cli import main

    for command in ("fusion", "mllm"):
        monkeypatch.setattr("sys.argv", ["sentilens", "train", command, "--data", str(tmp_path), "--out",
                                         str(tmp_path / "r"), "--log-with", "mlflow"])
        with pytest.raises(SystemExit) as exit:
            main()
        assert exit.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == ["error: --log-with mlflow: the mlflow package is not installed (pip install "
                         "'sentilens[mlflow]')"]
    assert not (tmp_path / "r").exists()  # refused before anything was written


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = [p for p in (run / "logs").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def check_tensorboard_equals_history(run: Path, epochs: int) -> list[dict]:
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    scalars = tensorboard_scalars(run)

    def same(tag: str, expected: list[tuple[int, float]]) -> None:
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        # TensorBoard stores float32
        assert [value for _, value in scalars[tag]] == pytest.approx([value for _, value in expected], rel=1e-6), tag

    same("epoch/train_loss", [(r["epoch"], r["train_loss"]) for r in history])
    for key in ("accuracy", "weighted_f1", "macro_f1"):
        same(f"epoch/val_{key}", [(r["epoch"], r["val"][key]) for r in history])
    steps = [s for r in history for s in r["steps"]]
    assert steps and [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    same("step/train_loss", [(s["step"], s["loss"]) for s in steps])
    same("step/lr", [(s["step"], s["lr"]) for s in steps])
    with Image.open(run / PLOT) as image:
        assert image.format == "PNG"
    return history


@pytest.mark.slow
def test_a_fusion_run_logged_to_tensorboard_reads_back_as_its_history(tmp_path, monkeypatch):
    from fusion_helpers import save_tiny_gpt2, save_tiny_resnet
    from sentilens.data.synth import make_synthetic

    monkeypatch.setenv("SENTILENS_QUIET", "1")
    data, run = tmp_path / "data", tmp_path / "run"
    make_synthetic(data, n=80, seed=0, image_size=32)
    result = runner.invoke(app, ["train", "fusion", "--data", str(data), "--out", str(run), "--text-encoder",
                                 str(save_tiny_gpt2(tmp_path / "gpt2")), "--image-encoder",
                                 str(save_tiny_resnet(tmp_path / "resnet")), "--image-size", "32", "--epochs", "3",
                                 "--batch-size", "16", "--no-cache", "--log-with", "tensorboard", "--json"])
    assert result.exit_code == 0, result.output
    history = check_tensorboard_equals_history(run, 3)
    n_train = len((data / "train.jsonl").read_text().splitlines())
    assert all(len(r["steps"]) == -(-n_train // 16) for r in history)  # one step per batch of 16
    result = runner.invoke(app, ["report", "--runs", str(run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Training" in report and "(plots/training-run.png)" in report
    assert (tmp_path / "report" / "plots" / "training-run.png").is_file()


@pytest.mark.slow
def test_a_tiny_llava_run_logged_to_tensorboard_reads_back_as_its_history(tmp_path, monkeypatch):
    from mllm_helpers import FAST_TINY, small_manifest
    from sentilens.mllm.train import mllm_train_config, train_mllm

    monkeypatch.setenv("SENTILENS_QUIET", "1")
    data, run = small_manifest(tmp_path, n_train=16, n_val=8), tmp_path / "run"
    options = {**FAST_TINY, "batch_size": 4, "data": data, "out": run, "epochs": 2, "log_with": "tensorboard"}
    train_mllm(mllm_train_config(options))
    history = check_tensorboard_equals_history(run, 2)
    assert all(len(r["steps"]) == 2 for r in history)  # 16 posts, optimizer steps of 8 (2 micro-batches of 4)
