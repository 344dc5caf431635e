"""Prediction rate of two text runs in one process: ``sentilens predict --input`` (``predict_to_file``) on the
same posts, the runs interleaved ``--rounds`` times so the machine's load hits both alike.

Used to check that a run trained another way (e.g. ``--text-top-layers 2``) predicts as fast as today's
default (``text``, frozen MiniLM): the first run given is the reference, every rate is reported with its
ratio to the reference's median.

Usage::

    python benchmarks/text_predict_rate.py --data DIR --run text=RUN_A --run text-top2=RUN_B \\
        [--posts 1000] [--rounds 3] [--threads 2] [--out benchmarks/results/text_predict_rate.json]

``--data`` is a prepared manifest folder; its test split's first ``--posts`` posts are predicted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sentilens.data.records import read_split
from sentilens.machine import environment
from sentilens.predict import load_predictor, predict_to_file
from sentilens.runs import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="the first is the reference")
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text_predict_rate.json")
    args = parser.parse_args()
    os.environ.setdefault("SENTILENS_QUIET", "1")
    torch.set_num_threads(args.threads)
    posts = read_split(args.data, "test")[:args.posts]
    runs = dict(spec.split("=", 1) for spec in args.run)
    predictors = {name: load_predictor(Path(folder), device="cpu") for name, folder in runs.items()}
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    rows: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, predictor in predictors.items():  # warm-up: ONNX export or graph build, caches
            predict_to_file(predictor, posts[:64], Path(tmp) / f"warm-{name}.jsonl")
        for _ in range(args.rounds):
            for name, predictor in predictors.items():
                output = Path(tmp) / f"{name}.jsonl"
                started = time.perf_counter()
                predict_to_file(predictor, posts, output)
                rates[name].append(len(posts) / (time.perf_counter() - started))
                rows[name] = len(output.read_text(encoding="utf-8").splitlines())
    reference = next(iter(runs))
    base = statistics.median(rates[reference])
    write_json(args.out, {
        "benchmark": "text_predict_rate", "data": str(args.data), "posts": len(posts), "rounds": args.rounds,
        "reference": reference,
        "runs": {name: {"run": runs[name], "runtime": predictors[name].runtime,
                        "posts_per_second": rates[name], "median_posts_per_second": statistics.median(rates[name]),
                        "over_reference": statistics.median(rates[name]) / base,
                        "rows_written": rows[name]} for name in runs},
        "machine": {**environment(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
    })
    for name in runs:
        print(f"{name}: {statistics.median(rates[name]):.1f} posts/s ({statistics.median(rates[name]) / base:.2f} "
              f"of {reference})")


if __name__ == "__main__":
    main()
