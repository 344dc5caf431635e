"""The fusion paper's ablation (Section 5, its ablation table): every variant on the same cached features.

The first row is the baseline every table must show (issue 10): the ``probe``, a logistic
regression on the frozen pooled features, so the table says what the fusion head adds over the
simplest model; it is always trained, whichever rows are asked for. The other rows follow the
paper's order: the text branch without a prompt ("simple GPT"), the prompted text branch, the image
branch, plain concatenation, contextual attention without routing, and the full model.
Features are computed (or read from the cache) once and shared by all rows; the prompt-less
row only adds the text features of its own template. Each row is a complete run directory under
``out/<row>``, so any of them can be evaluated, served or compared later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentilens.data.records import read_manifest
from sentilens.distributed import resolve_device
from sentilens.errors import SentilensError
from sentilens.fusion.cache import FeatureCache, PostFeatures, featurize
from sentilens.fusion.config import VARIANT_DESCRIPTIONS, FusionConfig
from sentilens.fusion.encoders import ImageEncoder, TextEncoder, build_encoders
from sentilens.fusion.train import featurize_splits, train_fusion
from sentilens.metrics import with_interval
from sentilens.outputs import atomic_write_text
from sentilens.runs import write_json
from sentilens.tables import markdown_table

NO_PROMPT = "text-noprompt"
BASELINE = "probe"
ROWS: tuple[str, ...] = (BASELINE, NO_PROMPT, "text", "image", "concat", "attention", "full")
ROW_DESCRIPTIONS = {NO_PROMPT: "text only, the post without a prompt (the paper's 'simple GPT')",
                    **VARIANT_DESCRIPTIONS}


def markdown(ablation: dict) -> str:
    """The ablation table in markdown: one row per variant, accuracy and F1s (with 95 % intervals) on the test split."""
    binary = [row.get("binary_f1") for row in ablation["variants"]]
    positive = next((row["positive_label"] for row in ablation["variants"] if "positive_label" in row), None)
    lines = [f"# Fusion ablation ({ablation['split']} split of {ablation['data']})", "",
             f"Encoders: image {ablation['image_encoder']}, text {ablation['text_encoder']} "
             f"with prompt '{ablation['prompt']}'. Fractions in [0, 1]; 95 % bootstrap intervals in brackets.", ""]
    headers = ["variant", "description", "accuracy", "weighted F1", "macro F1",
               *([f"F1 of {positive}"] if positive else []), "best epoch"]
    rows = [[row["variant"], row["description"], with_interval(row["accuracy"], row.get("accuracy_ci")),
             with_interval(row["weighted_f1"], row.get("weighted_f1_ci")), row["macro_f1"],
             *([row_binary] if positive else []), row["best_epoch"] or "-"]
            for row, row_binary in zip(ablation["variants"], binary, strict=True)]
    lines.append(markdown_table(headers, rows))
    return "\n".join(lines) + "\n"


def ablate(config: FusionConfig, data_dir: str | Path, out_dir: str | Path, rows: Sequence[str] = ROWS,
           cache: FeatureCache | None = None, device: str | None = None) -> dict:
    """Train one run per row under ``out_dir`` and write ``ablation.json`` and ``ablation.md``."""
    unknown = [row for row in rows if row not in ROW_DESCRIPTIONS]
    if unknown:
        raise SentilensError(f"unknown ablation rows {unknown} (choose from {', '.join(ROWS)})")
    rows = [BASELINE, *(row for row in rows if row != BASELINE)]
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = str(resolve_device(device))
    splits = read_manifest(data_dir)
    split = "test" if splits["test"] and all(p.label is not None for p in splits["test"]) else "val"
    if not splits[split]:
        raise SentilensError("the ablation needs a labelled test or val split", data_dir)
    frozen = {"fine_tune_text": False, "fine_tune_image": False, "text_top_layers": 0}
    # Frozen features of both modalities, once: the probe reads them even when the other rows fine-tune.
    shared = config.model_copy(update={"variant": "full", **frozen})
    text_encoder, image_encoder = build_encoders(shared, device)
    features, stats = featurize_splits(splits, shared, (text_encoder, image_encoder), cache)
    results = []
    for row in rows:
        variant = "text" if row == NO_PROMPT else row
        row_config = config.model_copy(update={"variant": variant, "prompt": "none" if row == NO_PROMPT
                                               else config.prompt, **(frozen if row == BASELINE else {})})
        row_text, row_image, row_features = text_encoder, image_encoder, features
        # A fine-tuned encoder (or one whose top layers train) is fresh in every row.
        if row == NO_PROMPT or row_config.fine_tune_text or row_config.text_top_layers:
            row_text = TextEncoder(row_config.text_encoder, row_config.prompt_template, row_config.max_text_tokens,
                                   trainable=row_config.fine_tune_text, device=device)
        if row_config.fine_tune_image:
            row_image = ImageEncoder(row_config.image_encoder, row_config.image_size, device=device, trainable=True)
        if row_config.text_top_layers:
            row_features = None  # the states below the top layers: featurized (and cached) by the run
        elif row == NO_PROMPT and not row_config.fine_tune_text:
            row_features = {}
            for name, posts in splits.items():
                plain, _ = featurize(posts, row_text, None, cache)
                row_features[name] = [PostFeatures(text=plain_f.text, image=f.image)
                                      for plain_f, f in zip(plain, features[name], strict=True)]
        summary = train_fusion(row_config, data_dir, out_dir / row, cache=cache, encoders=(row_text, row_image),
                               features=row_features, device=device)
        metrics = summary[split]
        results.append({"variant": row, "description": ROW_DESCRIPTIONS[row], "accuracy": metrics["accuracy"],
                        "weighted_f1": metrics["weighted_f1"], "macro_f1": metrics["macro_f1"],
                        **{key: metrics[key] for key in ("accuracy_ci", "weighted_f1_ci", "binary_f1", "positive_label")
                           if key in metrics},
                        "val_weighted_f1": summary["val"]["weighted_f1"] if "val" in summary else None,
                        "best_epoch": summary["best_epoch"], "run": row, "seconds": summary["seconds"]})
    ablation = {"data": str(data_dir), "split": split,
                "text_encoder": config.text_encoder, "image_encoder": config.image_encoder, "prompt": config.prompt,
                "epochs": config.epochs, "seed": config.seed, "cache": stats.to_dict(), "variants": results}
    write_json(out_dir / "ablation.json", ablation)
    atomic_write_text(out_dir / "ablation.md", markdown(ablation))
    return ablation
