"""The run directory (design.md, "Run directory").

``config.json`` (everything needed to rebuild the model, with ``"family"``), weights in
safetensors, ``labels.json``, ``metrics-<split>.json``, ``sweep.json`` and ``plots/``.
Loading reads JSON and safetensors only: nothing in a run directory is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sentilens.errors import SentilensError

CONFIG = "config.json"
LABELS = "labels.json"
WEIGHTS = "model.safetensors"


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise SentilensError("no such file", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SentilensError(f"not valid JSON ({err.msg})", path, err.lineno) from None


def save_config(run_dir: str | Path, config: dict) -> None:
    if "family" not in config:
        raise ValueError("a run config must name its model family")
    write_json(Path(run_dir) / CONFIG, config)


def load_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise SentilensError("not a run directory (no config.json)", run_dir)
    config = read_json(run_dir / CONFIG)
    if not isinstance(config, dict) or "family" not in config:
        raise SentilensError("config.json does not name a model family", run_dir / CONFIG)
    return config


def save_labels(run_dir: str | Path, labels: list[str]) -> None:
    write_json(Path(run_dir) / LABELS, list(labels))


def load_labels(run_dir: str | Path) -> list[str]:
    labels = read_json(Path(run_dir) / LABELS)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise SentilensError("must be a JSON list of label words", Path(run_dir) / LABELS)
    return labels


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors (contiguous CPU copies; shared storage is split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise SentilensError("weights file not found", path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise SentilensError(f"not a valid safetensors file ({err})", path) from None


def save_metrics(run_dir: str | Path, split: str, metrics: dict) -> Path:
    path = Path(run_dir) / f"metrics-{split}.json"
    write_json(path, metrics)
    return path
