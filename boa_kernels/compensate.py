"""The column pass's hot loop, fused: for a run of columns of one block, across every head and row at once,
quantize each column on its grid, take the error and spread it over the block's later columns.

Sizes and layout (contiguous; float32 or float64):
    W1, E1, codes  (b, R, B)    block weights (updated in place), errors e_j = (w_j − q_j) / U_jj, integer codes
    U1             (1|b, B, B)  the block's diagonal block of U = chol(H_in⁻¹), upper; shared by all b or one each
    scale, zero    (b, R, G)    grids; group_of (B,) int64: the grid of each block column
Columns start..stop−1 are processed; each one updates W1[..., j:] (the rest of the block, itself included). The
lazy update of the columns after the block (one GEMM, E1 @ U[block, rest]) and the row update stay with the solver:
they are single BLAS calls already. Backends: C++ (csrc/cpu/compensate.cpp), CUDA (csrc/cuda/compensate.cu), Triton
(boa_kernels/triton_compensate.py); `compensate_block_torch` below is the reference they are tested against.
"""
from __future__ import annotations

import torch

from boa_kernels.dispatch import backend_for
from boa_kernels.loader import load_cpu, load_cuda


def compensate_block_torch(W1, E1, codes, U1, scale, zero, group_of, maxq: float, start: int, stop: int) -> None:
    """Reference: one column at a time in torch (the public GPTQ/BoA code's shape of computation)."""
    groups = group_of.tolist()
    for j in range(start, stop):
        w = W1[..., j]
        s, z = scale[..., groups[j]], zero[..., groups[j]]
        c = torch.clamp(torch.round(w / s) + z, 0, maxq)  # boa.core.quantizer's quantize / dequantize
        codes[..., j] = c
        e = (w - s * (c - z)) / U1[:, j, j, None]
        W1[..., j:] -= e[..., None] * U1[:, None, j, j:]
        E1[..., j] = e


def compensate_block_(W1, E1, codes, U1, scale, zero, group_of, maxq: float, start: int, stop: int) -> None:
    """Quantizes columns start..stop−1 of the block W1 in place (see the module docstring), on the best backend."""
    if start >= stop:
        return
    backend = backend_for(W1.device, ("cuda", "triton", "cpp"))
    args = (W1, E1, codes, U1.contiguous(), scale.contiguous(), zero.contiguous(), group_of, float(maxq),
            int(start), int(stop))
    if backend == "cpp":
        load_cpu().compensate_block_(*args)
    elif backend == "cuda":
        load_cuda().compensate_block_(*args)
    elif backend == "triton":
        from boa_kernels.triton_compensate import compensate_block_triton

        compensate_block_triton(*args)
    else:
        compensate_block_torch(*args)
