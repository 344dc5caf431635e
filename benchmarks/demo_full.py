"""The full demo, timed: ``sentilens demo --size full`` (what ``make demo`` runs) for each seed asked for.

Each seed runs in its own process under ``/usr/bin/time -v`` (wall and CPU seconds of the whole
command), into ``WORK/seedN``; the finished demo's own records are then read back: the seconds of each
stage (``stages.json``), the tower's held-out accuracy, the test metrics, the whole sweep
(``runs/*/sweep.json``), the attention on the cue, and the bars the README quotes (accuracy at r = 1
and 0.4, ``all`` against ``random`` at r = 0.2, the speedup there against its FLOP-ideal, the cue's
attention mass over its area). Seed 0 is the file's top level, every other seed sits under
``seed_N``; an earlier seed-0 timing from another machine is kept under ``other_machines``. A seed whose
folder already holds a finished demo and its time file is read, not rerun, so a run stopped half-way loses
only the seed it was in.

Usage::

    python benchmarks/demo_full.py --work /tmp/demo-full [--seeds 0,1] [--out benchmarks/results/demo_full.json]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from sentilens.machine import environment
from sentilens.runs import read_json, write_json

COMMAND = "/usr/bin/time -v python -m sentilens demo --out DIR --size full"


def timed_demo(out_dir: Path, seed: int) -> dict:
    """Run the demo for ``seed`` (unless ``out_dir`` holds a finished one); wall/CPU seconds and load."""
    time_file = out_dir.with_suffix(".time")
    load_file = out_dir.with_suffix(".load")
    if not (time_file.is_file() and load_file.is_file() and (out_dir / "report.md").is_file()):
        load_before = os.getloadavg()[0]
        cmd = ["/usr/bin/time", "-v", "-o", str(time_file), sys.executable, "-m", "sentilens", "demo",
               "--out", str(out_dir), "--size", "full", "--seed", str(seed)]
        subprocess.run(cmd, check=True)
        load_file.write_text(f"{load_before} {os.getloadavg()[0]}\n")
    text = time_file.read_text()

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()

    clock = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60 ** i for i, value in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    before, after = (float(x) for x in load_file.read_text().split())
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "load_average_before_after": [round(before, 2), round(after, 2)]}


def sweep_row(sweep: dict, strategy: str, ratio: float) -> dict:
    return next(r for r in sweep["rows"] if r["strategy"] == strategy and abs(r["ratio"] - ratio) < 1e-9)


def demo_record(out_dir: Path, seed: int) -> dict:
    """What the finished demo in ``out_dir`` recorded, with the bars the README quotes."""
    stages = read_json(out_dir / "stages.json")["stages"]
    (mllm_dir,) = (p.parent for p in (out_dir / "runs").glob("*/sweep.json"))
    sweep = read_json(mllm_dir / "sweep.json")
    cue = {k: v for k, v in read_json(out_dir / "attention_on_cue.json").items() if k != "per_post"}
    test = read_json(mllm_dir / "metrics-test.json")
    at_r1, at_04 = sweep_row(sweep, "all", 1.0), sweep_row(sweep, "all", 0.4)
    all_02, random_02 = sweep_row(sweep, "all", 0.2), sweep_row(sweep, "random", 0.2)
    return {
        "stages": {name: {k: stage[k] for k in ("seconds", "cpu_seconds", "load_average")}
                   for name, stage in stages.items()},
        "tower_held_out_accuracy": stages["vision-tower pretraining"]["result"]["held_out_accuracy"],
        "attention_on_cue": cue,
        "test_metrics": test,
        "sweep": sweep,
        "bars": {"accuracy_r1": at_r1["accuracy"], "accuracy_r04": at_04["accuracy"],
                 "all_r02": all_02["accuracy"], "random_r02": random_02["accuracy"],
                 "speedup_r02": all_02["speedup"], "ideal_r02": all_02["ideal_speedup"],
                 "speedup_of_ideal_r02": all_02["speedup"] / all_02["ideal_speedup"],
                 "mass_over_area": cue["mass_over_area"]},
        "seed": seed,
    }


def code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes under src/" if dirty else "")


OTHER_MACHINE_KEYS = ("code", "machine", "wall_seconds", "cpu_seconds", "load_average_before_after", "issue_11_bars")


def other_machines(earlier: dict, machine: dict) -> list[dict]:
    """The earlier file's seed-0 timings from machines other than ``machine`` (a demo's wall time depends on the
    CPU far more than on its seed), with those it already kept; one per machine and commit."""
    kept = list(earlier.get("other_machines", []))
    if earlier.get("machine") and earlier["machine"].get("device") != machine.get("device"):
        record = {key: earlier[key] for key in OTHER_MACHINE_KEYS if key in earlier}
        record["stage_seconds"] = {name: round(stage["seconds"], 1) for name, stage in earlier["stages"].items()}
        record["sweep_repeats"] = earlier["sweep"]["repeats"]
        kept.append(record)
    unique = {(r["machine"].get("device"), r["code"]): r for r in kept}
    return [r for r in unique.values() if r["machine"].get("device") != machine.get("device")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="one demo folder per seed goes here")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_full.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if seeds[0] != 0:
        raise SystemExit("--seeds: seed 0 comes first (it is the file's top level)")
    args.work.mkdir(parents=True, exist_ok=True)
    machine = environment()
    out: dict = {}
    for seed in seeds:
        folder = args.work / f"seed{seed}"
        record = {"what": f"sentilens demo --size full --seed {seed} (what `make demo` runs for seed 0); wall and "
                          "CPU from /usr/bin/time -v, load = 1-minute load average before and after",
                  "command": COMMAND + (f" --seed {seed}" if seed else ""), "code": code_version(),
                  "machine": machine, **timed_demo(folder, seed), **demo_record(folder, seed)}
        record["issue_11_bars"] = record.pop("bars")
        if seed == 0:
            out.update(record)
        else:
            out[f"seed_{seed}"] = record
    earlier = read_json(args.out) if args.out.is_file() else {}
    for key, value in earlier.items():  # a seed not rerun now keeps its earlier record
        if key.startswith("seed_") and key not in out:
            out[key] = value
    out["other_machines"] = other_machines(earlier, machine)
    write_json(args.out, out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
