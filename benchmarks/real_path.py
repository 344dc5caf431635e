"""A user's first session on a released checkpoint folder, timed: train --lora, eval, sweep, predict.

Takes a released folder without its weights (e.g. ``../shared/checkpoints/llava-1.5-7b-hf``), writes its
real-layout checkpoint with random weights (``benchmarks/real_layout.py``: the real widths, names, shards and
dtype; ``--layers`` / ``--tower-layers`` decoder and tower layers, or ``--full-depth``), then runs the user's
commands, each as its own ``python -m sentilens`` process, as a user would:

1. ``train mllm --model CKPT --lora`` on ``--train-posts`` synthetic posts of mixed labels, ``--batch`` posts a
   step (``--steps`` optimizer steps, no val split: the epoch's seconds are the steps' alone);
2. ``eval`` and ``sweep --ratios 1,0.4 --repeats 1`` on ``--test-posts`` posts (one of them text-only);
3. ``predict`` of one post at r = 0.4.

Per command: wall seconds and the process's peak resident memory (its ``ru_maxrss``; on CUDA also the
allocator's peak, both written by the command's process as it exits); for training also the seconds per
optimizer step (the epoch's seconds over its steps). The results go to ``benchmarks/results/real_path.json``
(``--out``) with the machine, the torch threads, and the load average before and after each command: the
machine may be shared, and the file says so. The checkpoint and the run are written under ``--work`` (a
temporary folder by default, removed afterwards).

On a CPU (the default): 2 + 2 layers, batch 1, ``--mixed-precision bf16`` (LoRA's frozen base in bf16) and two
torch threads. On a GPU (``--device cuda --full-depth --dtype bf16 --batch 16``): the whole model, the paper's
global batch 16 in one step; results go to ``real_path_gpu.json`` unless ``--out`` says otherwise. GPU numbers
exist only once that has been run on a GPU.

Usage: ``python benchmarks/real_path.py ../shared/checkpoints/llava-1.5-7b-hf [--layers 2] [--tower-layers 2]
[--threads 2] [--device cpu|cuda] [--full-depth] [--dtype bf16|no] [--batch 1] [--steps 2] [--test-posts 2]
[--work DIR] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEAK_FILE = "peak.json"

WITH_PEAKS = """
import atexit, json, os, resource, runpy, sys
def _peaks():
    peaks = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        peaks["cuda_bytes"] = torch.cuda.max_memory_allocated()
    with open(os.environ["SENTILENS_BENCH_PEAK"], "w") as f:
        json.dump(peaks, f)
atexit.register(_peaks)
sys.argv = ["sentilens", *sys.argv[1:]]
runpy.run_module("sentilens", run_name="__main__")
"""
"""``python -m sentilens ARGS`` under a wrapper that writes the process's peak RSS (and the CUDA allocator's peak)
as it exits."""


def real_layout():
    """benchmarks/real_layout.py, imported by path (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("real_layout", ROOT / "benchmarks" / "real_layout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_layout"] = module
    spec.loader.exec_module(module)
    return module


def make_data(folder: Path, train_posts: int, test_posts: int) -> Path:
    """The tests' synthetic manifest: ``train_posts`` of mixed labels, no val split, ``test_posts`` test posts (the
    last two a long post and a text-only post)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mllm_helpers import small_manifest

    return small_manifest(folder, n_train=train_posts, n_val=0, n_test=test_posts, mixed=True)


def timed(args: list[str], threads: int, work: Path, device: str) -> dict:
    """Run ``sentilens ARGS`` in its own process: wall seconds, peak RSS, load before / after, its JSON output
    (the commands choose CUDA when it is there; ``CUDA_VISIBLE_DEVICES`` hides it for a CPU measurement)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "SENTILENS_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "SENTILENS_BENCH_PEAK": str(work / PEAK_FILE)}
    (work / PEAK_FILE).unlink(missing_ok=True)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WITH_PEAKS, *args], capture_output=True, env=env, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"sentilens {' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    row = {"command": " ".join(args), "seconds": round(seconds, 2), "load_average_before": load_before,
           "load_average_after": os.getloadavg()}
    peaks = json.loads((work / PEAK_FILE).read_text())
    row["peak_rss_gb"] = round(peaks["rss_bytes"] / 1e9, 3)
    if "cuda_bytes" in peaks:
        row["cuda_peak_gb"] = round(peaks["cuda_bytes"] / 1e9, 3)
    out = done.stdout
    try:
        row["output"] = json.loads(out)
    except json.JSONDecodeError:
        pass
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a released folder (config, tokenizer, processor, weight index)")
    parser.add_argument("--config", type=Path, help="the config for a folder that has none (LLaVA-NeXT's copy)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--tower-layers", type=int, default=2, help="vision-tower layers (default 2)")
    parser.add_argument("--full-depth", action="store_true", help="every layer of the release (a GPU's job)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each command (default 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["bf16", "no"], default="bf16",
                        help="--mixed-precision of training: bf16 (LoRA's frozen base in bf16) or no (float32)")
    parser.add_argument("--batch", type=int, default=1, help="posts per optimizer step (default 1; the paper: 16)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2)")
    parser.add_argument("--test-posts", type=int, default=2, help="eval / sweep posts (default 2, one text-only)")
    parser.add_argument("--work", type=Path, help="where the checkpoint and the run go (default: a temporary "
                                                  "folder, removed afterwards)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/real_path.json, "
                                                 "real_path_gpu.json on CUDA)")
    args = parser.parse_args(argv)
    if min(args.layers, args.tower_layers, args.threads, args.batch, args.steps) < 1 or args.test_posts < 2:
        parser.error("--layers, --tower-layers, --threads, --batch and --steps must be at least 1, --test-posts 2")
    out = args.out or RESULTS / ("real_path_gpu.json" if args.device == "cuda" else "real_path.json")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
    work = args.work or Path(tempfile.mkdtemp(prefix="real-path-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    from sentilens.machine import environment

    result: dict = {"source": args.src.name, "device": args.device, "threads": args.threads,
                    "layers": "all" if args.full_depth else args.layers,
                    "tower_layers": "all" if args.full_depth else args.tower_layers,
                    "mixed_precision": args.dtype, "batch": args.batch, "steps": args.steps,
                    "machine": {**environment(), "shared": "other jobs may run on this machine: see the load "
                                                          "averages beside each command"},
                    "commands": {}}
    try:
        started, load_before = time.perf_counter(), os.getloadavg()
        checkpoint = work / "checkpoint"
        layers = None if args.full_depth else args.layers
        towers = None if args.full_depth else args.tower_layers
        real_layout().build(args.src, checkpoint, layers=layers, tower_layers=towers, seed=0, check=False,
                            config=args.config)
        result["commands"]["build_checkpoint"] = {"seconds": round(time.perf_counter() - started, 2),
                                                  "load_average_before": load_before,
                                                  "load_average_after": os.getloadavg(),
                                                  "bytes": sum(p.stat().st_size for p in checkpoint.iterdir())}
        data = make_data(work / "data", args.batch * args.steps, args.test_posts)
        run = work / "run"
        train = timed(["train", "mllm", "--data", str(data), "--out", str(run), "--model", str(checkpoint), "--lora",
                       "--epochs", "1", "--batch-size", str(args.batch), "--global-batch-size", str(args.batch),
                       "--mixed-precision", args.dtype, "--json"], args.threads, work, args.device)
        epoch = json.loads((run / "history.json").read_text())[0]
        train["seconds_per_step"] = round(epoch["seconds"] / len(epoch["steps"]), 2)
        train["steps"] = len(epoch["steps"])
        result["commands"]["train"] = train
        result["precision"] = json.loads((run / "config.json").read_text())["precision"]
        result["commands"]["eval"] = timed(["eval", "--run", str(run), "--data", str(data), "--json"],
                                           args.threads, work, args.device)
        result["commands"]["sweep"] = timed(["sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4",
                                             "--repeats", "1", "--json"], args.threads, work, args.device)
        result["sweep_rows"] = [{k: row.get(k) for k in ("ratio", "kept_tokens", "latency_ms_per_post", "speedup",
                                                          "gflops_per_post")}
                                for row in json.loads((run / "sweep.json").read_text())["rows"]]
        from sentilens.data.records import read_split

        post = next(p for p in read_split(data, "test") if p.image)
        result["commands"]["predict"] = timed(["predict", "--run", str(run), "--image", post.image, "--text",
                                               post.text, "--keep-ratio", "0.4", "--json"],
                                              args.threads, work, args.device)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({name: {k: v for k, v in row.items() if k != "output"}
                      for name, row in result["commands"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
