"""The run directory (design.md, "Run directory"): one format for every model family.

```
RUN/config.json              the family's typed run config (family, labels: the one place they are kept)
RUN/model.safetensors        the trained weights of the best epoch
RUN/history.json             one record per finished epoch: {"epoch", "train_loss", "seconds", "val"?}
RUN/metrics-<split>.json     metrics of a split (training writes val; `sentilens eval` any split)
RUN/predictions-val.jsonl    the best epoch's validation predictions, one row per post
RUN/resume/                  while training runs: trainable.safetensors, optimizer.safetensors, state.json
RUN/sweep.json, RUN/plots/   the retention sweep, when run
```

``resume/`` holds the state after the last finished epoch and is deleted when training ends.
Loading reads JSON and safetensors only: nothing in a run directory is ever unpickled. Runs
written by earlier versions (``labels.json``, the fusion ``checkpoint.safetensors``) predict as
they are; :func:`upgrade_run` (``sentilens upgrade-run``) converts what resuming needs.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from sentilens import outputs
from sentilens.errors import SentilensError
from sentilens.validation import check_labels, check_weights, load_json_file, parse_json

CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
HISTORY = "history.json"
RESUME_DIR = "resume"
RESUME_WEIGHTS = "trainable.safetensors"
RESUME_OPTIMIZER = "optimizer.safetensors"
RESUME_STATE = "state.json"


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented strict UTF-8 JSON, atomically (a crash or a full disk never leaves half a file;
    :func:`sentilens.outputs.write_json`)."""
    outputs.write_json(path, obj)


def read_json(path: str | Path) -> object:
    """A JSON file of a run (or one a command is given), strictly: :func:`sentilens.validation.load_json_file`."""
    return load_json_file(path)


def save_config(run_dir: str | Path, config: BaseModel) -> None:
    """``config.json`` from a family's typed run config (which names its ``family``)."""
    fields = config.model_dump(mode="json")
    if "family" not in fields:
        raise ValueError("a run config must name its model family")
    write_json(Path(run_dir) / CONFIG, fields)


def load_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise SentilensError("not a run directory (no config.json)", run_dir)
    config = read_json(run_dir / CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("family"), str):
        raise SentilensError("config.json does not name a model family (a string)", run_dir / CONFIG)
    if config.get("labels"):  # an empty list is each family's own error (the earlier layout kept labels apart)
        check_labels(config["labels"], run_dir / CONFIG)
    legacy_labels = run_dir / LEGACY_LABELS
    if legacy_labels.is_file() and read_json(legacy_labels) != config.get("labels"):
        # A run of an earlier version keeps its labels twice; when they disagree, which one the weights were
        # trained on cannot be told (issue 15: an MLLM run silently ignored its labels.json).
        raise SentilensError(f"labels {read_json(legacy_labels)} differ from config.json's {config.get('labels')}",
                             legacy_labels)
    return config


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors (contiguous CPU copies; shared storage is split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    except Exception as err:  # safetensors reports a full disk as its own error type, holding the OS error
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) or "Os {" in str(err):
            detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
            raise SentilensError(f"cannot write ({detail}); the file is as it was", path) from None
        raise


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise SentilensError("weights file not found", path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise SentilensError(f"not a valid safetensors file ({err})", path) from None
    check_weights(tensors, path)
    return tensors


def save_metrics(run_dir: str | Path, split: str, metrics: dict) -> Path:
    path = Path(run_dir) / f"metrics-{split}.json"
    write_json(path, metrics)
    return path


# ----------------------------------------------------------------------------- training history and resume state

def save_history(run_dir: str | Path, history: list[dict]) -> None:
    """``history.json``: one record per finished epoch, ``{"epoch", "train_loss", "seconds", "val"?}``."""
    write_json(Path(run_dir) / HISTORY, history)


def load_history(run_dir: str | Path) -> list[dict]:
    history = read_json(Path(run_dir) / HISTORY)
    if not isinstance(history, list):
        raise SentilensError("must be a JSON list of epoch records", Path(run_dir) / HISTORY)
    return history


def save_predictions(run_dir: str | Path, split: str, ids: Sequence[str], predictions: Sequence[object]) -> Path:
    """``predictions-<split>.jsonl``: one ``{"id", "label", "probabilities", ...}`` row per post, in order."""
    path = Path(run_dir) / f"predictions-{split}.jsonl"
    return outputs.write_jsonl(path, ({"id": post_id, **prediction.to_dict()}
                                      for post_id, prediction in zip(ids, predictions, strict=True)))


@dataclass
class TrainingState:
    """What resuming needs: the trainable tensors, the optimizer's state dict, and the scalar state
    (``epochs_done``, ``best_epoch``, ``best`` metrics, and whatever else the trainer stored, e.g. its schedule)."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict
    state: dict


def has_training_state(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RESUME_DIR / RESUME_STATE).is_file()


def save_training_state(run_dir: str | Path, trainable: dict[str, torch.Tensor], optimizer: dict, state: dict) -> None:
    """``resume/``: trainable tensors and AdamW moments as safetensors, the rest as JSON (nothing pickled).

    The state file is written last, so a crash while saving leaves the previous epoch's state readable
    only if it was complete: ``state.json`` names the epoch its tensors belong to.
    """
    folder = Path(run_dir) / RESUME_DIR
    save_weights(folder / RESUME_WEIGHTS, trainable)
    moments = {f"{index}.{name}": value for index, slots in optimizer["state"].items() for name, value in slots.items()
               if isinstance(value, torch.Tensor)}
    save_weights(folder / RESUME_OPTIMIZER, moments)
    write_json(folder / RESUME_STATE, {**state, "param_groups": optimizer["param_groups"]})


def check_resumable(run_dir: str | Path) -> None:
    """A one-line error unless ``run_dir`` holds a training state to resume from."""
    run_dir = Path(run_dir)
    if not has_training_state(run_dir):
        check_format(run_dir)
        raise SentilensError("nothing to resume here (no resume/state.json: the run finished, or stopped during its "
                             "first epoch, which starts over: run it again without --resume)", run_dir)


def holds_trained_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds what an epoch produced (weights or a training state), so a new run must not
    overwrite it. A folder with only ``config.json`` is a run stopped during its first epoch: training into it
    again starts over, losing nothing (issue 15: such a folder was refused by a rerun and by --resume alike)."""
    run_dir = Path(run_dir)
    return (run_dir / MODEL_WEIGHTS).exists() or (run_dir / RESUME_DIR).exists()


def load_training_state(run_dir: str | Path) -> TrainingState:
    """What :func:`save_training_state` wrote; the optimizer part loads with ``optimizer.load_state_dict``."""
    run_dir = Path(run_dir)
    folder = run_dir / RESUME_DIR
    check_resumable(run_dir)
    state = read_json(folder / RESUME_STATE)
    if not isinstance(state, dict) or "param_groups" not in state:
        raise SentilensError("not a training state (no param_groups)", folder / RESUME_STATE)
    slots: dict[int, dict] = {}
    for key, value in load_weights(folder / RESUME_OPTIMIZER).items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    groups = state.pop("param_groups")
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return TrainingState(load_weights(folder / RESUME_WEIGHTS), {"state": slots, "param_groups": groups}, state)


def clear_training_state(run_dir: str | Path) -> None:
    """Training finished: the resume state is deleted (it can be as large as the model twice over)."""
    shutil.rmtree(Path(run_dir) / RESUME_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------- runs of earlier versions

LEGACY_CHECKPOINT = "checkpoint.safetensors"
LEGACY_LABELS = "labels.json"


def check_format(run_dir: str | Path) -> None:
    """A run written before this format that cannot be used as it is gets a one-line error saying how to convert.

    Such runs predict as they are (``config.json`` and ``model.safetensors`` did not change); only the
    fusion family's old ``checkpoint.safetensors`` (resume state) needs :func:`upgrade_run`.
    """
    run_dir = Path(run_dir)
    if (run_dir / LEGACY_CHECKPOINT).is_file() and not has_training_state(run_dir):
        raise SentilensError(f"written by an earlier sentilens ({LEGACY_CHECKPOINT}); convert it with "
                             f"'sentilens upgrade-run --run {run_dir}'", run_dir)


def upgrade_run(run_dir: str | Path) -> list[str]:
    """Convert a run of the earlier layout in place; returns what was done (empty: nothing to do).

    - fusion ``checkpoint.safetensors`` (``model.*`` and ``optimizer.*`` tensors, the scalar state as
      metadata) -> ``resume/`` + ``history.json``;
    - ``labels.json`` -> removed once it agrees with ``config.json``'s labels (the one place kept).
    """
    from safetensors import safe_open

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    done = []
    legacy = run_dir / LEGACY_CHECKPOINT
    if legacy.is_file():
        tensors = load_weights(legacy)
        with safe_open(str(legacy), framework="pt") as f:
            state = parse_json((f.metadata() or {}).get("state", "null"), legacy)
        if not isinstance(state, dict) or "param_groups" not in state:
            raise SentilensError("checkpoint has no training state", legacy)
        history = [{"epoch": r["epoch"], "train_loss": r["train_loss"],
                    **({"val": {"weighted_f1": r["val_weighted_f1"]}} if r.get("val_weighted_f1") is not None else {})}
                   for r in state.get("history", [])]
        moments: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        trainable = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        best = state.get("best_val_weighted_f1")
        save_training_state(run_dir, trainable, {"state": moments, "param_groups": state["param_groups"]},
                            {"epochs_done": state["epoch"], "best_epoch": state.get("best_epoch"),
                             "best": None if best is None else {"weighted_f1": best}})
        save_history(run_dir, history)
        legacy.unlink()
        done.append(f"{LEGACY_CHECKPOINT} -> {RESUME_DIR}/ and {HISTORY}")
    labels_file = run_dir / LEGACY_LABELS
    if labels_file.is_file():
        if read_json(labels_file) != config.get("labels"):
            raise SentilensError(f"labels differ from config.json's {config.get('labels')}; fix one by hand",
                                 labels_file)
        labels_file.unlink()
        done.append(f"{LEGACY_LABELS} removed (the labels are in {CONFIG})")
    return done
