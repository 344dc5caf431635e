"""The retention sweep: the paper's Table 4 for one MLLM run.

For each filtering strategy and each keep ratio ``r``, the run predicts the split with only
``ceil(r * N)`` visual tokens per image (:mod:`sentilens.mllm.pruning`), through the shared
predictor; a row holds the ratio, the kept tokens (measured: the mean over the image posts, since
``N`` depends on the image for some model families), accuracy, weighted F1, the wall-clock
latency per post, the measured speedup against ``r = 1`` of the same strategy, and beside it
the FLOP-ideal speedup (:mod:`sentilens.mllm.flops`: what the same token counts would give if
time followed arithmetic). ``r = 1`` is always measured, as the reference, and goes through the
same filtering code (scoring included), so a speedup counts the scoring's cost too.

Timing on a shared machine: every ratio of a strategy is timed on each batch of posts in turn
(the order rotating from batch to batch), for ``repeats`` passes after one warm-up batch, so a
slow spell of the machine hits every ratio alike; a pass's time for a ratio is the sum over its
batches. The speedup is the median over passes of ``time(r = 1) / time(r)`` within the pass, where
a time is the model's work: the whole ``predict`` call less the reading, decoding and preprocessing
of the image files (timed apart, ``image_decode_ms``), so it is measured on the same work the
FLOP-ideal counts, as ``benchmarks/token_filtering.py`` measures it from pixel values; that CPU work
does not depend on the keep ratio and would dilute the speedup by a fixed cost no FLOP count holds
(a visible share of the call in the demo's tiny LLaVA, a negligible one beside a 7B language model).
``end_to_end_speedup`` is the same median with the image decoding in. The latency is the median
pass of the whole call divided by the posts. Predictions are deterministic: the metrics come
from the first pass. ``RUN/sweep.json`` also records the threads, the load average before and after, and
the language model's share of the FLOPs at ``r = 1``; the plot goes to ``RUN/plots/sweep.png``.

Each row also splits the time per post by stage (:mod:`sentilens.stages`), from the pass with the
median whole-call time: ``vision_ms`` (vision tower + token scoring + projector), ``lm_ms`` (the
language model's prefill) and ``total_ms`` (the whole ``predict`` call without the image files'
reading, decoding and preprocessing, reported apart as ``image_decode_ms``), and ``selection_ms``, the
method's own selection cost per post, from the same pass: the time the prediction spends inside the
method's choosing of tokens, timed around that step itself (:data:`sentilens.stages.SELECT` lists what is
timed: its own scores, the ranking and pick, and for an attention-scored method the scoring its tower pass
adds; it lies inside ``vision_ms``, or inside ``lm_ms`` for an LM-stage method). An LM-stage method's row
also has ``kept_tokens_per_layer``: the visual tokens each decoder layer sees, the r = 1 count for layers
``0..K`` and the kept count after (from the strategy's ``K`` and the measured counts).

The paper reads its best ratio off the test set. ``sweep --select-on val`` instead picks the
strategy and ratio with the best weighted F1 on val (:func:`select_ratio`) and flags that row of
the test sweep (:func:`mark_selection`), so the reported test score did not choose itself.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sentilens.data.records import Post
from sentilens.errors import SentilensError
from sentilens.mllm.pruning import DEFAULT_STRATEGY, Strategy, keep_count, parse_strategy
from sentilens.outputs import save_figure
from sentilens.predict import Predictor, check_keep_ratio, check_labelled, prediction_metrics
from sentilens.runs import write_json
from sentilens.stages import SELECT, record_stages

DEFAULT_RATIOS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.05)

PAPER_TABLE4 = [
    {"ratio": 1.00, "accuracy": 0.933, "weighted_f1": 0.937, "speedup": 1.00},
    {"ratio": 0.80, "accuracy": 0.938, "weighted_f1": 0.940, "speedup": 1.15},
    {"ratio": 0.60, "accuracy": 0.933, "weighted_f1": 0.938, "speedup": 1.40},
    {"ratio": 0.40, "accuracy": 0.933, "weighted_f1": 0.934, "speedup": 1.75},
    {"ratio": 0.20, "accuracy": 0.893, "weighted_f1": 0.896, "speedup": 2.33},
    {"ratio": 0.05, "accuracy": 0.823, "weighted_f1": 0.817, "speedup": 3.16},
]
"""The paper's Table 4 (LLaVA-1.5-7B on MVSA-Single), stored beside ours for comparison."""


def parse_ratios(text: str) -> list[float]:
    """``"1,0.8,0.6"`` -> ``[1.0, 0.8, 0.6]``, each checked to lie in (0, 1]."""
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SentilensError(f"--ratios must be comma-separated numbers in (0, 1], got '{text}'") from None
    if not ratios:
        raise SentilensError("--ratios lists no ratio")
    for ratio in ratios:
        check_keep_ratio(ratio)
    return list(dict.fromkeys(ratios))


EVERY_STRATEGY = "every"
"""``--strategy every``: each registered strategy's showcase form that the run's model can run."""


def runnable_strategies(predictor: Predictor) -> tuple[list[Strategy], dict[str, str]]:
    """Every registered strategy's showcase form (registry order) that ``predictor``'s model runs, and for the
    others the one-line reason it refuses them (another family, too few tower or LM layers)."""
    from sentilens.mllm.pruning import showcase_strategies

    kept, refused = [], {}
    for text in showcase_strategies():
        try:
            predictor.with_options(strategy=text)
        except SentilensError as err:
            refused[text] = str(err)
            continue
        kept.append(parse_strategy(text))
    return kept, refused


def parse_strategies(text: str) -> list[Strategy]:
    """A comma list of strategies, each once, in the order given."""
    specs = [parse_strategy(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise SentilensError("--strategy lists no strategy")
    return list(dict.fromkeys(specs))


def run_sweep(predictor: Predictor, posts: Sequence[Post], ratios: Sequence[float] = DEFAULT_RATIOS,
              strategies: Sequence[Strategy] = (parse_strategy(DEFAULT_STRATEGY),), repeats: int = 3) -> dict:
    """Table 4 rows for every strategy x ratio (``r = 1`` first, as each strategy's reference)."""
    image_tokens = _check_sweep(predictor, posts, repeats)
    posts = list(posts)
    ordered = [1.0] + [r for r in ratios if r != 1.0]
    batch = max(1, int(getattr(predictor, "batch_size", 8)))
    chunks = [posts[i:i + batch] for i in range(0, len(posts), batch)]
    load_before = list(os.getloadavg())
    rows = []
    flops_at_one = None
    base = predictor
    for spec in strategies:
        predictor = base.with_options(strategy=str(spec))
        for ratio in ordered:  # warm-up: first-call allocations of every shape stay out of the timings
            predictor.predict(chunks[0], keep_ratio=ratio)
        predictions: dict[float, list] = {ratio: [] for ratio in ordered}
        seconds = {ratio: [0.0] * repeats for ratio in ordered}
        stage_seconds = {ratio: [dict.fromkeys(STAGES, 0.0) for _ in range(repeats)] for ratio in ordered}
        turn = 0
        for rep in range(repeats):
            for chunk in chunks:
                for ratio in ordered[turn % len(ordered):] + ordered[:turn % len(ordered)]:
                    with record_stages() as stages:
                        started = time.perf_counter()
                        predicted = predictor.predict(chunk, keep_ratio=ratio)
                        seconds[ratio][rep] += time.perf_counter() - started
                    for name in STAGES:
                        stage_seconds[ratio][rep][name] += stages.get(name, 0.0)
                    if rep == 0:
                        predictions[ratio].extend(predicted)
                turn += 1
        flops = {ratio: predictor.flops_per_post(posts, keep_ratio=ratio) for ratio in ordered}
        if flops_at_one is None:
            flops_at_one = flops[1.0]
        for ratio in ordered:
            metrics = prediction_metrics(posts, predictions[ratio], predictor.labels)
            model = [[total - stages["image"] for total, stages in zip(seconds[r], stage_seconds[r], strict=True)]
                     for r in (1.0, ratio)]
            speedup = statistics.median(one / this for one, this in zip(*model, strict=True))
            end_to_end = statistics.median(one / this for one, this in zip(seconds[1.0], seconds[ratio], strict=True))
            ideal = flops[1.0]["total"] / flops[ratio]["total"]
            # the split comes from one pass (the median one), so vision + lm <= total holds within it
            middle = sorted(range(repeats), key=lambda rep, ratio=ratio: seconds[ratio][rep])[(repeats - 1) // 2]
            split = stage_seconds[ratio][middle]
            ms = 1000 / len(posts)
            kept = _mean_kept(predictions[ratio], image_tokens, ratio)
            every = _mean_kept(predictions[1.0], image_tokens, 1.0)
            per_layer = {} if spec.stage != "lm" else {
                "kept_tokens_per_layer": tokens_per_layer(every, kept, spec.lm_layer, predictor.lm_layers())}
            rows.append({
                "strategy": str(spec), "ratio": ratio,
                "kept_tokens": kept, **per_layer, "image_tokens": every, "accuracy": metrics["accuracy"],
                "weighted_f1": metrics["weighted_f1"], "macro_f1": metrics["macro_f1"],
                "accuracy_ci": metrics["accuracy_ci"], "weighted_f1_ci": metrics["weighted_f1_ci"],
                "latency_ms_per_post": 1000 * statistics.median(seconds[ratio]) / len(posts), "speedup": speedup,
                "end_to_end_speedup": end_to_end, "ideal_speedup": ideal, "speedup_of_ideal": speedup / ideal,
                "vision_ms": ms * split["vision"], "lm_ms": ms * split["lm"],
                "total_ms": ms * (seconds[ratio][middle] - split["image"]), "image_decode_ms": ms * split["image"],
                "selection_ms": ms * split["select"],
                "gflops_per_post": flops[ratio]["total"] / 1e9,
                "reference_run": ratio not in ratios,
            })
    language = flops_at_one["language"] + flops_at_one["head"]
    return {"n": len(posts), "image_tokens": image_tokens, "strategies": [str(s) for s in strategies],
            "ratios": list(ratios), "repeats": repeats, "rows": rows, "time_split": TIME_SPLIT,
            "flops_at_full": flops_at_one, "language_model_flop_share": language / flops_at_one["total"],
            "timing": {"threads": torch.get_num_threads(), "load_average_before": load_before,
                       "load_average_after": list(os.getloadavg()), "batch_size": batch},
            "paper_table4": PAPER_TABLE4}


def _mean_kept(predictions: Sequence, image_tokens: int, ratio: float) -> float | int:
    """Visual tokens the language model saw per image post, as measured (an int when every image had the
    same count, as for LLaVA-1.5: ``ceil(r * N)``); without image posts, ``ceil(r * N)`` of the run's N."""
    counts = [p.kept_tokens for p in predictions if p.kept_tokens]
    if not counts:
        return keep_count(image_tokens, ratio)
    mean = sum(counts) / len(counts)
    return int(mean) if mean == int(mean) else round(mean, 2)


STAGES = ("image", "vision", "lm", SELECT)
"""The stages :mod:`sentilens.stages` marks in a prediction (``select`` lies inside ``vision`` or ``lm``)."""


def tokens_per_layer(every: float | int, kept: float | int, layer: int, layers: int) -> list[float | int]:
    """The visual tokens each of ``layers`` decoder layers sees under an LM-stage method scoring at ``layer``
    (0-based): ``every`` for layers ``0..layer``, ``kept`` after."""
    return [every] * (layer + 1) + [kept] * (layers - layer - 1)


TIME_SPLIT = ("per post, from the pass with the median whole-call time: vision_ms = vision tower + token scoring + "
              "projector, lm_ms = the language model's prefill, total_ms = the whole predict call without "
              "image_decode_ms (reading, decoding and preprocessing the image files, reported apart), selection_ms = "
              "the method's own choosing of tokens (inside vision_ms, or lm_ms for an LM-stage method; "
              "sentilens.stages.SELECT lists what is timed); "
              "latency_ms_per_post and end_to_end_speedup include the image decoding, speedup does not (it times "
              "the model's work, which the FLOP-ideal counts)")


def select_ratio(predictor: Predictor, posts: Sequence[Post], ratios: Sequence[float],
                 strategies: Sequence[Strategy], split: str) -> dict:
    """The strategy and keep ratio with the best weighted F1 on ``posts`` (``sweep --select-on val``).

    Ties go to the smaller ratio (fewer tokens, faster), then to the strategy listed first. Only
    these posts are used, so the split the choice is then reported on stays unseen.
    """
    _check_sweep(predictor, posts, 1)
    posts = list(posts)
    candidates = []
    for spec in strategies:
        configured = predictor.with_options(strategy=str(spec))
        for ratio in ratios:
            found = prediction_metrics(posts, configured.predict(posts, keep_ratio=ratio), configured.labels)
            candidates.append({"strategy": str(spec), "ratio": ratio, "accuracy": found["accuracy"],
                               "weighted_f1": found["weighted_f1"]})
    best = max(enumerate(candidates), key=lambda ic: (ic[1]["weighted_f1"], -ic[1]["ratio"], -ic[0]))[1]
    return {"on": split, "metric": "weighted_f1", "strategy": best["strategy"], "ratio": best["ratio"],
            "n": len(posts), "candidates": candidates}


def mark_selection(result: dict, selection: dict) -> dict:
    """The sweep ``result`` with the row chosen on another split flagged (``"selected"``), the choice recorded."""
    rows = [{**row, "selected": row["strategy"] == selection["strategy"] and row["ratio"] == selection["ratio"]}
            for row in result["rows"]]
    chosen = next(row for row in rows if row["selected"])
    reported = {key: chosen[key] for key in ("accuracy", "weighted_f1", "accuracy_ci", "weighted_f1_ci", "speedup",
                                             "ideal_speedup")}
    return {**result, "rows": rows, "selection": {**selection, result.get("split", "test"): reported}}


def _check_sweep(predictor: Predictor, posts: Sequence[Post], repeats: int) -> int:
    """The run's visual tokens per image, after checking the sweep can run on ``posts``."""
    if not predictor.capabilities.supports_keep_ratio:
        raise SentilensError(f"a token-filtering sweep needs a run that filters visual tokens, this one is "
                             f"'{predictor.family}'")
    if not posts:
        raise SentilensError("the split has no posts to sweep over")
    if repeats < 1:
        raise SentilensError(f"--repeats must be at least 1, got {repeats}")
    check_labelled(list(posts))
    return int(predictor.describe()["config"]["num_image_tokens"])


def plot_sweep(result: dict, path: Path) -> Path:
    """Accuracy / weighted F1 (left) and speedup (right) against the keep ratio, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in result["strategies"]:
        rows = sorted((r for r in result["rows"] if r["strategy"] == strategy), key=lambda r: r["ratio"])
        ratios = [r["ratio"] for r in rows]
        line = quality.plot(ratios, [r["accuracy"] for r in rows], marker="o", label=f"{strategy}: accuracy")[0]
        quality.plot(ratios, [r["weighted_f1"] for r in rows], marker="s", linestyle="--", color=line.get_color(),
                     label=f"{strategy}: weighted F1")
        speed.plot(ratios, [r["speedup"] for r in rows], marker="o", color=line.get_color(), label=strategy)
    paper = result["paper_table4"]
    speed.plot([r["ratio"] for r in paper], [r["speedup"] for r in paper], color="grey", linestyle=":", marker="x",
               label="paper (LLaVA-1.5-7B)")
    quality.set(xlabel="visual tokens kept (ratio)", ylabel="score", title=f"quality on {result['n']} posts")
    speed.set(xlabel="visual tokens kept (ratio)", ylabel="speedup vs r = 1 (x)", title="inference speedup")
    for axis in (quality, speed):
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def write_sweep(run_dir: Path, result: dict) -> tuple[Path, Path]:
    """``RUN/sweep.json`` and ``RUN/plots/sweep.png``."""
    json_path = Path(run_dir) / "sweep.json"
    write_json(json_path, result)
    return json_path, plot_sweep(result, Path(run_dir) / "plots" / "sweep.png")
