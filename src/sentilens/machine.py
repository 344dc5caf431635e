"""What machine a result came from: recorded by the report and the benchmarks beside their numbers."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, device and threads: enough to tell whether two timings are comparable."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu_name()})",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def memory_bytes() -> int:
    """Memory a model could be built in on this machine: the physical RAM plus every CUDA device's memory.

    The whole, not what is free now: a size this bound refuses can never be built here, whatever else runs,
    and the answer does not change from one second to the next (so a run is refused or accepted the same way).
    """
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 0
    gpus = 0
    try:
        import torch

        if torch.cuda.is_available():
            gpus = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA set-up: the RAM alone is the bound
        gpus = 0
    return ram + gpus
