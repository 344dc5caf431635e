"""Training a person can watch, the same for both families: the live line, the curve, the trackers.

A trainer opens one :class:`TrainingLog` around its epochs and calls :meth:`TrainingLog.step` after
every optimizer step and :meth:`TrainingLog.epoch` after every validation. The log then

- draws one progress bar over the whole run (so its ETA is the run's, not the epoch's) whose line
  shows epoch, step, loss, learning rate and the last validation score;
- keeps every step's loss and learning rate in the epoch's ``history.json`` record (``"steps"``), so a
  resumed run keeps the steps of the epochs it resumes after and the curve needs nothing but
  ``history.json``;
- redraws ``RUN/plots/training.png`` after every epoch (an interrupted run has its curve too);
- sends the same values to the trackers named by ``--log-with`` (accelerate's tracker classes:
  TensorBoard under ``RUN/logs/``, MLflow, Weights & Biases; each an optional extra).

Only the main process draws and logs; the others call the same methods, which then only count.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from sentilens.errors import SentilensError
from sentilens.outputs import save_figure
from sentilens.progress import progress_bar

PLOT = Path("plots") / "training.png"
LOG_DIR = "logs"
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""``--log-with`` value -> the package it needs (and the pyproject extra of the same name)."""
VAL_KEYS = ("accuracy", "weighted_f1", "macro_f1")


def check_tracker(name: str | None) -> None:
    """A one-line error for an unknown tracker or one whose package is not installed (before any training)."""
    if name is None:
        return
    if name not in TRACKERS:
        raise SentilensError(f"--log-with {name}: choose one of {', '.join(TRACKERS)}")
    package = TRACKERS[name]
    if importlib.util.find_spec(package) is None:
        raise SentilensError(f"--log-with {name}: the {package} package is not installed "
                             f"(pip install 'sentilens[{name}]')")


def best_epoch(history: Sequence[dict]) -> int | None:
    """The epoch the trainers keep: the first with the highest val weighted F1; with no val, the last."""
    scored = [r for r in history if r.get("val") is not None]
    if not scored:
        return history[-1]["epoch"] if history else None
    return max(scored, key=lambda r: (r["val"]["weighted_f1"], -r["epoch"]))["epoch"]


def epoch_values(record: dict) -> dict[str, float]:
    """The tracker scalars of one ``history.json`` record (logged at step = its epoch)."""
    values = {"epoch/train_loss": record["train_loss"]}
    for key in VAL_KEYS:
        if record.get("val") and key in record["val"]:
            values[f"epoch/val_{key}"] = record["val"][key]
    return values


def step_values(step: dict) -> dict[str, float]:
    """The tracker scalars of one step record (logged at step = its global step)."""
    return {"step/train_loss": step["loss"], "step/lr": step["lr"]}


def plot_training(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """``training.png`` from ``history.json`` alone: train loss per step (or per epoch, when the records have no
    steps) on the left, val accuracy and weighted F1 per epoch on the right, the best epoch marked on both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    loss_ax, val_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    xs, ys = [], []
    for record in history:
        steps = record.get("steps") or []
        for i, step in enumerate(steps):
            xs.append(record["epoch"] - 1 + (i + 1) / len(steps))
            ys.append(step["loss"])
    if xs:
        loss_ax.plot(xs, ys, color="tab:blue", linewidth=0.8, alpha=0.6, label="per step")
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", color="tab:blue", label="epoch mean")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("training loss")
    loss_ax.legend(loc="upper right", fontsize=8)
    scored = [r for r in history if r.get("val")]
    if scored:
        # Runs upgraded from the earlier layout recorded weighted F1 only: plot the metrics a record has.
        for key, marker, label in (("accuracy", "o-", "accuracy"), ("weighted_f1", "s-", "weighted F1")):
            points = [(r["epoch"], r["val"][key]) for r in scored if key in r["val"]]
            if points:
                val_ax.plot(*zip(*points, strict=True), marker, label=label)
        val_ax.legend(loc="lower right", fontsize=8)
    else:
        val_ax.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=val_ax.transAxes)
    val_ax.set_xlabel("epoch")
    val_ax.set_ylabel("validation score")
    val_ax.set_title("validation")
    best = best_epoch(history)
    if best is not None:
        for ax in (loss_ax, val_ax):
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1)
        val_ax.annotate(f"best epoch {best}", xy=(best, 0.02), xycoords=("data", "axes fraction"),
                        color="tab:red", fontsize=8, ha="center")
    for ax in (loss_ax, val_ax):
        ax.set_xlim(0, max(epochs, default=1) + 0.5)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path


def _tracker(name: str, run_dir: Path):
    """accelerate's tracker class for ``name``, started (what ``Accelerator.init_trackers`` does for each)."""
    from accelerate import tracking

    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker(run_dir.name or "run", run_dir / LOG_DIR)
    elif name == "mlflow":
        tracker = tracking.MLflowTracker(experiment_name="sentilens", run_name=run_dir.name)
    else:
        tracker = tracking.WandBTracker("sentilens", name=run_dir.name)
    tracker.start()
    return tracker


class TrainingLog:
    """One run's live line, curve and trackers (see the module docstring); a context manager around the epochs.

    ``history`` is the run's list of epoch records (a resumed run's, or empty); :meth:`epoch` appends to it.
    """

    def __init__(self, run_dir: str | Path, history: list[dict], *, epochs: int, steps_per_epoch: int,
                 title: str, log_with: str | None = None, config: dict | None = None, main: bool = True) -> None:
        check_tracker(log_with)
        self.run_dir, self.history, self.title = Path(run_dir), history, title
        self.epochs, self.steps_per_epoch = epochs, max(steps_per_epoch, 1)
        self.log_with, self.config, self.main = log_with, config or {}, main
        last = history[-1].get("steps") if history else None
        self.global_step = last[-1]["step"] if last else len(history) * self.steps_per_epoch
        self.steps: list[dict] = []
        self.tracker = None
        self._bar = self._task = None

    def __enter__(self) -> TrainingLog:
        self._bars = progress_bar(quiet=not self.main)
        self._bar = self._bars.__enter__()
        self._task = self._bar.add_task(self.title, total=self.epochs * self.steps_per_epoch,
                                        completed=len(self.history) * self.steps_per_epoch, unit="step",
                                        status=self._status(None))
        if self.main and self.log_with is not None:
            self.tracker = _tracker(self.log_with, self.run_dir)
            scalars = {k: v for k, v in self.config.items() if isinstance(v, (bool, int, float, str))}
            if scalars:
                self.tracker.store_init_configuration(scalars)
        return self

    def over(self, epochs: Iterable[int]) -> Iterator[int]:
        """``for epoch in log.over(range(...))``: the log open while the loop runs (closed by a break, an exception
        or the end), for a trainer whose loop is not inside a ``with``."""
        with self:
            yield from epochs

    def __exit__(self, *exc) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
        self._bars.__exit__(*exc)

    def _status(self, step: dict | None) -> str:
        epoch = len(self.history) + 1 if len(self.history) < self.epochs else self.epochs
        parts = [f"epoch {epoch}/{self.epochs}", f"step {len(self.steps)}/{self.steps_per_epoch}"]
        if step is not None:
            parts += [f"loss {step['loss']:.4f}", f"lr {step['lr']:.2e}"]
        scored = [r for r in self.history if r.get("val")]
        parts.append(f"val F1 {scored[-1]['val']['weighted_f1']:.4f}" if scored else "val F1 -")
        return "  ".join(parts)

    def step(self, loss: float, lr: float) -> None:
        """One optimizer step done: its (mean) training loss and the learning rate it used."""
        self.global_step += 1
        step = {"step": self.global_step, "loss": float(loss), "lr": float(lr)}
        self.steps.append(step)
        if self.tracker is not None:
            self.tracker.log(step_values(step), step=self.global_step)
        self._bar.update(self._task, advance=1, status=self._status(step))

    def epoch(self, record: dict) -> dict:
        """One epoch done and validated: ``record`` (``{"epoch", "train_loss", "seconds", "val"?}``) gains its
        steps, joins the history, goes to the tracker and the curve; returns it."""
        record["steps"] = self.steps
        self.history.append(record)
        # A short last epoch (the trainers may drop a remainder) still fills the bar to its epoch boundary.
        done = len(self.history) * self.steps_per_epoch
        self.steps = []
        if self.main:
            if self.tracker is not None:
                self.tracker.log(epoch_values(record), step=record["epoch"])
            plot_training(self.history, self.run_dir / PLOT, self.title)
        self._bar.update(self._task, completed=done, status=self._status(None))
        return record
