"""Running sentilens under ``accelerate launch`` with several CPU processes (gloo), as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 600
"""A bound, not a speed requirement: two processes load models on a shared 2-core machine."""


def launch_env() -> dict[str, str]:
    """The environment of a launched run: this checkout's ``src`` first on the path (so the code under test is
    this checkout's, whatever the working directory), one thread per process, no progress bars."""
    path = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "SENTILENS_QUIET": "1", "OMP_NUM_THREADS": "1"}


def accelerate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch ARGS`` in ``cwd``."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, cwd=cwd, env=launch_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def launch_sentilens(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch --cpu --num_processes N -m sentilens ARGS`` in ``cwd``."""
    return accelerate("--cpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "-m", "sentilens", *args, cwd=cwd)
