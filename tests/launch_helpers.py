"""Running sentilens with several CPU processes (torchrun, gloo), as a user would."""

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


def launch_sentilens(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m sentilens ARGS`` in ``cwd``: N processes on this CPU (gloo).

    Not ``accelerate launch --cpu --num_processes N``: with ``--cpu`` accelerate 1.x runs its single-process
    launcher (several CPU processes need mpirun there), so that command trains and predicts in one process.
    torchrun sets RANK / WORLD_SIZE for each process, and accelerate's state picks them up as it does under
    its own launcher.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "sentilens", "--", *args]  # "--": torchrun would read --run
    return subprocess.run(command, cwd=cwd, env=launch_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def free_port() -> int:
    """A TCP port nothing listens on now (two launches in one test session must not share the default)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
