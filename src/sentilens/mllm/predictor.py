"""The MLLM run's predictor (design.md, "Predictor"): rebuilds the fine-tuned LLaVA from a run directory.

``config.json`` names the base checkpoint (an HF id, an absolute folder, or ``base-model``
inside the run for ``--model tiny``), the fine-tuning mode, LoRA settings, prompt settings
and labels; ``model.safetensors`` holds the trained tensors (projector + language model, or
projector + LoRA adapters), loaded onto the freshly loaded base. Nothing is unpickled.

``predict(posts, keep_ratio)`` scores labels (or decodes, ``decode = "generate"``); with a
keep ratio, the visual tokens are filtered by :mod:`sentilens.mllm.pruning`'s reducer
(``make_reducer(llava, keep_ratio, **config.get("pruning", {}))``) before the projector.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sentilens.data.records import Post
from sentilens.errors import SentilensError
from sentilens.mllm.inputs import Reducer
from sentilens.mllm.model import LoraSettings, MllmModel, num_image_tokens, prepare_model
from sentilens.mllm.prompt import PromptBuilder, PromptSettings
from sentilens.mllm.scoring import Decode, predict_posts
from sentilens.predict import Prediction, check_keep_ratio
from sentilens.runs import load_config, load_weights


def default_device() -> torch.device:
    """This process's accelerator under ``accelerate launch``, else CUDA if present, else CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_source(run_dir: Path, base: str) -> str:
    """The base checkpoint of a run: a folder inside the run directory, else an HF id or path as stored."""
    inside = run_dir / base
    return str(inside) if inside.is_dir() else base


class MllmPredictor:
    """Predicts labels of posts with a fine-tuned LLaVA run."""

    family = "mllm"

    def __init__(self, model: MllmModel, builder: PromptBuilder, config: dict, batch_size: int = 8,
                 decode: Decode = "score"):
        self.model = model
        self.builder = builder
        self.config = config
        self.labels = list(builder.labels)
        self.batch_size = batch_size
        self.decode = decode

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device | None = None) -> MllmPredictor:
        run_dir = Path(run_dir)
        config = load_config(run_dir)
        for key in ("base_model", "mode", "prompt", "labels", "weights"):
            if key not in config:
                raise SentilensError(f"MLLM run config lacks '{key}'", run_dir / "config.json")
        device = torch.device(device) if device is not None else default_device()
        lora = LoraSettings(**config["lora"]) if config.get("lora") else None
        model = prepare_model(base_source(run_dir, config["base_model"]), config["mode"], lora, device=device,
                              training=False)
        weights = run_dir / config["weights"]
        model.load_trainable_state(load_weights(weights, device=device), weights)
        model.eval()
        settings = PromptSettings(**config["prompt"])
        builder = PromptBuilder(model.processor, settings, config["labels"],
                                num_image_tokens(model.llava, model.processor))
        return cls(model, builder, config, batch_size=int(config.get("predict_batch_size", 8)),
                   decode=config.get("decode", "score"))

    def reducer(self, keep_ratio: float | None) -> Reducer | None:
        """The visual-token filter for ``keep_ratio`` (None: every visual token reaches the language model)."""
        if keep_ratio is None:
            return None
        check_keep_ratio(keep_ratio)
        from sentilens.mllm import pruning

        return pruning.make_reducer(self.model.llava, keep_ratio, **self.config.get("pruning", {}))

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        return predict_posts(self.model.llava, self.builder, list(posts), self.batch_size,
                             reducer=self.reducer(keep_ratio), decode=self.decode)
