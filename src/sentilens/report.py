"""The report a person reads: markdown tables in the papers' layouts, and plots (matplotlib).

Sections: data counts per split x label; model comparison in the layout of the LLaVA paper's
Table 3 (accuracy, weighted F1 per model); the fusion ablation in the layout of the fusion
paper's ablation; token filtering in the layout of the LLaVA paper's Table 4 with the sweep
plot; confusion matrices; Figure-3-style heatmaps; environment and stage timings. The papers'
own numbers appear only in columns labelled as the papers' numbers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sentilens.machine import environment  # noqa: E402
from sentilens.metrics import with_interval  # noqa: E402
from sentilens.mllm.pruning import strategy_legend  # noqa: E402
from sentilens.outputs import atomic_write_text, save_figure  # noqa: E402
from sentilens.predict import describe_run  # noqa: E402
from sentilens.runs import load_config, read_json  # noqa: E402
from sentilens.tables import markdown_table  # noqa: E402
from sentilens.training_log import PLOT as TRAINING_PLOT  # noqa: E402


def data_section(stats: dict) -> str:
    labels = stats["labels"]
    rows = [[split, *(stats["counts"][split][label] for label in labels), stats["totals"][split]]
            for split in stats["counts"]]
    dropped = len(stats.get("dropped", []))
    return "## Data\n\nPosts per split x label.\n\n" + markdown_table(["split", *labels, "total"], rows) + (
        f"\n\n{dropped} items were dropped while preparing (reasons in stats.json).\n" if dropped else "\n")


def run_name(run_dir: Path, config: dict) -> str:
    return config.get("name") or run_dir.name


def comparison_section(run_dirs: Sequence[Path], split: str = "test") -> tuple[str, list[dict]]:
    """Table 3 layout: one row per run with accuracy and weighted F1 on ``split``."""
    rows, records = [], []
    for run_dir in run_dirs:
        config = load_config(run_dir)
        metrics_path = run_dir / f"metrics-{split}.json"
        if not metrics_path.is_file():
            continue
        metrics = read_json(metrics_path)
        name = run_name(run_dir, config)
        records.append({"run": str(run_dir), "name": name, "metrics": metrics})
        rows.append([name, describe_run(run_dir)["description"],
                     with_interval(metrics["accuracy"], metrics.get("accuracy_ci")),
                     with_interval(metrics["weighted_f1"], metrics.get("weighted_f1_ci")), metrics["macro_f1"],
                     metrics.get("binary_f1")])
    text = (f"## Model comparison\n\nLayout of the LLaVA paper's Table 3, on the {split} split "
            "(our runs; fractions in [0, 1]; 95 % bootstrap intervals in brackets; binary F1 is the positive "
            "class's F1 for two-label tasks).\n\n"
            + markdown_table(["model", "description", "accuracy", "weighted F1", "macro F1", "binary F1"], rows)
            + "\n")
    return text, records


def ablation_section(ablation: dict) -> str:
    """The fusion paper's ablation layout: accuracy and weighted F1 per variant."""
    rows = [[v["variant"], v.get("description", ""), with_interval(v["accuracy"], v.get("accuracy_ci")),
             with_interval(v["weighted_f1"], v.get("weighted_f1_ci"))] for v in ablation["variants"]]
    return ("## Fusion ablation\n\nLayout of the fusion paper's ablation (text only, image only, concatenation, "
            "attention without routing, full model), our runs on the "
            "same cached features; 95 % bootstrap intervals in brackets.\n\n"
            + markdown_table(["variant", "description", "accuracy", "weighted F1"], rows) + "\n")


def sweep_section(sweep: dict, plot: Path | None, out_dir: Path) -> str:
    """The LLaVA paper's Table 4 layout for one run: measured and FLOP-ideal speedups, the paper's beside them."""
    paper = {round(float(row["ratio"]), 2): row["speedup"] for row in sweep.get("paper_table4", [])}
    rows = []
    for row in sweep["rows"]:
        paper_speedup = paper.get(round(float(row["ratio"]), 2))
        rows.append([row["ratio"], row.get("strategy", ""), row["kept_tokens"],
                     with_interval(row["accuracy"], row.get("accuracy_ci")),
                     with_interval(row["weighted_f1"], row.get("weighted_f1_ci")),
                     row["latency_ms_per_post"], row["speedup"], row.get("end_to_end_speedup", ""),
                     row.get("ideal_speedup", ""),
                     "" if paper_speedup is None else paper_speedup])
    text = ("## Token filtering\n\nLayout of the LLaVA paper's Table 4: visual tokens kept at each retention ratio, "
            f"per strategy ({strategy_legend()}). Speedup is measured against r = 1 of the "
            "same strategy on the model's work (the prediction less reading and decoding the image files, which no "
            "keep ratio changes), end to end on the whole prediction (latency); FLOP-ideal is what the same token "
            "counts would give if time followed arithmetic. The last column is the paper's number (LLaVA-1.5-7B on a "
            "GPU), not ours.\n\n"
            + markdown_table(["ratio", "strategy", "kept tokens", "accuracy", "weighted F1", "latency ms/post",
                              "speedup", "end-to-end speedup", "FLOP-ideal speedup", "paper's speedup"], rows)
            + "\n")
    share, timing = sweep.get("language_model_flop_share"), sweep.get("timing")
    if share is not None:
        text += (f"\nThe language model does {share:.0%} of this model's FLOPs at r = 1 (in LLaVA-1.5-7B it does "
                 "about 95 %): only that part shrinks with fewer visual tokens.")
    if timing:
        before, after = timing["load_average_before"][0], timing["load_average_after"][0]
        text += (f" Timed on {timing['threads']} thread(s), batches of {timing['batch_size']}, {sweep['repeats']} "
                 f"interleaved passes (median); 1-minute load average {before:.1f} before, {after:.1f} after.")
    if share is not None or timing:
        text += "\n"
    if plot is not None and plot.is_file():
        text += f"\n![retention sweep]({os.path.relpath(plot, out_dir)})\n"
    return text


def methods_section(sweep: dict, select_on: str | None = "val", plot: Path | None = None,
                    out_dir: Path | None = None) -> str:
    """The pruning methods side by side: one row per method, one column per keep ratio below 1, each cell the
    accuracy and the measured speedup; the best accuracy of each ratio in bold. Empty for fewer than two.

    ``select_on``: the split the best method per budget is chosen on (:func:`chosen_per_budget`), never the
    swept one; the choice is marked in the table and listed with its score there and on the swept split. A sweep
    without rows of that split says so in one line. ``plot``: the accuracy-against-speedup plot to link."""
    strategies = list(dict.fromkeys(row.get("strategy", "") for row in sweep["rows"]))
    ratios = sorted({row["ratio"] for row in sweep["rows"] if row["ratio"] < 1.0}, reverse=True)
    if len(strategies) < 2 or not ratios:
        return ""
    split = sweep.get("split", "test")
    cells = {(row.get("strategy", ""), row["ratio"]): row for row in sweep["rows"]}
    best = {r: max(cells[s, r]["accuracy"] for s in strategies if (s, r) in cells) for r in ratios}
    chosen = None if select_on in (None, split) else chosen_per_budget(sweep, select_on, ratios)
    rows = []
    for strategy in strategies:
        line = [strategy]
        for ratio in ratios:
            row = cells.get((strategy, ratio))
            if row is None:
                line.append("")
                continue
            accuracy = f"{row['accuracy']:.3f}"
            mark = " †" if chosen and ratio in chosen and chosen[ratio]["strategy"] == strategy else ""
            line.append(f"{f'**{accuracy}**' if row['accuracy'] == best[ratio] else accuracy} "
                        f"({row['speedup']:.2f}x){mark}")
        rows.append(line)
    text = (f"## Pruning methods side by side\n\nAccuracy on {sweep['n']} {split} posts "
            "(measured speedup against each method's r = 1) at each keep ratio; the best accuracy of a ratio in "
            f"bold (read off {split}: a description, not a choice)"
            + ("" if not chosen else f"; † the method chosen for that budget on {select_on}") + ".\n\n"
            + markdown_table(["method", *(f"r = {r:g}" for r in ratios)], rows) + "\n")
    costs = [(s, cells[s, ratios[-1]]["selection_ms"]) for s in strategies
             if "selection_ms" in cells.get((s, ratios[-1]), {})]
    if costs:
        text += (f"\nEach method's own selection cost at r = {ratios[-1]:g} (ms per post, timed around its choosing "
                 "of tokens inside the prediction: its scores, ranking and pick, and the scoring an attention-scored "
                 "method adds to the tower): " + ", ".join(f"`{s}` {ms:.2f}" for s, ms in costs) + ".\n")
    if select_on is not None:
        text += "\n" + selection_text(sweep, select_on, chosen, cells, best) + "\n"
    refused = sweep.get("refused_strategies")
    if refused:
        text += "\nNot run on this model: " + "; ".join(f"`{k}` ({v})" for k, v in refused.items()) + ".\n"
    if plot is not None and out_dir is not None and plot.is_file():
        text += f"\n![accuracy against measured speedup]({os.path.relpath(plot, out_dir)})\n"
    return text


def select_rows(sweep: dict, select_on: str) -> list[dict]:
    """The rows a sweep holds of split ``select_on``: those ``sweep --select-on`` scored there (its
    ``selection.candidates``); none when the sweep chose on another split or on none."""
    selection = sweep.get("selection") or {}
    return list(selection.get("candidates") or []) if selection.get("on") == select_on else []


def chosen_per_budget(sweep: dict, select_on: str, ratios: Sequence[float]) -> dict[float, dict]:
    """Per keep ratio, the method with the best score on ``select_on``'s rows (the metric the sweep chose by,
    weighted F1 by default; ties to the method listed first); a ratio not scored there has no choice."""
    metric = (sweep.get("selection") or {}).get("metric", "weighted_f1")
    chosen: dict[float, dict] = {}
    for row in select_rows(sweep, select_on):
        ratio = row["ratio"]
        if ratio in ratios and (ratio not in chosen or row[metric] > chosen[ratio][metric]):
            chosen[ratio] = {**row, "metric": metric}
    return chosen


METRIC_NAMES = {"accuracy": "accuracy", "weighted_f1": "weighted F1", "macro_f1": "macro F1"}


def selection_text(sweep: dict, select_on: str, chosen: dict[float, dict] | None, cells: dict,
                   best: dict[float, float]) -> str:
    """The methods chosen per budget on ``select_on`` with their scores there and on the swept split, or the one
    line saying the sweep has no rows to choose on."""
    split = sweep.get("split", "test")
    if select_on == split:
        return (f"The {split} split is the swept one, so it cannot choose the method it reports: no method is "
                "chosen per budget here (choose on another split, e.g. `--select-on val`).")
    if not chosen:
        return (f"This sweep holds no {select_on} rows (`sentilens sweep --select-on {select_on}` scores them), so "
                "no method is chosen per budget here.")
    metric = next(iter(chosen.values()))["metric"]
    named = METRIC_NAMES.get(metric, metric)
    n = (sweep.get("selection") or {}).get("n", "")
    rows = []
    for ratio, row in sorted(chosen.items(), reverse=True):
        reported = cells.get((row["strategy"], ratio))
        accuracy = "" if reported is None else f"{reported['accuracy']:.3f}"
        rows.append([f"{ratio:g}", f"`{row['strategy']}`", f"{row[metric]:.3f}", accuracy,
                     "yes" if reported is not None and reported["accuracy"] == best[ratio] else "no"])
    return (f"The method to deploy at each budget, chosen on {select_on} ({n} posts; best {named}, "
            f"ties to the method listed first), then reported on {split}, which did not choose it:\n\n"
            + markdown_table(["ratio", f"chosen on {select_on}", f"{select_on} {named}",
                              f"{split} accuracy", f"also the {split} best"], rows))


def plot_methods(sweep: dict, path: Path) -> Path:
    """:func:`methods_figure` written to ``path``."""
    fig = methods_figure(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def methods_figure(sweep: dict):
    """Accuracy against measured speedup, one line per method, a point per keep ratio (labelled with it)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # Ten colours, then the same ten with another marker and dashes: fifteen methods stay told apart.
    colours, styles = plt.get_cmap("tab10").colors, (("o", "-"), ("s", "--"), ("^", ":"))
    for i, strategy in enumerate(dict.fromkeys(row.get("strategy", "") for row in sweep["rows"])):
        rows = sorted((r for r in sweep["rows"] if r.get("strategy", "") == strategy), key=lambda r: -r["ratio"])
        marker, dashes = styles[(i // len(colours)) % len(styles)]
        line = ax.plot([r["speedup"] for r in rows], [r["accuracy"] for r in rows], marker=marker, linestyle=dashes,
                       color=colours[i % len(colours)], label=strategy)[0]
        for row in rows:
            ax.annotate(f"{row['ratio']:g}", (row["speedup"], row["accuracy"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7, color=line.get_color())
    ax.set(xlabel="measured speedup vs the method's r = 1 (x)", ylabel="accuracy",
           title=f"accuracy against speedup ({sweep['n']} {sweep.get('split', 'test')} posts; labels: keep ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def training_section(run_dirs: Sequence[Path], out_dir: Path) -> str:
    """Each run's training curve (``RUN/plots/training.png``, drawn by the trainers), copied beside the report."""
    text = ""
    for run_dir in run_dirs:
        plot = run_dir / TRAINING_PLOT
        if plot.is_file():
            copy = Path(shutil.copyfile(plot, out_dir / "plots" / f"training-{run_dir.name}.png"))
            text += f"![training {run_dir.name}]({os.path.relpath(copy, out_dir)})\n\n"
    if not text:
        return ""
    return ("## Training\n\nTrain loss per step and per epoch (left), validation accuracy and weighted F1 per epoch "
            "(right); the dashed line marks the epoch each run kept.\n\n" + text)


def cue_section(cue: dict) -> str:
    """Where the CLS attention goes, measured: the score mass on the cue box over the box's share of the frame."""
    return ("## Attention on the cue\n\nShare of the CLS-attention mass (mean over heads and all tower layers, the "
            "filter's scores) that falls inside the box holding the image's cue, divided by the box's share of "
            "the frame, averaged over the test images: 1 is what uniform attention gives, higher means the "
            "filter's ranking favours the cue.\n\n"
            + markdown_table(["images", "mass / area (mean)", "median", "min", "max"],
                             [[cue["n"], cue["mass_over_area"], cue.get("median"), cue.get("min"), cue.get("max")]])
            + "\n")


def plot_confusion(metrics: dict, path: Path, title: str) -> Path:
    """A confusion-matrix heat plot with counts in the cells."""
    labels, matrix = metrics["labels"], metrics["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def confusion_section(records: Sequence[dict], out_dir: Path) -> str:
    text = "## Confusion matrices\n\n"
    for record in records:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in record["name"])
        path = plot_confusion(record["metrics"], out_dir / "plots" / f"confusion-{safe}.png", record["name"])
        text += f"![confusion {record['name']}]({os.path.relpath(path, out_dir)})\n"
    return text


def heatmap_section(heatmaps: Sequence[dict], out_dir: Path) -> str:
    """Figure 3 style: each heatmap with its post text, true label and prediction."""
    text = "## CLS-attention heatmaps\n\nLeft: attention of the ViT's CLS token over the patches (mean over layers); " \
           "right: the patches kept at the run's keep ratio; the cue box, where known, outlined in white.\n\n"
    for item in heatmaps:
        on_cue = item.get("mass_over_area")
        cue = "" if on_cue is None else f", attention mass / area on the cue box: {on_cue:.2f}"
        text += (f"**{item.get('id', '')}** — \"{item.get('text', '')}\" — true: {item.get('label', '?')}, "
                 f"predicted: {item['predicted']}{cue}\n\n![heatmap]({os.path.relpath(item['path'], out_dir)})\n\n")
    return text


def environment_section(stage_seconds: dict[str, float] | None = None, stage_record: dict | None = None) -> str:
    """Versions and machine; per stage the wall time, and where recorded its CPU time and the load average."""
    env = environment()
    text = "## Environment\n\n" + markdown_table(["what", "value"], list(env.items())) + "\n"
    if stage_seconds:
        record = stage_record or {}
        rows = []
        for stage, seconds in stage_seconds.items():
            extra = record.get(stage, {})
            cpu, load = extra.get("cpu_seconds"), extra.get("load_average")
            rows.append([stage, f"{seconds:.1f}", "" if cpu is None else f"{cpu:.1f}",
                         "" if load is None else f"{load[0]:.1f} -> {load[1]:.1f}"])
        text += ("\nTime per stage (wall and CPU seconds of this process, all its threads; the 1-minute load "
                 "average at the stage's start and end, to tell a shared machine's slow spell):\n\n"
                 + markdown_table(["stage", "wall s", "CPU s", "load average"], rows) + "\n")
    return text


def build_report(
    out_dir: str | Path,
    run_dirs: Sequence[str | Path],
    *,
    stats: dict | None = None,
    ablation: dict | None = None,
    heatmaps: Sequence[dict] = (),
    stage_seconds: dict[str, float] | None = None,
    stage_record: dict | None = None,
    cue_attention: dict | None = None,
    split: str = "test",
    notes: str | None = None,
    select_on: str | None = "val",
) -> Path:
    """Write ``out_dir/report.md`` (+ ``plots/``) comparing ``run_dirs``; returns the report path.

    Sections without material (no sweep.json in any run, no ablation) are left out. ``select_on``: the split the
    best pruning method per budget is chosen on (:func:`methods_section`).
    """
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(r) for r in run_dirs]
    parts = ["# sentilens report\n"]
    if notes:
        parts.append(notes.strip() + "\n")
    if stats is not None:
        parts.append(data_section(stats))
    comparison, records = comparison_section(run_dirs, split)
    parts.append(comparison)
    if ablation is not None:
        parts.append(ablation_section(ablation))
    training = training_section(run_dirs, out_dir)
    if training:
        parts.append(training)
    for run_dir in run_dirs:
        if (run_dir / "sweep.json").is_file():
            plot = run_dir / "plots" / "sweep.png"
            if plot.is_file():
                plot = Path(shutil.copyfile(plot, out_dir / "plots" / f"sweep-{run_dir.name}.png"))
            sweep = read_json(run_dir / "sweep.json")
            parts.append(sweep_section(sweep, plot, out_dir))
            several = len({row.get("strategy", "") for row in sweep["rows"]}) > 1
            figure = plot_methods(sweep, out_dir / "plots" / f"methods-{run_dir.name}.png") if several else None
            methods = methods_section(sweep, select_on, figure, out_dir)
            if methods:
                parts.append(methods)
    if cue_attention is not None:
        parts.append(cue_section(cue_attention))
    if records:
        parts.append(confusion_section(records, out_dir))
    if heatmaps:
        parts.append(heatmap_section(heatmaps, out_dir))
    parts.append(environment_section(stage_seconds, stage_record))
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path
