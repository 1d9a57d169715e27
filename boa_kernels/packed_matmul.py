"""y = x · Wᵀ (+ bias) with W in boa's packed 2/3/4/8-bit layout (boa/core/packed.py; its 5/6-bit widths run on
torch), never unpacked in memory.

Sizes: x (..., in) any float dtype; W (out, in) as a PackedWeight; y (..., out) in x's dtype, computed in float32.
Backends: C++ on a CPU (csrc/cpu/packed_matmul.cpp: GEMV for ≤ 8 rows of x, dequantize-blocks + BLAS above), on a
GPU the CUDA GEMV for ≤ 8 rows (csrc/cuda/packed_gemv.cu) and the Triton GEMM otherwise
(boa_kernels/triton_packed_gemm.py); `packed_matmul_torch` — dequantize, then matmul — is the reference they are
tested against and the fallback everywhere. The kernels need groups of a multiple of 16 columns (or per-channel
grids); other group sizes run on torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from boa_kernels.dispatch import backend_for
from boa_kernels.loader import load_cpu, load_cuda

GEMV_MAX_BATCH = 8  # csrc/cpu/ops.h kGemvMaxBatch
KERNEL_BITS = (2, 3, 4, 8)  # the widths the packed kernels read; 5- and 6-bit layers (GGUF's Q5/Q6) run on torch


def packed_matmul_torch(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the whole float32 weight, then one matmul."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w.dequantize(torch.float32).to(x.device), b).to(x.dtype)


def kernel_ready(w) -> bool:
    """Whether the packed kernels take this weight's width and groups."""
    return (w.bits in KERNEL_BITS and (w.scales.shape[1] == 1 or w.group_size % 16 == 0)
            and getattr(w, "offsets", None) is None)  # block minimums (GGUF K types): torch


def packed_matmul(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W(out, in)ᵀ + bias, on the best backend for x's device and batch."""
    if not kernel_ready(w):
        return packed_matmul_torch(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    gemv = x2.shape[0] <= GEMV_MAX_BATCH
    backend = backend_for(x.device, ("cuda", "triton", "cpp") if gemv else ("triton", "cpp"))
    args = (x2, w.qweight, w.scales, w.zeros, w.perm, bias, w.bits, w.group_size)
    if backend == "cpp":
        y = load_cpu().packed_matmul(*args)
    elif backend == "cuda":
        y = load_cuda().packed_gemv(*args)
    elif backend == "triton":
        from boa_kernels.triton_packed_gemm import packed_gemm_triton

        y = packed_gemm_triton(*args)
    else:
        return packed_matmul_torch(x, w, bias)
    return y.reshape(*lead, y.shape[-1])
