"""One predictor interface for both model families (design.md, "Predictor").

``load_predictor(run_dir)`` reads ``config.json``'s ``family`` and returns an object with
``predict(posts, keep_ratio=None) -> list[Prediction]``. ``eval``, ``predict``, ``sweep``,
``serve`` and ``demo`` all go through it, so each behaviour exists once.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from sentilens.data.records import Post
from sentilens.errors import SentilensError
from sentilens.metrics import classification_metrics
from sentilens.runs import load_config

FAMILIES = {
    "fusion": "sentilens.fusion.predictor:FusionPredictor",
    "mllm": "sentilens.mllm.predictor:MllmPredictor",
}


@dataclass
class Prediction:
    """A label, the probability of every label, and for MLLM runs the visual tokens kept."""

    label: str
    probabilities: dict[str, float]
    kept_tokens: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Predictor(Protocol):
    family: str
    labels: list[str]
    config: dict

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]: ...


def load_predictor(run_dir: str | Path, device: str | None = None) -> Predictor:
    """The predictor of a run directory, whichever family trained it."""
    config = load_config(run_dir)
    family = config["family"]
    if family not in FAMILIES:
        raise SentilensError(f"unknown model family '{family}' (known: {', '.join(FAMILIES)})",
                             Path(run_dir) / "config.json")
    module_name, class_name = FAMILIES[family].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_run(Path(run_dir), device=device)


def check_keep_ratio(keep_ratio: float | None) -> None:
    if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
        raise SentilensError(f"keep ratio must be in (0, 1], got {keep_ratio}")


def evaluate(predictor: Predictor, posts: Sequence[Post], keep_ratio: float | None = None) -> dict:
    """Metrics of ``predictor`` on labelled ``posts`` (the shared body of ``eval`` and ``sweep``)."""
    unlabelled = [p.id for p in posts if p.label is None]
    if unlabelled:
        raise SentilensError(f"{len(unlabelled)} posts have no label (first: {unlabelled[0]})")
    predictions = predict_distributed(lambda shard: predictor.predict(shard, keep_ratio=keep_ratio), posts)
    metrics = classification_metrics([p.label for p in posts], [p.label for p in predictions], predictor.labels)
    kept = [p.kept_tokens for p in predictions if p.kept_tokens is not None]
    if kept:
        metrics["mean_kept_tokens"] = sum(kept) / len(kept)
    if any("parsed" in p.extra for p in predictions):
        metrics["unparsable"] = sum(not p.extra.get("parsed", True) for p in predictions)
    return metrics


def is_main_process() -> bool:
    """False in every process but the first under ``accelerate launch`` (only the first writes outputs)."""
    return int(os.environ.get("RANK", "0")) == 0


def predict_distributed(predict: Callable[[Sequence[Post]], list[Prediction]],
                        posts: Sequence[Post]) -> list[Prediction]:
    """``predict(posts)``; under ``accelerate launch`` with several processes, sharded and merged.

    Each process predicts an interleaved shard of equal size (the last shards are filled by
    repeating posts from the start, so every process runs the same number of batches, as
    DeepSpeed ZeRO-3 needs); every process returns all predictions, in input order.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not posts:
        return predict(posts)
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    world, rank = state.num_processes, state.process_index
    if not state.is_main_process:
        os.environ["SENTILENS_QUIET"] = "1"
    per_process = -(-len(posts) // world)
    padded = [posts[i % len(posts)] for i in range(per_process * world)]
    mine = predict(padded[rank::world])
    gathered = gather_object(list(mine))
    merged: list[Prediction] = [None] * len(padded)  # type: ignore[list-item]
    for r in range(world):
        merged[r::world] = gathered[r * per_process:(r + 1) * per_process]
    return merged[: len(posts)]
