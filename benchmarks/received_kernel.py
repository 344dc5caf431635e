"""Received-attention kernel on a GPU: the Triton kernel (sentilens.mllm.received_kernel) against the blockwise
torch route (pruning.received_attention_only), ms per call (mean of 5 after a warm-up) and max error relative to
a float32 reference, on random bf16 query/key maps (B, heads, T, d) of the towers' shapes. Needs CUDA and Triton;
its output of 2026-11-26 (H200) is kept in results/token_filtering_gpu.json under kernel_check.
"""

import time

import torch

from sentilens.mllm.pruning import received_attention_only, scoring_route
from sentilens.mllm.received_kernel import received_attention_fused

# toy; Qwen3-VL-8B batch 16 (48 x 48 patches); SmolVLM2 batch 4 (17 tiles of 27 x 27); Qwen2.5-VL window size
SHAPES = [(2, 3, 130, 72), (16, 16, 2304, 72), (68, 16, 729, 72), (16, 16, 1024, 80)]


def timed(fn, q, k, scale, reference) -> tuple[float, float]:
    fn(q, k, scale)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        result = fn(q, k, scale)
    torch.cuda.synchronize()
    error = (result - reference).abs().max().item() / reference.abs().max().item()
    return (time.perf_counter() - start) / 5 * 1e3, error


def main() -> None:
    print("route", scoring_route(torch.device("cuda")))
    generator = torch.Generator(device="cuda").manual_seed(0)
    for shape in SHAPES:
        q, k = (torch.randn(*shape, device="cuda", generator=generator, dtype=torch.bfloat16) * 1.5 for _ in range(2))
        scale = shape[-1] ** -0.5
        reference = received_attention_only(q.float(), k.float(), scale)
        out = {name: timed(fn, q, k, scale, reference)
               for name, fn in (("kernel", received_attention_fused), ("blocks", received_attention_only))}
        print(shape, {name: (round(ms, 3), f"{error:.2e}") for name, (ms, error) in out.items()}, flush=True)


if __name__ == "__main__":
    main()
