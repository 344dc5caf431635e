"""Make an ensemble run from trained runs (``sentilens ensemble``): copy them in, optionally choose decision
offsets on a data set's val split and score its val and test splits."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sentilens.data.records import read_labels, read_manifest
from sentilens.decision import tune_offsets
from sentilens.ensemble.config import MEMBERS, parse_ensemble_config
from sentilens.ensemble.predictor import EnsemblePredictor
from sentilens.errors import SentilensError
from sentilens.predict import check_labelled, prediction_metrics
from sentilens.runs import CONFIG, has_training_state, load_config, save_config, save_metrics


def member_names(runs: Sequence[Path]) -> list[str]:
    """``1-NAME``, ``2-NAME``...: unique folder names under ``members/`` that still say which run each was."""
    return [f"{i}-{re.sub(r'[^A-Za-z0-9_.+-]+', '-', run.resolve().name).lstrip('.') or 'run'}"
            for i, run in enumerate(runs, 1)]


def _check_members(runs: Sequence[Path], out_dir: Path) -> list[str]:
    """The members' common labels; a one-line error for a folder that is not a finished run, labels that
    differ, or an ``out_dir`` inside a member (copying a run into itself)."""
    if len(runs) < 2:
        raise SentilensError("an ensemble needs at least two runs (give --run for each)")
    target = out_dir.resolve()
    labels: list[str] | None = None
    for run in runs:
        config = load_config(run)
        if has_training_state(run):
            raise SentilensError("this run has not finished training (its resume/ folder is there)", run)
        if target == run.resolve() or run.resolve() in target.parents:
            raise SentilensError("--out lies inside this member run: choose a folder outside it", run)
        if labels is None:
            labels = list(config.get("labels") or [])
        elif config.get("labels") != labels:
            raise SentilensError(f"this run's labels {config.get('labels')} differ from the first run's {labels}",
                                 run / CONFIG)
    return labels or []


def build_ensemble(runs: Sequence[str | Path], out_dir: str | Path, weights: Sequence[float] | None = None,
                   data_dir: str | Path | None = None, tune_decision: bool = False,
                   device: str | None = None) -> dict:
    """Write an ensemble of ``runs`` into ``out_dir`` (new, or an empty folder) and return what it did.

    With ``data_dir`` the ensemble predicts its val and test splits (each member once) and saves their
    metrics; with ``tune_decision`` it first chooses decision offsets on val (:mod:`sentilens.decision`).
    The folder appears whole or not at all: it is built beside ``out_dir`` and renamed at the end.
    """
    runs, out_dir = [Path(r) for r in runs], Path(out_dir)
    if tune_decision and data_dir is None:
        raise SentilensError("--tune-decision chooses the offsets on the val split of --data: give --data")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SentilensError("already exists and is not an empty folder: choose another --out", out_dir)
    labels = _check_members(runs, out_dir)
    names = member_names(runs)
    settings = parse_ensemble_config({"labels": labels, "members": names,
                                      "weights": [1.0] * len(runs) if weights is None else list(weights)})
    splits = {}
    if data_dir is not None:
        data_dir = Path(data_dir)
        manifest, data_labels = read_manifest(data_dir), read_labels(data_dir)
        if data_labels != labels:
            raise SentilensError(f"the runs were trained on labels {labels}, the data has {data_labels}", data_dir)
        splits = {split: manifest[split] for split in ("val", "test") if manifest.get(split)}
        for posts in splits.values():
            check_labelled(posts)
        if tune_decision and "val" not in splits:
            raise SentilensError("the val split is empty: decision offsets are chosen on it", data_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for run, name in zip(runs, names, strict=True):
            shutil.copytree(run, staging / MEMBERS / name)
        save_config(staging, settings)
        summary: dict = {"run": str(out_dir), "members": dict(zip(names, map(str, runs), strict=True)),
                         "weights": settings.weights}
        if splits:
            predictor = EnsemblePredictor.from_run(staging, device=device)
            stacked = {split: predictor.member_probabilities(posts) for split, posts in splits.items()}
            if tune_decision:
                truth = np.array([labels.index(p.label) for p in splits["val"]])
                offsets, before, after = tune_offsets(predictor.combine(stacked["val"]), truth)
                settings = settings.model_copy(update={"decision_offsets": offsets})
                save_config(staging, settings)
                predictor.settings = settings
                summary["decision"] = {"offsets": dict(zip(labels, offsets, strict=True)),
                                       "val_weighted_f1_argmax": before, "val_weighted_f1_tuned": after}
            for split, posts in splits.items():
                metrics = prediction_metrics(posts, predictor.to_predictions(predictor.combine(stacked[split])),
                                             labels)
                save_metrics(staging, split, metrics)
                summary[split] = metrics
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
