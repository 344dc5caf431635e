"""Fusion feature cache and prediction speed on this machine, measured in one run.

1. A 3-epoch ``full`` run on the synthetic set (600 posts) with an empty feature cache, then the
   same run again with the cache it filled: the cold / warm wall-time ratio is what the cache buys
   every later epoch-count change, ablation row and resumed run. Both runs include loading the
   encoders; the warm one never calls them.
2. Prediction throughput (posts/s) of the embedded defaults (EfficientNet-Lite0 224 px +
   all-MiniLM-L6-v2, no cache) through ``FusionPredictor``, the path ``eval``/``predict``/``serve`` use.

Usage: ``python benchmarks/fusion_cache.py [--n 600] [--threads N] [--out benchmarks/results/fusion_cache.json]``.
The machine's load average is recorded with the numbers: on a CPU shared with other jobs they vary.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from sentilens.data.records import read_manifest
from sentilens.data.synth import make_synthetic
from sentilens.fusion.cache import FeatureCache
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.predictor import FusionPredictor
from sentilens.fusion.train import train_fusion
from sentilens.machine import cpu_name
from sentilens.runs import write_json


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fusion_cache.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    os.environ.setdefault("SENTILENS_QUIET", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic(tmp / "data", n=args.n, seed=0)
        config = FusionConfig(variant="full", epochs=3, seed=0)
        cache = FeatureCache(tmp / "cache")
        cold, cold_s = timed(lambda: train_fusion(config, tmp / "data", tmp / "cold", cache=cache, device="cpu"))
        warm, warm_s = timed(lambda: train_fusion(config, tmp / "data", tmp / "warm", cache=cache, device="cpu"))
        assert warm["cache"]["text_encoded"] == warm["cache"]["image_encoded"] == 0
        assert warm["test"] == cold["test"], "a warm run must reproduce the cold run exactly"

        posts = [p for split in read_manifest(tmp / "data").values() for p in split]
        predictor, load_s = timed(lambda: FusionPredictor.from_run(tmp / "warm", device="cpu"))
        predictor.predict(posts[:8])  # warm-up: first-call allocations
        _, predict_s = timed(lambda: predictor.predict(posts))

    result = {
        "benchmark": "fusion feature cache and prediction throughput",
        "data": f"synthetic, n={args.n}, 128 px images",
        "config": {"variant": "full", "epochs": 3, "image_encoder": config.image_encoder,
                   "image_size": config.image_size, "text_encoder": config.text_encoder, "prompt": config.prompt,
                   "batch_size": config.batch_size},
        "cold_seconds": round(cold_s, 2),
        "warm_seconds": round(warm_s, 2),
        "cold_over_warm": round(cold_s / warm_s, 2),
        "cold_cache": cold["cache"],
        "warm_cache": warm["cache"],
        "test_accuracy": cold["test"]["accuracy"],
        "predict_posts": len(posts),
        "predict_seconds": round(predict_s, 2),
        "predict_posts_per_second": round(len(posts) / predict_s, 1),
        "predictor_load_seconds": round(load_s, 2),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
    }
    write_json(args.out, result)
    for key in ("cold_seconds", "warm_seconds", "cold_over_warm", "predict_posts_per_second"):
        print(f"{key}: {result[key]}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
