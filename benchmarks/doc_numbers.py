"""Write every measured figure the README and the guide quote, from ``benchmarks/results/*.json``.

A page marks each generated passage::

    <!-- numbers:demo-sweep -->
    ...written by this script...
    <!-- /numbers:demo-sweep -->

``python benchmarks/doc_numbers.py`` rewrites those passages in README.md and docs/*.md in place;
``--check`` changes nothing and exits 1 naming every passage that differs from what its results file
gives (``tests/test_doc_numbers.py`` runs the check). A figure typed by hand outside a marked
passage is the one thing this cannot catch, so pages quote measurements only inside them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- numbers:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /numbers:(?P=name) -->)", re.S)


@cache
def result(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def pages(root: Path | None = None) -> list[Path]:
    root = root or ROOT
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def f3(x: float) -> str:
    return f"{x:.3f}"


def times(x: float) -> str:
    return f"{x:.2f}x"


def interval(ci: list[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def points(ci: list[float]) -> str:
    low, high = (100 * v for v in ci)
    return f"{low:+.1f} to {high:+.1f} points"


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


# ----------------------------------------------------------------------------- the demo (demo_full.json)

def sweep_row(run: dict, strategy: str, ratio: float) -> dict:
    for row in run["sweep"]["rows"]:
        if row["strategy"] == strategy and abs(row["ratio"] - ratio) < 1e-9:
            return row
    raise KeyError((strategy, ratio))


def commit_of(run: dict) -> str:
    """``commit abc1234`` of a demo record's ``code`` (which may add a remark in brackets)."""
    return run["code"].split(" (")[0].split(" with ")[0]


def demo_headline() -> str:
    run = result("demo_full")
    bars = run["issue_11_bars"]
    return (f"In the committed full run (`benchmarks/results/demo_full.json`, 120 test posts) the fine-tuned tiny "
            f"LLaVA scores {f3(bars['accuracy_r1'])} test accuracy with every visual token and "
            f"{f3(bars['accuracy_r04'])} keeping the 40 % its CLS attention ranks highest; at 20 % it keeps "
            f"{f3(bars['all_r02'])} where a random 20 % gives {f3(bars['random_r02'])}, and the model's work runs "
            f"{times(bars['speedup_r02'])} faster (FLOP-ideal {times(bars['ideal_r02'])}). The share of CLS "
            f"attention that falls on the cue's box is {bars['mass_over_area']:.1f}x the box's share of the frame.\n")


def demo_timing() -> str:
    run, seed1 = result("demo_full"), result("demo_full")["seed_1"]
    load = run["load_average_before_after"]
    stages = ", ".join(f"{name} {stage['seconds']:.0f} s" for name, stage in run["stages"].items())
    return (f"`make demo` (the full size, 1,200 posts) took **{minutes(run['wall_seconds'])} wall and "
            f"{run['cpu_seconds']:,.0f} CPU-seconds** on a {run['machine']['device']}, {run['machine']['cpus']} "
            f"cores ({run['machine']['threads']} torch threads; 1-minute load average "
            f"{load[0]:.2f} before, {load[1]:.2f} after): {stages}. With `--seed 1`"
            + (f" ({commit_of(seed1)}, an earlier run)" if commit_of(seed1) != commit_of(run) else "")
            + f": {minutes(seed1['wall_seconds'])} and {seed1['cpu_seconds']:,.0f} CPU-seconds."
            + "".join(other_machine(other) for other in run.get("other_machines", []))
            + "\n")


def other_machine(other: dict) -> str:
    """A sentence on an earlier seed-0 demo timed on another machine."""
    load = other["load_average_before_after"]
    return (f" Seed 0 on a {other['machine']['device']}, {other['machine']['cpus']} cores ({commit_of(other)}, "
            f"{other['sweep_repeats']} timed sweep passes; load {load[0]:.2f} before, {load[1]:.2f} after): "
            f"{minutes(other['wall_seconds'])}.")


DEMO_COLUMNS = ("all", "random", "inverse", "feature", "all+merge", "all+native", "random+native")


def demo_sweep() -> str:
    run = result("demo_full")
    sweep = run["sweep"]
    strategies = [s for s in DEMO_COLUMNS if s in sweep["strategies"]]
    rows = []
    for ratio in sweep["ratios"]:
        base = sweep_row(run, "all", ratio)
        rows.append([ratio, base["kept_tokens"], *(f3(sweep_row(run, s, ratio)["accuracy"]) for s in strategies),
                     times(base["speedup"]), times(base["ideal_speedup"])])
    header = ["keep ratio", "kept tokens", *(f"`{s}`" for s in strategies), "speedup (`all`)", "FLOP-ideal"]
    return (f"Test accuracy by strategy and keep ratio ({sweep['n']} test posts, {sweep['image_tokens']} visual "
            f"tokens an image; speedup of the model's work for `all`, median of {sweep['repeats']} interleaved "
            "passes, beside the FLOP-ideal one):\n\n" + table(header, rows))


def demo_bars() -> str:
    rows = []
    seed0 = result("demo_full")
    for name, run in (("seed 0", seed0), ("seed 1", seed0["seed_1"])):
        bars = run["issue_11_bars"]
        if run is not seed0 and commit_of(run) != commit_of(seed0):
            name += f" ({commit_of(run)}, an earlier run)"
        rows.append([name, f3(bars["accuracy_r1"]), f3(bars["accuracy_r04"]), f3(bars["all_r02"]),
                     f3(bars["random_r02"]), f3(bars["all_r02"] - bars["random_r02"]),
                     f"{bars['speedup_of_ideal_r02']:.2f}", f"{bars['mass_over_area']:.2f}",
                     f"{run['tower_held_out_accuracy']:.3f}"])
    return table(["run", "acc. r = 1", "acc. r = 0.4", "`all` r = 0.2", "`random` r = 0.2", "margin",
                  "speedup of ideal, r = 0.2", "attention mass / area on the cue", "tower held-out acc."], rows)


# ----------------------------------------------------------------------------- fusion prediction throughput

def predict_throughput() -> str:
    r = result("predict_throughput")
    ms = r["ms_per_post"]
    rows = [
        ["end to end (files on disk -> JSONL)", f"{r['end_to_end_posts_per_s']:.2f}"],
        ["the path before the pipeline", f"{r['baseline_end_to_end_posts_per_s']:.2f}"],
        ["encoders alone, plain PyTorch", f"{r['encoders_only_posts_per_s']:.2f}"],
        ["encoders alone, ONNX Runtime", f"{r['optimized_encoders_posts_per_s']:.2f}"],
    ]
    steps = [
        ["read + decode (full / draft JPEG decoding)", f"{ms['read_decode_full']} / {ms['read_decode_draft']}"],
        ["resize + normalise (from full / draft)", f"{ms['resize_normalise_from_full']} / "
                                                   f"{ms['resize_normalise_from_draft']}"],
        ["tokenisation", ms["tokenise"]],
        ["image encoder (PyTorch / ONNX Runtime)", f"{ms['image_encoder_torch']} / {ms['image_encoder_onnx']}"],
        ["text encoder (PyTorch / ONNX Runtime)", f"{ms['text_encoder_torch']} / {ms['text_encoder_onnx']}"],
        ["fusion head", ms["head"]],
        ["output", ms["output_writing"]],
    ]
    return (f"{r['inputs']}. End to end is {times(r['speedup_over_baseline'])} the path before the pipeline and "
            f"{r['end_to_end_over_encoders']:.3f} of what its encoders allow; weighted F1 of the default path "
            f"minus plain PyTorch: {r['weighted_f1_change']} at worst.\n\n"
            + table(["path", "posts/s"], rows) + "\n" + table(["step", "ms per post"], steps))


def fusion_cache() -> str:
    r = result("fusion_cache")
    return table(["data", "train, cold cache", "train, warm cache", "cold / warm", "predict posts/s"],
                 [[r["data"], f"{r['cold_seconds']} s", f"{r['warm_seconds']} s", times(r["cold_over_warm"]),
                   r["predict_posts_per_second"]]])


# ----------------------------------------------------------------------------- real text sets

SET_NAMES = {"hfm_sarcasm": "HFM sarcasm", "mvsa_multiple": "MVSA-Multiple"}


def variant(entry: dict, name: str) -> dict:
    return next(v for v in entry["variants"] if v["variant"] == name)


def real_text_cpu() -> str:
    rows, costs = [], []
    for entry in result("real_text")["sets"]:
        names = [v for v in ("probe", "text", "full") if any(r["variant"] == v for r in entry["variants"])]
        cells = {v: variant(entry, v) for v in names}
        train = f"{entry['posts']['train']:,}"

        wf1 = [f"{f3(cells[n]['weighted_f1'])} {interval(cells[n]['weighted_f1_ci'])}" if n in cells
               else "not measured" for n in ("probe", "text", "full")]
        diffs = [points(entry[f"minus_{b}"][n]["weighted_f1_diff_ci"]) if n in entry.get(f"minus_{b}", {}) else "-"
                 for b, n in (("probe", "text"), ("text", "full"))]
        rows.append([SET_NAMES.get(entry["set"], entry["set"]), train, *wf1, *diffs])
        costs.append(f"{SET_NAMES.get(entry['set'], entry['set'])}: " + ", ".join(
            f"{name} {v['train_seconds']:.0f} / {v['train_cpu_seconds']:.0f}" for name, v in cells.items()))
    return (table(["set", "train posts", "probe", "text (frozen MiniLM)", "full, posts without images",
                   "text - probe (paired)", "full - text (paired)"], rows)
            + "\nTrain seconds, wall / CPU: " + "; ".join(costs) + ".\n")


def text_predict_rate() -> str:
    r = result("text_predict_rate")
    ref = r["reference"]
    others = ", ".join(f"`{name}` {run['median_posts_per_second']:.1f} posts/s ({run['over_reference']:.2f} of "
                       f"`{ref}`)" for name, run in r["runs"].items() if name != ref)
    m = r["machine"]
    data = Path(r["data"]).parent.name
    return (f"`predict --input` on the same {r['posts']:,} {SET_NAMES.get(data, data)} test posts, the runs "
            f"interleaved {r['rounds']} times "
            f"(`benchmarks/results/text_predict_rate.json`; {m['device']}, {m['threads']} thread, load "
            f"{m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after): `{ref}` "
            f"{r['runs'][ref]['median_posts_per_second']:.1f} posts/s, {others}.\n")


LEVERS = ("probe", "probe+decision", "text", "text+decision", "text-balanced", "text-top1", "text-top2",
          "text-top2+decision", "text-top3", "probe-mpnet", "probe-mpnet+decision", "text-mpnet",
          "text-mpnet+decision", "text-mpnet-top1", "text-mpnet-top1+decision",
          "text-mpnet-top2", "text-mpnet-top2+decision", "ensemble-probe-text", "ensemble-probe-text+decision",
          "ensemble-top2-mpnet1", "ensemble-top2-mpnet1+decision", "ensemble-text-top2-mpnet1",
          "ensemble-text-top2-mpnet1+decision", "full")


def real_text_levers() -> str:
    """Every variant measured on the CPU, against today's default (``text``), with what its training cost."""
    blocks = []
    for entry in result("real_text")["sets"]:
        rows = []
        for name in (v for v in LEVERS if any(r["variant"] == v for r in entry["variants"])):
            v = variant(entry, name)
            against = entry.get("minus_text", {}).get(name)
            load = v["machine"]["load_average_before"][0], v["machine"]["load_average_after"][0]
            rescored = " (re-scored: see its row's note)" if v.get("rescored") else ""
            rows.append([f"`{name}`", v["description"],
                         f"{f3(v['weighted_f1'])} {interval(v['weighted_f1_ci'])}{rescored}",
                         f3(v["accuracy"]), "(today's default)" if name == "text" else
                         points(against["weighted_f1_diff_ci"]) if against else "-",
                         f"{minutes(v['base_train_seconds'])} + {v['decision_seconds']:.0f} s for the offsets"
                         if "decision_seconds" in v else
                         f"{minutes(v['members_train_seconds'])} (its members) + {v['ensemble_seconds']:.0f} s to "
                         "combine" if "ensemble_seconds" in v else
                         minutes(v["train_seconds"]) + (f" ({minutes(v['paused_seconds'])} of it paused)"
                                                        if v.get("paused_seconds") else ""),
                         f"{v['train_cpu_seconds']:,.0f}",
                         f"{v['machine']['device']}, {v['machine']['threads']} thread"
                         f"{'s' if v['machine']['threads'] > 1 else ''}", f"{load[0]:.1f} / {load[1]:.1f}"])
        blocks.append(f"{SET_NAMES.get(entry['set'], entry['set'])}, {entry['posts']['train']:,} train posts"
                      f"{' (a seeded subset)' if entry.get('train_subset') else ''}, "
                      f"{entry['posts']['test']:,} test posts:\n\n"
                      + table(["variant", "what", "test weighted F1 [95 % CI]", "accuracy",
                               "minus today's default (paired 95 % CI)", "train (wall)", "train CPU-s",
                               "machine", "load before / after"], rows))
    return "\n".join(blocks)


def real_text_gpu() -> str:
    rows = []
    for entry in result("real_text_gpu")["sets"]:
        probe, tuned = variant(entry, "probe"), variant(entry, "text-tuned")
        rows.append([SET_NAMES.get(entry["set"], entry["set"]), f"{entry['posts']['train']:,}",
                     f"{f3(probe['weighted_f1'])} {interval(probe['weighted_f1_ci'])}",
                     f"{f3(tuned['weighted_f1'])} {interval(tuned['weighted_f1_ci'])}",
                     points(entry["minus_probe"]["text-tuned"]["weighted_f1_diff_ci"]),
                     f"{f3(probe['accuracy'])} -> {f3(tuned['accuracy'])}", f"{tuned['train_seconds']:.0f}"])
    machine = result("real_text_gpu")["sets"][0]["machine"]
    return (f"On {machine.get('device', 'a GPU')}:\n\n"
            + table(["set", "train posts", "probe wF1", "MiniLM fine-tuned wF1", "tuned - probe (paired)",
                     "accuracy (probe -> tuned)", "train s"], rows))


# ----------------------------------------------------------------------------- token filtering

def filtering_rows(settings: list[dict]) -> list[list[object]]:
    rows = []
    for s in settings:
        by_ratio = {round(r["ratio"], 2): r for r in s["ratios"]}
        of_ideal = [r["speedup_of_ideal"] for r in s["ratios"] if r["ratio"] < 1]
        name = s["shape_name"].split(" (")[0].removesuffix(":")
        strategy = s.get("strategy") or "all"
        layers = s.get("scored_layers")
        scored = f"`{strategy}`" + (f" ({len(layers)} layer{'s' if len(layers) > 1 else ''})" if layers else "")
        rows.append([name, scored, s["batch"], f"{s['scoring_overhead']:.2f}",
                     f"{times(by_ratio[0.4]['speedup'])} / {times(by_ratio[0.2]['speedup'])}",
                     f"{min(of_ideal):.2f}-{max(of_ideal):.2f}"])
    return rows


FILTER_HEADER = ["model shape", "scored", "batch", "scoring overhead", "speedup r = 0.4 / 0.2",
                 "of FLOP-ideal, r = 0.8 ... 0.05"]


def token_filtering_gpu() -> str:
    r = result("token_filtering_gpu")
    targets = r["targets"]
    return (f"On an {r['machine']['gpu']} (torch {r['machine']['torch']}), released architectures with random "
            f"weights in bf16, {r['repeats']} repeats; targets: scoring overhead <= "
            f"{targets['scoring_overhead_max']:.2f}, speedup of the FLOP-ideal >= "
            f"{targets['speedup_of_ideal_min']:.2f}.\n\n" + table(FILTER_HEADER, filtering_rows(r["settings"])))


def token_filtering_cpu() -> str:
    r = result("token_filtering")
    machine = r.get("settings_machine", r["machine"])  # the method rows may come from a later run
    return (f"CPU proxies ({machine['cpu']}, {machine['cpu_threads']} thread, a few tower layers of each "
            f"released shape, float32):\n\n" + table(FILTER_HEADER, filtering_rows(r["settings"])))


def token_filtering_methods() -> str:
    """Every registered method on the CPU proxies: measured / FLOP-ideal speedup per ratio, and (LLaVA-1.5, N = 576)
    the selection's own cost as a share of the released tower."""
    r = result("token_filtering")
    blocks = []
    for s in r.get("method_settings", []):
        if s["device"] != "cpu":
            continue
        ratios = [row["ratio"] for row in next(iter(s["methods"].values()))["ratios"] if row["ratio"] < 1]
        header = ["method", "stage"] + [f"r = {ratio:g}: measured / ideal" for ratio in ratios] + ["of ideal (min)"]
        shares = "selection_share_of_tower" in next(iter(s["methods"].values()))
        if shares:
            header += ["selection ms (worst ratio)", f"share of the {s['tower_layers']}-layer tower"]
        rows = []
        for method, entry in s["methods"].items():
            cut = [row for row in entry["ratios"] if row["ratio"] < 1]
            row = [f"`{method}`", entry["stage"]]
            row += [f"{times(c['speedup'])} / {times(c['ideal_speedup'])}" for c in cut]
            row.append(f"{min(c['speedup_of_ideal'] for c in cut):.2f}")
            if shares:
                row += [f"{entry['selection_worst_ms']:.1f}", f"{100 * entry['selection_share_of_tower']:.1f} %"]
            rows.append(row)
        name = s["shape_name"].split(" (")[0]
        tower = (f"; the released tower ({s['tower_layers']} layers, batch 1) {s['tower_ms']:.0f} ms, the proxy's "
                 f"{s['proxy_tower_ms']:.0f} ms" if s.get("tower_ms") else "")
        refused = "; refused: " + ", ".join(f"`{m}`" for m in s["refused"]) if s["refused"] else ""
        blocks.append(f"{name} proxy ({s['shape_name'].split(' (')[1].split(')')[0]}; {s['image_tokens']} visual "
                      f"tokens), batch {s['batch']}{tower}{refused}:\n\n" + table(header, rows))
    greedy = next((s["greedy_ms"] for s in r.get("method_settings", []) if "greedy_ms" in s), None)
    if greedy:
        blocks.append("The greedy selections alone at N = 576 (ms): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in greedy.items()) + ".\n")
    machine = r["machine"]
    return (f"{machine['cpu']}, {machine['cpu_threads']} thread, float32, {r['repeats']} repeats; load average "
            f"{machine['load_average_before'][0]:.1f} before, {machine['load_average_after'][0]:.1f} after "
            f"(2 cores).\n\n" + "\n".join(blocks))


def received_kernel() -> str:
    rows = []
    for line in result("token_filtering_gpu")["kernel_check"][1:]:
        timings = line.split(" {", 1)[1]
        kernel = re.search(r"'kernel': \(([\d.]+), '([\de.+-]+)'\)", timings)
        blocks = re.search(r"'blocks': \(([\d.]+), '([\de.+-]+)'\)", timings)
        rows.append([f"`{line.split(' {')[0]}`", kernel[1], kernel[2], blocks[1], blocks[2]])
    return table(["(batch, heads, tokens, head dim)", "Triton kernel ms", "kernel error", "blockwise bf16 ms",
                  "blockwise error"], rows)


def mllm_scoring() -> str:
    cpu = result("mllm_scoring")["cpu"]
    rows = [[batch.replace("_", " "), cpu[batch]["score_posts_per_second"], cpu[batch]["generate_posts_per_second"],
             times(cpu[batch]["score_over_generate_speed"]), cpu[batch]["agreement"]]
            for batch in ("batch_1", "batch_16")]
    return (f"{cpu['model']}, {cpu['posts']} posts on a CPU:\n\n"
            + table(["", "label scoring posts/s", "generation posts/s", "scoring / generation", "labels agree"],
                    rows))


# ----------------------------------------------------------------------------- serving

def serve_load() -> str:
    r = result("serve_load")
    rows = []
    for config, flags in r["configs"].items():
        for point in r[config]:
            rows.append([f"`{flags}`", point["clients"], point["ok_per_second"], point["latency_ms"]["p50"],
                         point["latency_ms"]["p95"], point["errors"]])
    return (f"{r['model']} on {r['machine']['cores']} cores, {r['requests_per_client']} requests per client:\n\n"
            + table(["server", "clients", "answers/s", "p50 ms", "p95 ms", "errors"], rows))


def abuse() -> str:
    r = result("abuse")
    rows = []
    for name, scenario in r["scenarios"].items():
        legit = scenario["legitimate"]
        rows.append([name.replace("_", " "), legit["requests"], f"{legit['ok_within_2s_rate']:.3f}",
                     legit["latency_ms"]["p99"], legit["healthz"]["failures"],
                     f"{scenario['server_rss_mb']['growth']}"])
    settings = r["settings"]
    return (f"{settings['legit_clients']} legitimate clients beside each attack for {settings['seconds']:.0f} s "
            f"(default limits, {r['model']}):\n\n"
            + table(["attack", "legitimate requests", f"answered OK within {settings['answered_within_s']:.0f} s",
                     "p99 ms", "/healthz failures", "server memory growth MB"], rows))


# ----------------------------------------------------------------------------- choosing a pruning method

METHOD_COST = {
    "TopAttention": "O(L N D) scoring (the CLS row of L layers) + O(N log N) ranking",
    "LowestAttention": "O(L N D) scoring + O(N log N) ranking",
    "RandomDraw": "O(N log N) (a seeded draw, ranked)",
    "LastTokenAttention": "O(N D) at LM layer K (one query row)",
    "DiversityPrune": "O(N k D) (greedy max-min)",
    "Downsample": "O(N D) (area pooling)",
    "TextAttention": "O(R N D) at LM layer K (the R text tokens after the image)",
    "PivotDuplication": "O(p N D) at LM layer K (p pivots)",
    "DominantAndContext": "O(L N D) scoring + O((N - k) c D) merging (c = 5k/32 contextual tokens)",
    "ConditionalDpp": "O(N k (D + k)) greedy MAP",
}
"""Each registered strategy class's own selection cost: N visual tokens of width D, k kept, L scored tower
layers (a method's rule and its complexity are in its module's docstring). A class missing here is an error."""

MERGE_COST = " + O((N - k) (k/6) D) merging"
RELEVANCE_COST = " + O(N T D) relevance (T text tokens)"

PUBLISHED_64 = {
    "visionzip": "93.2 % (a)",
    "fastv:0": "75.6 % (b)",
    "divprune": "94.8 % (c)",
}
"""Published LLaVA-1.5-7B figures at 64 of 576 visual tokens, % of the unpruned model's average, by method (the
letters are :data:`PUBLISHED_NOTE`'s sources); a method absent here has none that could be read."""

PUBLISHED_NOTE = (
    "Published figures (not ours; LLaVA-1.5-7B, 64 of 576 visual tokens, % of the unpruned model's average score), "
    "all read from one table, MMTok's (Dong et al., arXiv 2508.18264, Table 1: GQA, MMB, MME, POPE, SQA, VQAv2, "
    "TextVQA, MMMU, SEED), which takes its baselines' scores from VisionZip's paper and reruns DivPrune's official "
    "code: (a) VisionZip's own benchmark scores (Yang et al., CVPR 2025), training-free, averaged by MMTok; (b) "
    "FastV (Chen et al., ECCV 2024) as VisionZip's paper ran it, not FastV's own paper; (c) DivPrune (Alvar et al., "
    "CVPR 2025) as MMTok reran it, not the DivPrune paper's own table. \"—\": no figure could be read: the stored "
    "copies of the VisionZip, DivPrune, CDPruner, DART and FasterVLM papers opened only as far as their abstracts, "
    "which give none at 64 tokens. What those abstracts say: CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967) "
    "keeps 94 % of LLaVA's accuracy at 95 % fewer FLOPs; DART (Wen et al., arXiv 2502.11494) reports \"comparable "
    "performance\" with 88.9 % of the tokens pruned (64 of 576), without a figure; FasterVLM (Zhang et al., arXiv "
    "2412.01818: the CLS attention of the feature layer, our `feature`) keeps 90 % of LLaVA-1.5-7B's performance "
    "with 95 % pruned (29 of 576)."
)


def method_needs(strategy) -> str:
    """What a strategy reads to choose, in the README's words, from its registry attributes."""
    if strategy.stage == "lm":
        return ("the text's attention at LM layer K" if "text_tokens" in strategy.needs
                else "the LM's keys and values at layer K")
    parts = []
    if "attention" in strategy.needs:
        parts.append("CLS attention (attention received without CLS)")
    if "features" in strategy.needs:
        parts.append("keys" if strategy.merges else "features")
    if "text_tokens" in strategy.needs:
        parts.append("text")
    if "pixels" in strategy.needs:
        parts.append("nothing (seeded by the pixels)")
    return " + ".join(parts) or "nothing"


def attention_map_free(strategy) -> bool:
    """Whether it reads no attention at all (the tower's, or the text's at LM layer K)."""
    return not (strategy.scored or (strategy.stage == "lm" and "text_tokens" in strategy.needs))


def measured_selection(form: str, strategy) -> str:
    """The selection cost ``benchmarks/token_filtering.py`` measured for ``form`` on its LLaVA-1.5 CPU proxy
    (N = 576, batch 1): worst milliseconds over the ratios, and that as a share of the released tower."""
    for setting in result("token_filtering").get("method_settings", []):
        if setting["device"] != "cpu" or setting["family"] != "llava" or setting["batch"] != 1:
            continue
        method = setting["methods"].get(form)
        if method and "selection_worst_ms" in method:  # the choosing step plus what capturing attention adds
            return (f"{method['selection_worst_ms']:.1f} ms ({100 * method['selection_share_of_tower']:.1f} % of "
                    f"the {setting['tower_layers']}-layer tower)")
    return "not measured yet"


def demo_accuracy(form: str) -> str:
    rows = {round(r["ratio"], 2): r["accuracy"] for r in result("demo_full")["sweep"]["rows"] if r["strategy"] == form}
    if not rows:
        return "not measured yet"
    return " / ".join(f3(rows[r]) if r in rows else "—" for r in (0.4, 0.2, 0.05))


def pruning_methods() -> str:
    """README "Choosing a pruning method": a row per registered method's showcase form (``+native``, a position
    modifier, left out), its traits read off the registry, its measured numbers off the results files."""
    from sentilens.mllm.families import TITLES
    from sentilens.mllm.pruning import parse_strategy, showcase_strategies

    rows = []
    for form in showcase_strategies():
        strategy = parse_strategy(form)
        if strategy.native_positions:
            continue
        cost = METHOD_COST[type(strategy).__name__] + (MERGE_COST if strategy.merges else "") + (
            RELEVANCE_COST if strategy.stage == "vision" and "text_tokens" in strategy.needs else "")
        families = [title for family, title in TITLES.items() if strategy.unsupported(family) is None]
        rows.append([f"`{form}`", "LM" if strategy.stage == "lm" else "vision", method_needs(strategy),
                     "yes" if attention_map_free(strategy) else "no",
                     "all five" if len(families) == len(TITLES) else ", ".join(families), cost,
                     measured_selection(form, strategy), demo_accuracy(form), PUBLISHED_64.get(form, "—")])
    demo = result("demo_full")["sweep"]
    return (f"Per method as the full demo and the sweep run it (`K` = 0 in the demo's 4-layer tiny model, 2 by "
            f"default). Demo accuracy: the committed full demo (`benchmarks/results/demo_full.json`, {demo['n']} "
            f"test posts of the synthetic cue task, {demo['image_tokens']} visual tokens an image; at r = 1 every "
            "method scores the same). Measured selection cost: `benchmarks/results/token_filtering.json` on the "
            "CPU proxy of LLaVA-1.5's tower (N = 576, batch 1). The last column is "
            "published, not ours (sources below the table).\n\n"
            + table(["method", "stage", "needs", "attention-map free", "families", "selection cost",
                     "measured selection cost", "demo accuracy, r = 0.4 / 0.2 / 0.05",
                     "published, LLaVA-1.5-7B at 64 tokens"], rows)
            + "\n" + PUBLISHED_NOTE + "\n")


GENERATORS: dict[str, Callable[[], str]] = {
    "demo-headline": demo_headline, "demo-timing": demo_timing, "demo-sweep": demo_sweep, "demo-bars": demo_bars,
    "predict-throughput": predict_throughput, "fusion-cache": fusion_cache, "real-text-cpu": real_text_cpu,
    "real-text-levers": real_text_levers, "text-predict-rate": text_predict_rate,
    "real-text-gpu": real_text_gpu, "token-filtering-gpu": token_filtering_gpu,
    "token-filtering-cpu": token_filtering_cpu, "token-filtering-methods": token_filtering_methods,
    "received-kernel": received_kernel, "mllm-scoring": mllm_scoring,
    "serve-load": serve_load, "abuse": abuse, "pruning-methods": pruning_methods,
}


def render(text: str, where: str = "") -> str:
    """``text`` with every marked passage written afresh (an unknown name is an error)."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"{where}: no generator for <!-- numbers:{name} -->")
        return match[1] + GENERATORS[name]() + match[4]

    return BLOCK.sub(fill, text)


def stale(root: Path | None = None) -> list[str]:
    """``page: block`` for every marked passage that differs from what its results file gives."""
    root = root or ROOT
    found = []
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        fresh = render(text, str(page))
        if fresh != text:
            old = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
            new = {m["name"]: m["body"] for m in BLOCK.finditer(fresh)}
            found += [f"{page.relative_to(root)}: {name}" for name in old if old[name] != new.get(name)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is stale")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for item in found:
            print(f"stale: {item} (run python benchmarks/doc_numbers.py)", file=sys.stderr)
        return 1 if found else 0
    for page in pages():
        text = page.read_text(encoding="utf-8")
        fresh = render(text, str(page))
        if fresh != text:
            page.write_text(fresh, encoding="utf-8")
            print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
