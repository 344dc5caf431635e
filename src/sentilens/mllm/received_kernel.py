"""The attention each token receives, fused on a GPU (Triton): no attention map is written.

``received_j = sum_i softmax_j(q_i . k_j * scale)`` for every key ``j`` of every map (image x head), the
quantity :func:`sentilens.mllm.pruning.received_attention_only` computes block by block through memory.
Here each query-key tile is a tensor-core product kept in registers, in two passes over the tiles: the
first takes every query row's log-sum-exp (as a flash-attention kernel does), the second sums
``exp(s_ij - lse_i)`` down each key column. The map's ``T x T`` entries never reach memory, so a scored
layer costs two query-key products of arithmetic and no traffic.

Used by the pruning module on CUDA tensors when Triton is installed (it comes with CUDA builds of
PyTorch); elsewhere the blockwise route runs. The kernels also run under Triton's CPU interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64
"""Query rows per tile."""
BLOCK_N = 64
"""Key columns per tile."""


@triton.jit
def _row_log_sum_exp(q_ptr, k_ptr, lse_ptr, tokens, dim, scale, q_map, q_row, k_map, k_row,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: ``BLOCK_M`` query rows of one map; a running max and sum over every key tile."""
    which = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + which * q_map + rows[:, None] * q_row + dims[None, :],
                mask=(rows[:, None] < tokens) & (dims[None, :] < dim), other=0.0)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + which * k_map + cols[:, None] * k_row + dims[None, :],
                    mask=(cols[:, None] < tokens) & (dims[None, :] < dim), other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(cols[None, :] < tokens, s, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, 1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
        running_max = new_max
    tl.store(lse_ptr + which * tokens + rows, running_max + tl.log(running_sum), mask=rows < tokens)


@triton.jit
def _column_sums(q_ptr, k_ptr, lse_ptr, out_ptr, tokens, dim, scale, q_map, q_row, k_map, k_row,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: ``BLOCK_N`` key columns of one map; probabilities summed over every query tile."""
    which = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + which * k_map + cols[:, None] * k_row + dims[None, :],
                mask=(cols[:, None] < tokens) & (dims[None, :] < dim), other=0.0)
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, tokens, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(q_ptr + which * q_map + rows[:, None] * q_row + dims[None, :],
                    mask=(rows[:, None] < tokens) & (dims[None, :] < dim), other=0.0)
        lse = tl.load(lse_ptr + which * tokens + rows, mask=rows < tokens, other=float("inf"))
        s = tl.dot(q, tl.trans(k)) * scale
        total += tl.sum(tl.exp(s - lse[:, None]), 0)  # rows past the end: lse = inf, so they add 0
    tl.store(out_ptr + which * tokens + cols, total, mask=cols < tokens)


def received_attention_fused(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(B, T)`` float32: the attention each token receives, averaged over heads and queries.

    ``query``, ``key``: ``(B, heads, T, d)`` of one layer, unpadded images (no mask).
    """
    batch, heads, tokens, dim = query.shape
    maps = batch * heads
    q = query.reshape(maps, tokens, dim).contiguous()
    k = key.reshape(maps, tokens, dim).contiguous()
    lse = torch.empty(maps, tokens, dtype=torch.float32, device=query.device)
    received = torch.empty(maps, tokens, dtype=torch.float32, device=query.device)
    block_d = max(16, triton.next_power_of_2(dim))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    _row_log_sum_exp[(triton.cdiv(tokens, BLOCK_M), maps)](q, k, lse, tokens, dim, float(scaling), *strides,
                                                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    _column_sums[(triton.cdiv(tokens, BLOCK_N), maps)](q, k, lse, received, tokens, dim, float(scaling), *strides,
                                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    return received.view(batch, heads, tokens).sum(dim=1) / (tokens * heads)
