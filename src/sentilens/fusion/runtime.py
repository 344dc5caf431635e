"""Where the fusion encoders run at prediction time: eager PyTorch, or ONNX Runtime (issue 13).

Why ONNX Runtime: on a CPU, eager PyTorch is slow exactly where the embedded encoders spend
their time, EfficientNet-Lite0's depthwise convolutions and MiniLM's small matrix products at
batch 32 (``benchmarks/predict_throughput.py`` measures the split). ONNX Runtime runs the same
graph, with the same fp32 weights, several times faster; outputs agree with eager PyTorch up to
float reassociation (about 1e-6). The other candidates were measured on this machine and set
aside: channels-last EfficientNet gains about 1.2x; int8 dynamic quantisation of MiniLM (ONNX
Runtime's) gains 1.3x more on top but moves the token states by up to 1.0 (mean |state| 0.2),
which the head trained on fp32 features was never shown; ``torch.compile`` needs a compiler and
minutes of warm-up per shape on 2 cores.

The export is done when a predictor is loaded, from whatever weights the run carries (a
fine-tuned text encoder included), so no pre-exported file can go stale. The exported file is
cached on disk, named by a hash of the weights and of everything else that shapes the graph, so
the next load of the same run skips the export. After every export (or cache hit) a probe batch
of two different shapes, padded, goes through both PyTorch and the session; a model that does
not export, or whose outputs disagree, stays on PyTorch with a warning. GPUs always use PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sentilens.errors import SentilensError

log = logging.getLogger("sentilens.runtime")

Runtime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[str, ...] = ("auto", "onnx", "torch")
OPSET = 17
AGREEMENT = 1e-3
"""Largest |difference| allowed between PyTorch's and ONNX Runtime's outputs on the probe batch;
float reassociation gives about 1e-6, a wrongly traced graph (a baked-in shape or mask) gives 0.1+."""


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise SentilensError(f"unknown encoder runtime '{runtime}' (choose from {', '.join(RUNTIMES)})")
    return runtime


def resolve_runtime(runtime: str, device: str | torch.device) -> str:
    """``auto`` is ONNX Runtime on a CPU where it is installed, else PyTorch."""
    check_runtime(runtime)
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "onnx":
        if not on_cpu:
            raise SentilensError("the onnx encoder runtime runs on the CPU; use --runtime torch on a GPU")
        if not onnx_available():
            raise SentilensError("the onnx encoder runtime needs the onnxruntime package (pip install onnxruntime)")
        return "onnx"
    if runtime == "auto":
        return "onnx" if on_cpu and onnx_available() else "torch"
    return "torch"


def default_onnx_dir() -> Path:
    """Exported encoders live beside the feature cache: ``onnx`` under the cache root."""
    from sentilens.cache import cache_root

    return cache_root() / "onnx"


def weights_digest(module: torch.nn.Module, *settings: object) -> str:
    """A hash of every parameter and buffer of ``module`` plus ``settings`` (names and values)."""
    digest = hashlib.sha256()
    for item in (type(module).__qualname__, torch.__version__, OPSET, *settings):
        digest.update(f"{item}\0".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OnnxModule:
    """An ONNX Runtime session standing in for ``forward(*tensors) -> tuple of tensors`` of a module."""

    def __init__(self, path: Path, input_names: Sequence[str], threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # No busy-waiting between ops: the image-decoding threads share the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = list(input_names)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {name: np.ascontiguousarray(t.numpy()) for name, t in zip(self.input_names, inputs, strict=True)}
        return tuple(torch.from_numpy(out) for out in self.session.run(None, feed))


class _Forward(torch.nn.Module):
    """Wraps a function of tensors as a module for the exporter (which traces ``forward``)."""

    def __init__(self, owner: torch.nn.Module, fn: Callable[..., tuple[torch.Tensor, ...]]):
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fn(*inputs)


def export_onnx(module: torch.nn.Module, fn: Callable[..., tuple[torch.Tensor, ...]], example: Sequence[torch.Tensor],
                input_names: Sequence[str], output_names: Sequence[str], dynamic: dict[str, dict[int, str]],
                path: Path) -> None:
    """Trace ``fn`` (which reads ``module``'s weights) on ``example`` and write an ONNX file atomically."""
    wrapper = _Forward(module, fn).eval()  # the exporter restores the wrapper's mode on every submodule
    was_training = module.training
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(example), str(tmp_path), dynamo=False, opset_version=OPSET,
                              input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
        module.train(was_training)


def onnx_twin(module: torch.nn.Module, fn: Callable[..., tuple[torch.Tensor, ...]],
              probes: Sequence[Sequence[torch.Tensor]], input_names: Sequence[str], output_names: Sequence[str],
              dynamic: dict[str, dict[int, str]], key: str, what: str,
              compare: Callable[[Sequence[torch.Tensor], tuple, tuple], float] | None = None,
              cache_dir: Path | None = None) -> OnnxModule | None:
    """``fn`` exported to ONNX Runtime and checked against PyTorch on ``probes``; ``None`` if that fails.

    ``compare(inputs, torch_outputs, onnx_outputs)`` gives the largest difference that matters
    (default: over every output element); above :data:`AGREEMENT` the twin is refused.
    """
    path = (cache_dir or default_onnx_dir()) / f"{key}.onnx"
    try:
        if not path.is_file():
            export_onnx(module, fn, probes[0], input_names, output_names, dynamic, path)
        twin = OnnxModule(path, input_names, torch.get_num_threads())
        worst = 0.0
        for probe in probes:
            with torch.inference_mode():
                expected = fn(*probe)
            got = twin(*probe)
            worst = max(worst, compare(probe, expected, got) if compare else
                        max(float((e.float() - g.float()).abs().max()) for e, g in zip(expected, got, strict=True)))
    except Exception as err:  # any exporter or runtime failure: PyTorch still works
        warnings.warn(f"{what}: ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "running it with PyTorch", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    if worst > AGREEMENT:
        warnings.warn(f"{what}: ONNX Runtime disagrees with PyTorch by {worst:.3g}; running it with PyTorch",
                      stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    log.info("%s runs on ONNX Runtime (max |diff| vs PyTorch %.2g)", what, worst)
    return twin
