"""The MLLM run's configuration: what ``config.json`` holds for ``family: mllm`` (docs/architecture.md, "The run
directory").

One pydantic model, saved by :func:`sentilens.mllm.train.train_mllm` and read back by
:class:`sentilens.mllm.predictor.MllmPredictor`: the base checkpoint, the fine-tuning mode,
LoRA and prompt settings, the labels (the only place a run keeps them) and the training
options it was trained with. It is enough to rebuild the model on top of the base checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sentilens.errors import SentilensError
from sentilens.mllm.families import TITLES, parse_tiny
from sentilens.mllm.model import LoraSettings, Mode
from sentilens.mllm.prompt import PromptSettings, saved_prompt
from sentilens.mllm.scoring import Decode
from sentilens.validation import pydantic_error

DECODINGS: tuple[str, ...] = get_args(Decode)


class EvalPrecision(BaseModel):
    """The numerics a run was validated in, which test and serving then use (``train.evaluation_precision``)."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["float32", "bfloat16", "float16"] = Field(description="dtype the weights are loaded in")
    autocast: Literal["bfloat16"] | None = Field(None, description="torch.autocast dtype, or None")


class MllmRunConfig(BaseModel):
    """Everything an MLLM run needs to be rebuilt; saved as ``config.json`` with ``family: mllm``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    family: Literal["mllm"] = "mllm"
    base_model: str = Field(description="HF id, absolute folder, or a folder inside the run (e.g. base-model)")
    model_family: str | None = Field(None, description="the model family the run was trained as (llava, qwen2.5-vl, "
                                                       "...); None: runs saved before it was recorded")
    mode: Mode = "full"
    lora: LoraSettings | None = None
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    labels: list[str]
    weights: str | None = Field("model.safetensors", description="the trained tensors; None: a zero-shot run "
                                                                "(the base checkpoint as it is)")
    num_image_tokens: int = Field(gt=0, le=1 << 17)
    decode: Decode = "score"
    predict_batch_size: int = Field(8, gt=0, le=4096)
    best_epoch: int | None = None
    precision: EvalPrecision | None = Field(None, description="None (runs made before it was saved): bf16 on CUDA")
    batch: dict[str, int] | None = Field(None, description="the batch training used: global, per_device, "
                                                           "processes, grad_accum")
    training: dict[str, Any] = Field(default_factory=dict, description="the options train mllm was given")


def load_run_config(config: dict, path: Path | None = None) -> MllmRunConfig:
    """The typed config of ``config.json``'s mapping (prompt settings it predates as they were then:
    :func:`sentilens.mllm.prompt.saved_prompt`); a problem is a one-line user error naming ``path``."""
    try:
        return MllmRunConfig(**{**config, "prompt": saved_prompt(config.get("prompt"))})
    except ValidationError as err:
        raise pydantic_error(err, path, what="MLLM run config: ") from None


def describe_run(config: dict, run_dir: Path | None = None) -> dict:
    """The MLLM run's self-description (the predictor's ``describe()``), from its ``config.json`` alone."""
    from sentilens.predict import config_summary

    settings = load_run_config(config, None if run_dir is None else run_dir / "config.json")
    base = settings.training.get("base_model") or settings.base_model
    model_family = settings.model_family or _tiny_family(base)
    return {
        "family": settings.family,
        "labels": list(settings.labels),
        "base_model": settings.base_model,
        "description": f"{TITLES.get(model_family, 'vision-language model')} ({base}, "
                       f"{'zero-shot' if settings.weights is None else settings.mode + ' fine-tuning'})",
        "config": config_summary(settings.model_dump(mode="json")),
    }


def _tiny_family(base_model: str) -> str | None:
    """The family of a ``tiny:<family>`` base (runs saved before ``model_family`` was recorded), else None."""
    try:
        return parse_tiny(base_model)
    except SentilensError:
        return None
