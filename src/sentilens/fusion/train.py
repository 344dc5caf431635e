"""Training of the fusion family (paper Section 4: AdamW, lr 1e-3, batch 32, dropout 0.5, cross-entropy).

The paper trains binary CrisisMMD with binary cross-entropy; cross-entropy over the label list
is the same loss for two labels and extends to three-way sentiment. The epoch kept is the one
with the best validation weighted F1 (the paper's headline metric); with no validation posts the
last epoch is kept.

Reproducibility: the head is initialised from ``seed``, and each epoch draws its shuffling and its
dropout from a seed derived from ``(seed, epoch)``, so a run resumed after epoch k continues
exactly as the uninterrupted run would (bit for bit on a CPU). The run directory is the one
format of :mod:`sentilens.runs`: after every epoch ``history.json`` and the resume state
(``resume/``: model and fine-tuned text encoder weights, AdamW moments, the scalar state), the
best epoch's ``model.safetensors``; at the end ``metrics-val.json``, ``metrics-test.json``,
``predictions-val.jsonl``, and ``resume/`` is deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sentilens.data.records import SPLITS, Post, read_labels, read_manifest
from sentilens.decision import tune_offsets
from sentilens.distributed import resolve_device
from sentilens.errors import SentilensError
from sentilens.fusion.cache import CacheStats, FeatureCache, PostFeatures, featurize
from sentilens.fusion.config import FusionConfig, parse_fusion_config
from sentilens.fusion.encoders import ImageEncoder, TextEncoder, TopLayers, build_encoders
from sentilens.fusion.model import FusionModel, build_model, collate_features
from sentilens.fusion.predictor import FusionPredictor, run_weights
from sentilens.fusion.probe import fit_probe
from sentilens.metrics import classification_metrics
from sentilens.runs import (
    CONFIG,
    MODEL_WEIGHTS,
    RESUME_DIR,
    check_resumable,
    clear_training_state,
    holds_trained_run,
    load_config,
    load_history,
    load_training_state,
    load_weights,
    save_config,
    save_history,
    save_metrics,
    save_predictions,
    save_training_state,
    save_weights,
)
from sentilens.training_log import TrainingLog
from sentilens.validation import check_training_labels

Encoders = tuple[TextEncoder | None, ImageEncoder | None]
SplitFeatures = dict[str, list[PostFeatures]]


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch + 1


def featurize_splits(splits: dict[str, list[Post]], config: FusionConfig, encoders: Encoders,
                     cache: FeatureCache | None) -> tuple[SplitFeatures, CacheStats]:
    """Frozen features of every split (a modality is left out when its encoder is fine-tuned; with
    ``text_top_layers`` the text features are the states below the trained top layers)."""
    text_encoder, image_encoder = encoders
    frozen_text = None if config.fine_tune_text else text_encoder
    if frozen_text is not None and config.text_top_layers:
        frozen_text = TopLayers(frozen_text, config.text_top_layers)
    frozen_image = None if config.fine_tune_image else image_encoder
    posts = [post for split in SPLITS for post in splits[split]]
    features, stats = featurize(posts, frozen_text, frozen_image, cache)
    out, start = {}, 0
    for split in SPLITS:
        out[split] = features[start:start + len(splits[split])]
        start += len(splits[split])
    return out, stats


def _check_labelled(posts: Sequence[Post], split: str, data_dir: Path) -> None:
    unlabelled = [p.id for p in posts if p.label is None]
    if unlabelled:
        raise SentilensError(f"{len(unlabelled)} posts of the {split} split have no label (first: {unlabelled[0]})",
                             data_dir / f"{split}.jsonl")


def _optimizer(config: FusionConfig, model: FusionModel, live: Encoders,
               text_top: TopLayers | None = None) -> torch.optim.AdamW:
    """AdamW with one parameter group per trained part, each at its own rate (head, text LM or its top
    layers, image CNN)."""
    text_encoder, image_encoder = live
    groups = [{"params": list(model.parameters()), "lr": config.lr}]
    if text_encoder is not None:
        groups.append({"params": list(text_encoder.model.parameters()), "lr": config.text_lr})
    if text_top is not None:
        groups.append({"params": list(text_top.layers.parameters()), "lr": config.text_top_lr})
    if image_encoder is not None:
        groups.append({"params": list(image_encoder.model.parameters()), "lr": config.image_lr})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _restore(run_dir: Path, model: FusionModel, live: Encoders, optimizer: torch.optim.Optimizer,
             text_top: TopLayers | None = None) -> tuple[dict, list[dict]]:
    """Weights and optimizer of the last finished epoch from ``resume/``; returns the scalar state and history."""
    saved = load_training_state(run_dir)
    trained = run_weights(model, *live, text_top)
    if set(saved.trainable) != set(trained):
        raise SentilensError("the resume state does not match this run's model", run_dir / RESUME_DIR)
    for name, value in saved.trainable.items():
        trained[name].copy_(value)
    optimizer.load_state_dict(saved.optimizer)
    return saved.state, load_history(run_dir)


def _train_epoch(model: FusionModel, optimizer: torch.optim.Optimizer, posts: Sequence[Post],
                 features: Sequence[PostFeatures], config: FusionConfig, epoch: int, live: Encoders,
                 device: str, on_batch: Callable[[float, float], None], class_weights: torch.Tensor | None = None,
                 text_top: TopLayers | None = None) -> float:
    """One pass over the training posts in this epoch's seeded order; returns the mean loss."""
    label_index = {label: i for i, label in enumerate(config.labels)}
    model.train()
    for encoder in live:
        if encoder is not None:
            encoder.model.train()
    if text_top is not None:
        text_top.layers.train()
    seed = epoch_seed(config.seed, epoch)
    torch.manual_seed(seed)
    order = torch.randperm(len(posts), generator=torch.Generator().manual_seed(seed)).tolist()
    total = 0.0
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        batch_posts = [posts[i] for i in idx]
        batch = collate_features([features[i] for i in idx], batch_posts, *config.feature_dims, live[0], device,
                                 live[1], text_top)
        targets = torch.tensor([label_index[p.label] for p in batch_posts], device=device)
        loss = F.cross_entropy(model(batch), targets, weight=class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_loss = loss.item()
        total += batch_loss * len(idx)
        on_batch(batch_loss, optimizer.param_groups[0]["lr"])
    return total / len(posts)


def _class_weights(config: FusionConfig, posts: Sequence[Post], device: str) -> torch.Tensor | None:
    """Loss weight of each label, n / (k x count), for ``class_weight: balanced`` (a label absent from train: 0)."""
    if config.class_weight == "none":
        return None
    counts = torch.tensor([sum(p.label == label for p in posts) for label in config.labels], dtype=torch.float32)
    weights = torch.where(counts > 0, len(posts) / (len(config.labels) * counts.clamp(min=1)), torch.zeros(()))
    return weights.to(device)


def _score(predictor: FusionPredictor, posts: Sequence[Post], features: Sequence[PostFeatures]) -> tuple[dict, list]:
    predictions = predictor.to_predictions(predictor.probabilities(features, posts))
    metrics = classification_metrics([p.label for p in posts], [p.label for p in predictions], predictor.labels)
    return metrics, predictions


def fit(config: FusionConfig, data_dir: str | Path, run_dir: str | Path, *, resume: bool = False,
        cache: FeatureCache | None = None, encoders: Encoders | None = None, features: SplitFeatures | None = None,
        device: str | None = None, log_with: str | None = None) -> dict:
    """Train (or, with ``resume``, continue) a fusion run; writes the run directory and returns a summary.

    ``encoders`` and ``features`` let several runs (the ablation) share loaded encoders and features;
    ``log_with`` names a tracker (:mod:`sentilens.training_log`).
    """
    started = time.perf_counter()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    device = str(resolve_device(device))
    splits = read_manifest(data_dir)
    labels = read_labels(data_dir)
    for split in ("train", "val"):
        _check_labelled(splits[split], split, data_dir)
    if not splits["train"]:
        raise SentilensError("the train split is empty", data_dir / "train.jsonl")
    check_training_labels(labels, [p.label for p in splits["train"]], data_dir / "train.jsonl")
    if config.labels and config.labels != labels:
        raise SentilensError(f"this run was trained on labels {config.labels}, the data has {labels}", data_dir)
    encoders = encoders or build_encoders(config, device)
    text_encoder, image_encoder = encoders
    config = config.model_copy(update={
        "labels": labels,
        "text_dim": text_encoder.dim if text_encoder is not None else None,
        "image_dim": image_encoder.dim if image_encoder is not None else None,
    })
    stats = CacheStats()
    if features is None:
        features, stats = featurize_splits(splits, config, encoders, cache)
    live = (text_encoder if config.fine_tune_text else None, image_encoder if config.fine_tune_image else None)
    if config.variant == "probe":
        return _fit_probe(config, splits, features, encoders, run_dir, device, stats, started)

    torch.manual_seed(config.seed)
    model = FusionModel(config, *config.feature_dims).to(device)
    predictor = FusionPredictor(config, model, text_encoder, image_encoder, device=device)
    text_top = predictor.text_top  # the predictor scores val with the very layers trained here
    optimizer = _optimizer(config, model, live, text_top)
    state: dict = {"epochs_done": 0, "best_epoch": None, "best": None}
    history: list[dict] = []
    if resume:
        state, history = _restore(run_dir, model, live, optimizer, text_top)
    save_config(run_dir, config)

    train_posts, n_train = splits["train"], len(splits["train"])
    class_weights = _class_weights(config, train_posts, device)
    steps = -(-n_train // config.batch_size)
    with TrainingLog(run_dir, history, epochs=config.epochs, steps_per_epoch=steps, log_with=log_with,
                     title=f"training fusion/{config.variant}", config=config.model_dump(mode="json")) as log:
        for epoch in range(state["epochs_done"], config.epochs):
            epoch_started = time.perf_counter()
            loss = _train_epoch(model, optimizer, train_posts, features["train"], config, epoch, live, device,
                                log.step, class_weights, text_top)
            val = _score(predictor, splits["val"], features["val"])[0] if splits["val"] else None
            record = {"epoch": epoch + 1, "train_loss": loss, "seconds": round(time.perf_counter() - epoch_started, 2)}
            if val is not None:
                record["val"] = {k: val[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
            log.epoch(record)
            val_f1 = None if val is None else val["weighted_f1"]
            best = state["best"]
            if val is None or best is None or val_f1 > best["weighted_f1"]:
                state["best_epoch"], state["best"] = epoch + 1, record.get("val")
                save_weights(run_dir / MODEL_WEIGHTS, run_weights(model, *live, text_top))
            state["epochs_done"] = epoch + 1
            save_history(run_dir, history)
            save_training_state(run_dir, run_weights(model, *live, text_top), optimizer.state_dict(), state)
            if config.patience and val_f1 is not None and state["epochs_done"] - state["best_epoch"] >= config.patience:
                break  # early stopping: no gain on val for `patience` epochs (the best epoch's weights are kept)

    best = load_weights(run_dir / MODEL_WEIGHTS, device)
    trained = run_weights(model, *live, text_top)
    for name, value in best.items():
        trained[name].copy_(value)
    summary = {"run": str(run_dir), "variant": config.variant, "epochs": state["epochs_done"],
               "best_epoch": state["best_epoch"], "cache": stats.to_dict()}
    _finish(config, predictor, splits, features, run_dir, summary)
    clear_training_state(run_dir)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _finish(config: FusionConfig, predictor: FusionPredictor, splits: dict[str, list[Post]], features: SplitFeatures,
            run_dir: Path, summary: dict) -> None:
    """The trained run's last steps: its decision offsets when asked for, then val and test scored and saved."""
    if config.tune_decision and splits["val"]:
        summary["decision"] = choose_decision_offsets(config, predictor, splits["val"], features["val"], run_dir)
    for split in ("val", "test"):
        posts = splits[split]
        if posts and all(p.label is not None for p in posts):
            metrics, predictions = _score(predictor, posts, features[split])
            save_metrics(run_dir, split, metrics)
            if split == "val":
                save_predictions(run_dir, split, [p.id for p in posts], predictions)
            summary[split] = metrics


def choose_decision_offsets(config: FusionConfig, predictor: FusionPredictor, posts: Sequence[Post],
                  features: Sequence[PostFeatures], run_dir: Path) -> dict:
    """Choose the decision offsets on the validation ``posts`` (:func:`sentilens.decision.tune_offsets`),
    write them into the run's ``config.json`` and give them to ``predictor``; returns what was chosen."""
    predictor.set_decision_offsets(None)
    probabilities = predictor.probabilities(features, posts).numpy()
    truth = np.array([predictor.labels.index(p.label) for p in posts])
    offsets, before, after = tune_offsets(probabilities, truth)
    save_config(run_dir, config.model_copy(update={"decision_offsets": offsets}))
    predictor.set_decision_offsets(offsets)
    return {"offsets": dict(zip(predictor.labels, offsets, strict=True)),
            "val_weighted_f1_argmax": before, "val_weighted_f1_tuned": after}


def choose_run_decision_offsets(run_dir: str | Path, data_dir: str | Path, cache: FeatureCache | None = None,
                      device: str | None = None) -> dict:
    """Give a trained run decision offsets chosen on ``data_dir``'s val split, re-scoring its val and test
    metrics with them: what ``choose_decision_offsets`` does at the end of training, for a run trained without it."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    predictor = FusionPredictor.from_run(run_dir, device=device)
    splits, labels = read_manifest(data_dir), read_labels(data_dir)
    if labels != predictor.labels:
        raise SentilensError(f"this run was trained on labels {predictor.labels}, the data has {labels}", data_dir)
    _check_labelled(splits["val"], "val", data_dir)
    if not splits["val"]:
        raise SentilensError("the val split is empty: decision offsets are chosen on it", data_dir)
    features = {split: featurize(splits[split], *predictor.feature_encoders, cache)[0] for split in ("val", "test")}
    config = predictor.settings.model_copy(update={"tune_decision": True})
    summary: dict = {"run": str(run_dir)}
    _finish(config, predictor, splits, features, run_dir, summary)
    return summary


def _fit_probe(config: FusionConfig, splits: dict[str, list[Post]], features: SplitFeatures, encoders: Encoders,
               run_dir: Path, device: str, stats: CacheStats, started: float) -> dict:
    """The ``probe`` variant: one logistic-regression fit (C chosen on val) instead of epochs of AdamW."""
    index = {label: i for i, label in enumerate(config.labels)}
    model = build_model(config, *config.feature_dims)
    search = fit_probe(model, features["train"], [index[p.label] for p in splits["train"]],
                       features["val"], [index[p.label] for p in splits["val"]], *config.feature_dims, seed=config.seed)
    save_config(run_dir, config)
    save_weights(run_dir / MODEL_WEIGHTS, model.state_dict())
    predictor = FusionPredictor(config, model, *encoders, device=device)
    summary = {"run": str(run_dir), "variant": config.variant, "epochs": None, "best_epoch": None,
               "probe": search, "cache": stats.to_dict()}
    _finish(config, predictor, splits, features, run_dir, summary)
    summary["seconds"] = time.perf_counter() - started
    return summary


def train_fusion(config: FusionConfig, data_dir: str | Path, run_dir: str | Path, **kwargs) -> dict:
    """Train a new fusion run into ``run_dir`` (which must not hold a run already)."""
    run_dir = Path(run_dir)
    if holds_trained_run(run_dir):
        raise SentilensError("already holds a run: pass --resume to continue it, or choose another --out", run_dir)
    return fit(config, data_dir, run_dir, **kwargs)


def resume_fusion(run_dir: str | Path, data_dir: str | Path, epochs: int | None = None, **kwargs) -> dict:
    """Continue an interrupted run after its last finished epoch, with its saved config (``epochs`` may extend it)."""
    run_dir = Path(run_dir)
    config = parse_fusion_config(load_config(run_dir), run_dir / CONFIG)
    check_resumable(run_dir)
    if epochs is not None:
        config = parse_fusion_config({**config.model_dump(), "epochs": epochs}, run_dir / CONFIG)
    return fit(config, data_dir, run_dir, resume=True, **kwargs)
