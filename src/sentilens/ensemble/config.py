"""The ensemble run's ``config.json``: its labels, its members (folders under ``members/``), their
weights and the optional decision offsets (:mod:`sentilens.decision`) on the combined probabilities."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sentilens.validation import pydantic_error

MEMBERS = "members"
"""The folder of an ensemble run that holds its members' run folders."""

MAX_MEMBERS = 32


class EnsembleConfig(BaseModel):
    """Everything an ensemble run needs; saved as ``config.json`` with ``family: ensemble``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    family: Literal["ensemble"] = "ensemble"
    labels: list[str]
    members: list[str] = Field(min_length=2, max_length=MAX_MEMBERS)
    """Folder names under ``members/``, in the order their weights are given."""
    weights: list[float]
    """One weight per member, each above zero; the combination divides by their sum."""
    decision_offsets: list[float] | None = None
    """One offset per label added to the log of the combined probabilities before the argmax; ``None``: none."""

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        for name in self.members:
            if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"member '{name}' is not a plain folder name under {MEMBERS}/")
        if len(set(self.members)) != len(self.members):
            raise ValueError("the members are not all different")
        if len(self.weights) != len(self.members):
            raise ValueError(f"{len(self.weights)} weights for {len(self.members)} members")
        if not all(w > 0 and math.isfinite(w) for w in self.weights):
            raise ValueError(f"every weight must be above zero, got {self.weights}")
        if self.decision_offsets is not None and len(self.decision_offsets) != len(self.labels):
            raise ValueError(f"{len(self.decision_offsets)} decision offsets for {len(self.labels)} labels")
        return self


def parse_ensemble_config(fields: dict, path: Path | None = None) -> EnsembleConfig:
    try:
        return EnsembleConfig(**fields)
    except ValidationError as err:
        raise pydantic_error(err, path) from None


def describe_run(config: dict, run_dir: Path) -> dict:
    """The ensemble's self-description (the predictor's ``describe()``), from the ``config.json`` files alone."""
    from sentilens.predict import describe_run as describe_member

    settings = parse_ensemble_config(config, run_dir / "config.json")
    return describe_members(settings, [describe_member(run_dir / MEMBERS / name) for name in settings.members])


def describe_members(settings: EnsembleConfig, members: list[dict]) -> dict:
    """``describe()`` of an ensemble from its members' own descriptions."""
    from sentilens.predict import config_summary

    parts = [f"{name} (weight {w:g}): {m['description']}"
             for name, w, m in zip(settings.members, settings.weights, members, strict=True)]
    return {
        "family": settings.family,
        "labels": list(settings.labels),
        "base_model": " | ".join(m["base_model"] for m in members),
        "description": f"ensemble of {len(members)} runs: {'; '.join(parts)}",
        "config": {**config_summary(settings.model_dump()), "members": len(members),
                   "decision_offsets": settings.decision_offsets is not None},
    }
