"""Helpers of the MLLM tests: the tiny LLaVA saved and loaded back, small synthetic manifests, native HF inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sentilens.data.records import Post, read_manifest, write_manifest
from sentilens.data.synth import LABELS, make_synthetic
from sentilens.mllm.model import build_tiny, num_image_tokens, prepare_model
from sentilens.mllm.prompt import PromptBuilder, PromptSettings

LONG_TEXT = " ".join(["what a long and winding story about the weather this week"] * 4)


FAST_TINY = {"base_model": "tiny", "tiny_vision": "random", "lr": 3e-3, "batch_size": 8, "global_batch_size": 8,
             "eval_batch_size": 8}
"""Training options of the tiny LLaVA in tests: a random model needs a large step and small batches. The
tower stays random (no pretraining first): these tests check the fine-tuning machinery, not the tower;
tests/test_mllm_tower.py and the demo test cover the pretrained one."""


def tiny_model(folder: Path, mode: str = "full", training: bool = False):
    """(MllmModel, PromptBuilder) of a freshly built tiny LLaVA, loaded through ``from_pretrained``."""
    if not (folder / "config.json").is_file():
        build_tiny(folder, corpus=["the sun is out and I love it", "another terrible storm"])
    model = prepare_model(folder, mode, training=training)
    builder = PromptBuilder(model.processor, PromptSettings(), LABELS, num_image_tokens(model.llava, model.processor))
    return model, builder


def small_manifest(folder: Path, n_train: int = 32, n_val: int = 8, n_test: int = 8) -> Path:
    """A manifest cut from the synthetic set (made once per folder); the test split also gets a long
    post and a text-only post. With ``n_val=0`` there is no val split, so training keeps its last epoch."""
    source = folder / "synth"
    if not (source / "stats.json").is_file():
        make_synthetic(source, n=200, seed=3)
    full = read_manifest(source)
    test = full["test"][: n_test - 2]
    test.append(dataclasses.replace(full["test"][n_test - 2], id="long", text=LONG_TEXT))
    test.append(Post(id="text-only", text="worst day ever, everything went wrong", image=None, label="negative"))
    splits = {"train": full["train"][:n_train], "val": full["val"][:n_val], "test": test}
    out = folder / f"manifest-{n_train}-{n_val}-{n_test}"
    write_manifest(out, splits, LABELS, source={"name": "synthetic subset"})
    return out


def train_tiny_mllm(data: Path, out: Path, epochs: int = 1) -> Path:
    """A tiny-LLaVA run trained on ``data`` into ``out`` with the tests' recipe (FAST_TINY)."""
    from sentilens.mllm.train import mllm_train_config, train_mllm

    train_mllm(mllm_train_config({"data": data, "out": out, **FAST_TINY, "epochs": epochs}))
    return out
