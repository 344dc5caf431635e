"""Prediction throughput of the embedded fusion default (EfficientNet-Lite0 + all-MiniLM-L6-v2), in one run.

What is measured, all in this one process, at ``--threads`` torch/ONNX Runtime threads:

1. A per-post breakdown of prediction: file read + decode (full, and JPEG draft), resize and
   normalise, tokenisation, image encoder forward and text encoder forward (PyTorch and ONNX
   Runtime), the fusion head, and writing the output row.
2. ``encoders_only_posts_per_s``: the two encoders alone on pre-decoded pixel tensors and
   pre-tokenised texts (length-ordered batches of 32), plain PyTorch; ``optimized_encoders_posts_per_s``:
   the same on ONNX Runtime (the default runtime on a CPU).
3. ``end_to_end_posts_per_s``: JPEG files on disk -> predictions JSONL through
   ``sentilens.predict.predict_to_file`` (what ``sentilens predict --input`` runs), and
   ``baseline_end_to_end_posts_per_s``: the code path before issue 13 (features through
   ``featurize`` without a cache: each image file read and hashed, decoded in full, encoded 16 at a
   time in eager PyTorch, then the head, then the whole output written at the end).
   Baseline, new path and both encoder-only timings are interleaved, ``--rounds`` times, and the
   medians are reported, so a change in the machine's load hits all of them alike.
4. ``weighted_f1_change``: weighted F1 of the default path minus that of plain PyTorch (baseline
   decoding), on the test splits of the shared real text sets (text-only runs trained on a seeded
   subsample of their train splits, frozen encoders) and on a synthetic set drawn with another
   seed than the one the full run was trained on (its posts' images saved as large JPEGs).

The synthetic posts' images are drawn at 128 px and saved as ``--jpeg-size`` square JPEGs
(quality 90), the size of a phone photo posted to social media, so decoding costs what it costs
in the wild.

Usage: ``python benchmarks/predict_throughput.py --text-data /work/shared/data --threads 2``
(``--text-data`` holds ``mvsa_multiple_text.jsonl`` and ``hfm_sarcasm_text.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from sentilens.data.images import load_image
from sentilens.data.prepare import prepare
from sentilens.data.records import Post, read_manifest, read_split, write_manifest
from sentilens.data.synth import make_synthetic
from sentilens.fusion.cache import FeatureCache, featurize
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.encoders import pixel_array, stack_pixels
from sentilens.fusion.model import collate
from sentilens.fusion.predictor import ENCODE_BATCH, FusionPredictor
from sentilens.fusion.train import train_fusion
from sentilens.machine import environment
from sentilens.metrics import classification_metrics
from sentilens.predict import predict_to_file
from sentilens.runs import write_json

TEXT_SETS = {"mvsa_multiple": "mvsa_multiple_text.jsonl", "hfm_sarcasm": "hfm_sarcasm_text.jsonl"}
OLD_CHUNK = 512  # posts per featurize call in the code path before issue 13


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def todays_path(predictor: FusionPredictor, posts: list[Post], output: Path) -> None:
    """Prediction as it ran before issue 13: featurize (no cache) + head per 512 posts, output written at the end."""
    rows = []
    for start in range(0, len(posts), OLD_CHUNK):
        chunk = posts[start:start + OLD_CHUNK]
        features = featurize(chunk, *predictor.feature_encoders, None)[0]
        predictions = predictor.to_predictions(predictor.probabilities(features, chunk))
        rows.extend({"id": p.id, **pred.to_dict()} for p, pred in zip(chunk, predictions, strict=True))
    with output.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def jpeg_posts(manifest: Path, out_dir: Path, size: int) -> list[Post]:
    """Every post of a synthetic manifest, its image re-saved as a size x size JPEG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    posts = []
    for split_posts in read_manifest(manifest).values():
        for post in split_posts:
            path = out_dir / f"{post.id}.jpg"
            with Image.open(post.image) as img:
                img.convert("RGB").resize((size, size), Image.BICUBIC).save(path, quality=90)
            posts.append(Post(post.id, post.text, str(path), post.label))
    return posts


def encoder_batches(predictor: FusionPredictor, posts: list[Post]) -> list[tuple[list[list[int]], torch.Tensor]]:
    """Pre-tokenised, length-ordered text batches with their pre-decoded pixel tensors."""
    text, image = predictor.text_encoder, predictor.image_encoder
    ids = text.tokenize([p.text for p in posts])
    order = sorted(range(len(posts)), key=lambda i: len(ids[i]))
    batches = []
    for start in range(0, len(order), ENCODE_BATCH):
        chunk = order[start:start + ENCODE_BATCH]
        pixels = stack_pixels([pixel_array(load_image(posts[i].image), image.image_size) for i in chunk])
        batches.append(([ids[i] for i in chunk], pixels))
    return batches


def encoders_only(predictor: FusionPredictor, batches) -> tuple[float, float]:
    """Seconds of the image and of the text encoder over all batches."""
    image_s = sum(seconds(lambda b=b: predictor.image_encoder.encode_pixels(b[1])) for b in batches)
    text_s = sum(seconds(lambda b=b: predictor.text_encoder.encode_ids(b[0])) for b in batches)
    return image_s, text_s


def breakdown(plain: FusionPredictor, fast: FusionPredictor, posts: list[Post], out: Path) -> dict:
    """Milliseconds per post of each stage, on ``posts`` (batches of ENCODE_BATCH where the stage batches)."""
    n, size = len(posts), plain.image_encoder.image_size
    ms = {}
    ms["read_decode_full"] = seconds(lambda: [load_image(p.image) for p in posts])
    ms["read_decode_draft"] = seconds(lambda: [load_image(p.image, draft_size=size) for p in posts])
    full = [load_image(p.image) for p in posts]
    draft = [load_image(p.image, draft_size=size) for p in posts]
    ms["resize_normalise_from_full"] = seconds(lambda: [pixel_array(img, size) for img in full])
    ms["resize_normalise_from_draft"] = seconds(lambda: [pixel_array(img, size) for img in draft])
    ms["tokenise"] = seconds(lambda: plain.text_encoder.tokenize([p.text for p in posts]))
    batches = encoder_batches(plain, posts)
    ms["image_encoder_torch"], ms["text_encoder_torch"] = encoders_only(plain, batches)
    ms["image_encoder_onnx"], ms["text_encoder_onnx"] = encoders_only(fast, batches)
    features = featurize(posts, *plain.feature_encoders, None)[0]
    batch = collate(features, *plain.settings.feature_dims)
    with torch.inference_mode():
        ms["head"] = seconds(lambda: torch.softmax(plain.model(batch), dim=-1))
    rows = plain.to_predictions(plain.probabilities(features, posts))
    path = out / "rows.jsonl"

    def write() -> None:
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": p.id, **r.to_dict()}) + "\n" for p, r in zip(posts, rows, strict=True))

    ms["output_writing"] = seconds(write)
    return {k: v * 1000 / n for k, v in ms.items()}


def weighted_f1(predictor: FusionPredictor, posts: list[Post], path: str) -> float:
    if path == "todays":
        features = featurize(posts, *predictor.feature_encoders, None)[0]
        predictions = predictor.to_predictions(predictor.probabilities(features, posts))
    else:
        predictions = predictor.predict(posts)
    return classification_metrics([p.label for p in posts], [p.label for p in predictions],
                                  predictor.labels)["weighted_f1"]


def text_set_f1(name: str, source: Path, tmp: Path, train_n: int, seed: int, test_n: int | None) -> dict:
    """A text-only run on a seeded subsample of the set's train split; test weighted F1 plain vs default path."""
    full = tmp / f"{name}-manifest"
    prepare("table", source, full, seed=seed, show_progress=False)
    splits = read_manifest(full)
    rng = random.Random(seed)
    train = rng.sample(splits["train"], min(train_n, len(splits["train"])))
    val = rng.sample(splits["val"], min(train_n // 5, len(splits["val"])))
    labels = json.loads((full / "stats.json").read_text())["labels"]
    write_manifest(tmp / f"{name}-train", {"train": train, "val": val, "test": []}, labels)
    run = tmp / f"{name}-run"
    train_fusion(FusionConfig(variant="text", epochs=10, seed=seed), tmp / f"{name}-train", run,
                 cache=FeatureCache(tmp / "cache"), device="cpu")
    test = read_split(full, "test")[:test_n]
    plain = weighted_f1(FusionPredictor.from_run(run, device="cpu", runtime="torch"), test, "live")
    fast = weighted_f1(FusionPredictor.from_run(run, device="cpu"), test, "live")
    return {"test_posts": len(test), "train_posts": len(train), "weighted_f1_plain": round(plain, 4),
            "weighted_f1_default": round(fast, 4), "weighted_f1_change": round(fast - plain, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-data", type=Path, required=True, help="folder holding the shared real text sets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--posts", type=int, default=96, help="posts per end-to-end timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jpeg-size", type=int, default=1080)
    parser.add_argument("--text-train", type=int, default=1000, help="train posts per real text set")
    parser.add_argument("--text-test", type=int, default=600, help="test posts per real text set (the first N)")
    parser.add_argument("--synth-n", type=int, default=200, help="posts of each synthetic set (train, eval)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_throughput.json")
    args = parser.parse_args()
    os.environ.setdefault("SENTILENS_QUIET", "1")
    torch.set_num_threads(args.threads)
    load = {"before": os.getloadavg()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["SENTILENS_CACHE"] = str(tmp / "sentilens-cache")
        make_synthetic(tmp / "synth-train", n=args.synth_n, seed=0)
        train_fusion(FusionConfig(variant="full", epochs=10, seed=0), tmp / "synth-train", tmp / "full",
                     cache=FeatureCache(tmp / "cache"), device="cpu")
        make_synthetic(tmp / "synth-eval", n=args.synth_n, seed=1)
        posts = jpeg_posts(tmp / "synth-eval", tmp / "jpeg", args.jpeg_size)
        plain = FusionPredictor.from_run(tmp / "full", device="cpu", runtime="torch")
        export_s = seconds(lambda: FusionPredictor.from_run(tmp / "full", device="cpu"))
        cached_load_s = seconds(lambda: FusionPredictor.from_run(tmp / "full", device="cpu"))
        fast = FusionPredictor.from_run(tmp / "full", device="cpu")
        assert fast.runtime == "onnx", fast.runtime
        timed = posts[:args.posts]
        batches = encoder_batches(plain, timed)
        # Warm-up of both paths and both runtimes (first-call allocations, page cache of the files).
        todays_path(plain, timed[:32], tmp / "warm.jsonl")
        predict_to_file(fast, timed[:32], tmp / "warm.jsonl")
        encoders_only(plain, batches[:1])
        encoders_only(fast, batches[:1])

        times: dict[str, list[float]] = {"baseline": [], "new": [], "enc_torch": [], "enc_onnx": []}
        loads = []
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            times["baseline"].append(seconds(lambda: todays_path(plain, timed, tmp / "baseline.jsonl")))
            times["new"].append(seconds(lambda: predict_to_file(fast, timed, tmp / "new.jsonl")))
            times["enc_torch"].append(sum(encoders_only(plain, batches)))
            times["enc_onnx"].append(sum(encoders_only(fast, batches)))
        loads.append(os.getloadavg()[0])
        rate = {k: len(timed) / statistics.median(v) for k, v in times.items()}
        stages = breakdown(plain, fast, timed[:64], tmp)

        synth_plain = weighted_f1(plain, posts, "todays")
        synth_fast = weighted_f1(fast, posts, "live")
        text_sets = {name: text_set_f1(name, args.text_data / file, tmp, args.text_train, 0, args.text_test)
                     for name, file in TEXT_SETS.items()}
    load["after"] = os.getloadavg()
    changes = [synth_fast - synth_plain, *(t["weighted_f1_change"] for t in text_sets.values())]
    result = {
        "benchmark": "prediction throughput of the embedded fusion default (issue 13)",
        "model": {"variant": "full", "image_encoder": plain.settings.image_encoder,
                  "text_encoder": plain.settings.text_encoder, "prompt": plain.settings.prompt,
                  "image_size": plain.settings.image_size},
        "inputs": f"synthetic posts (seed 1), images as {args.jpeg_size}x{args.jpeg_size} JPEG q90 on disk; "
                  f"{len(timed)} posts per timing, {args.rounds} interleaved rounds, medians",
        "encoders_only_posts_per_s": round(rate["enc_torch"], 2),
        "optimized_encoders_posts_per_s": round(rate["enc_onnx"], 2),
        "end_to_end_posts_per_s": round(rate["new"], 2),
        "baseline_end_to_end_posts_per_s": round(rate["baseline"], 2),
        "end_to_end_over_encoders": round(rate["new"] / rate["enc_onnx"], 3),
        "speedup_over_baseline": round(rate["new"] / rate["baseline"], 2),
        "weighted_f1_change": round(min(changes), 4),
        "weighted_f1_change_by_set": {
            "synthetic_jpeg": {"posts": len(posts), "weighted_f1_plain": round(synth_plain, 4),
                               "weighted_f1_default": round(synth_fast, 4),
                               "weighted_f1_change": round(synth_fast - synth_plain, 4)},
            **text_sets},
        "ms_per_post": {k: round(v, 2) for k, v in stages.items()},
        "seconds_per_round": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "onnx_first_load_seconds": round(export_s, 1),
        "onnx_cached_load_seconds": round(cached_load_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {**environment(),
                    "load_average_1_5_15_before": [round(x, 2) for x in load["before"]],
                    "load_average_1_5_15_after": [round(x, 2) for x in load["after"]],
                    "load_average_1min_per_round": [round(x, 2) for x in loads],
                    "note": "2 cores shared with other jobs: absolute rates move with the load, the ratios "
                            "come from interleaved timings in this one run"},
    }
    write_json(args.out, result)
    for key in ("encoders_only_posts_per_s", "optimized_encoders_posts_per_s", "end_to_end_posts_per_s",
                "baseline_end_to_end_posts_per_s", "end_to_end_over_encoders", "speedup_over_baseline",
                "weighted_f1_change"):
        print(f"{key}: {result[key]}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
