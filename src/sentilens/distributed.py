"""One place for the process layout under a launcher: ``accelerate launch`` (DDP, DeepSpeed) or ``torchrun``
(also several CPU processes).

Both families ask here which process they are (:func:`rank`, :func:`world_size`,
:func:`is_main_process`), which device to use (:func:`default_device`), and how to split a
prediction job over the processes (:func:`predict_sharded`: ``eval``, ``predict``, the MLLM's
validation). MLLM training is data-parallel through accelerate's ``Accelerator``; fusion
training runs in the main process only (the head trains on cached features in seconds to
minutes, so splitting it would buy little), the other processes return at once. Only the main process writes files
and draws progress bars; the others are quiet by rule (:func:`sentilens.progress.progress_bar`
asks :func:`is_main_process`), never by an environment variable set from library code.

Without a launcher (one process, no ``WORLD_SIZE``) everything here is the trivial
answer and accelerate is not imported.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
Item = TypeVar("Item")


def world_size() -> int:
    """Processes launched together (``WORLD_SIZE``, set by ``accelerate launch`` / torchrun); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index among them (``RANK``); 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True in one process only: the one that writes outputs and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``): which GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """This process's device: ``cuda:<local rank>`` under a launcher (the CPU with ``accelerate launch
    --cpu``), else ``cuda`` when there is a GPU, else the CPU.

    Read from the launcher's environment, so asking starts no process group (a process that
    works alone, like fusion training on the main process, never waits for the others).
    """
    cpu_only = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not torch.cuda.is_available() or cpu_only:
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank()}" if is_distributed() else "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a command was given (``--device``), checked: ``None`` is :func:`default_device`; otherwise
    ``cpu``, ``cuda`` or ``cuda:N`` of a GPU this machine has, else a one-line error (exit 2), before
    anything is loaded."""
    from sentilens.errors import SentilensError

    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        chosen = device
    else:
        try:
            chosen = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            chosen = None
        if chosen is None or chosen.type not in ("cpu", "cuda"):
            raise SentilensError(f"--device {device!r}: not a device (cpu, cuda or cuda:N)")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise SentilensError(f"--device {device}: this machine has no usable CUDA GPU (use --device cpu)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise SentilensError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                 f"numbered from 0")
    return chosen


def process_state():
    """accelerate's process state, set up for this process's device (the first call decides, for the process).

    On a CPU it is set up with ``cpu=True``: accelerate joins CPU processes (gloo) only when told so, and
    ``torchrun`` tells it nothing (``accelerate launch --cpu`` runs one process, its multi-CPU launch needs mpirun),
    so without it each of N processes would train and predict alone.
    """
    from accelerate import PartialState

    state = PartialState(cpu=default_device().type == "cpu")
    if torch.distributed.is_initialized():
        _leave_process_group_at_exit()  # a gloo group left alive aborts the interpreter at exit
    return state


@functools.cache
def _leave_process_group_at_exit() -> None:
    atexit.register(_leave_process_group)  # once per process


def _leave_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wait_for_everyone() -> None:
    """A barrier across the launched processes (nothing without a launcher)."""
    if is_distributed():
        process_state().wait_for_everyone()


def predict_sharded(predict: Callable[[Sequence[Item]], list[T]], items: Sequence[Item]) -> list[T]:
    """``predict(items)``; under a launcher with several processes, sharded and merged.

    Each process predicts an interleaved shard of equal size (the last shards are filled by
    repeating items from the start, so every process runs the same number of batches, as
    DeepSpeed ZeRO-3 needs); every process returns all predictions, in input order.
    """
    if not is_distributed() or not items:
        return predict(items)
    from accelerate.utils import gather_object

    process_state()  # joined with the others before gather_object asks accelerate's state
    world, me = world_size(), rank()
    per_process = -(-len(items) // world)
    padded = [items[i % len(items)] for i in range(per_process * world)]
    mine = predict(padded[me::world])
    gathered = gather_object(list(mine))
    merged: list[T] = [None] * len(padded)  # type: ignore[list-item]
    for r in range(world):
        merged[r::world] = gathered[r * per_process:(r + 1) * per_process]
    return merged[: len(items)]
