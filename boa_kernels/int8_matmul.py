"""y = x · Wᵀ (+ bias) computed in integers: packed low-bit weights (boa/core/packed.py) times low-bit activations
quantized per token on the fly (the grid of boa/transforms/activations.py):

    y[t, o] = s_a[t] · Σ_g s_w[o, g] · (Σ_{c∈g} q[o, c] · a[t, c] − z[o, g] · Σ_{c∈g} a[t, c])  (+ bias[o])

Activations, per token (row of x), in float32: s_a = max(clip · max|x| / (2^(b−1) − 1), FLT_MIN) and
a = clamp(round_half_even(x / s_a), −2^(b−1), 2^(b−1) − 1), b = a_bits ∈ {4, 8}: the codes of
boa.transforms.quantize_per_token, re-derived here because boa_kernels imports nothing from boa. Under act-order
(perm set) packed column j multiplies a[t, perm[j]]; the grid is per token, so the order does not change it.
The inner sums are exact integers per weight group (int32 in the kernels, int64 here); the groups combine in
float32. Sizes: x (..., in) any float dtype; W (out, in) a PackedWeight; y (..., out) in x's dtype.
Backends: C++ on a CPU (csrc/cpu/int8_matmul.cpp: vpdpbusd panels, AMX tiles for prefills where the CPU has them;
groups of a multiple of 4 columns), Triton on a
GPU (boa_kernels/triton_int8_gemm.py: groups of a multiple of 32), both for groups of up to MAX_EXACT_GROUP columns;
`int8_matmul_torch` is the reference both are tested against and the fallback everywhere else.
"""
from __future__ import annotations

import torch

from boa_kernels.dispatch import backend_for
from boa_kernels.packed_matmul import KERNEL_BITS
from boa_kernels.loader import load_cpu

A_BITS = (4, 8)
MAX_EXACT_GROUP = 65536  # csrc/include/boa/int8_math.h kMaxExactGroup: wider groups could overflow int32 sums


def per_token_codes(x: torch.Tensor, a_bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 (..., in) and scales float32 (..., 1) of x's rows, so that codes · scales is
    boa.transforms.quantize_per_token(x) (in float32)."""
    maxq = 2 ** (a_bits - 1) - 1
    x32 = x.float()
    scale = (x32.abs().amax(-1, keepdim=True) * (clip_ratio / maxq)).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(x32 / scale), -maxq - 1, maxq).to(torch.int8), scale


def group_sums_torch(x: torch.Tensor, w, a_bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact integers Σ_{c∈g} q[o, c] · a[t, c] − z[o, g] · Σ_{c∈g} a[t, c], int64 (batch, out, groups), and the
    tokens' scales (batch, 1), for x (batch, in). The int64 products run on the CPU (CUDA has no integer matmul)."""
    codes, scale = per_token_codes(x, a_bits, clip_ratio)
    a = codes.long().cpu()
    if w.perm is not None:
        a = a[:, w.perm.long().cpu()]  # packed column order
    q = w.codes()[:, : w.in_features].long().cpu()
    zeros = w.zeros.long().cpu()
    n_groups = w.scales.shape[1]
    sums = []
    for g in range(n_groups):
        end = w.in_features if g == n_groups - 1 else (g + 1) * w.group_size
        cols = slice(g * w.group_size, end)
        sums.append(a[:, cols] @ q[:, cols].T - a[:, cols].sum(-1, keepdim=True) * zeros[:, g])
    return torch.stack(sums, dim=-1).to(x.device), scale


def int8_matmul_torch(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, a_bits: int,
                      clip_ratio: float) -> torch.Tensor:
    """Reference: the per-group integer sums in int64, then the float combination."""
    lead = x.shape[:-1]
    sums, scale = group_sums_torch(x.reshape(-1, x.shape[-1]), w, a_bits, clip_ratio)
    y = (sums.float() * w.scales.to(sums.device)).sum(-1) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


def int8_matmul(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, a_bits: int,
                clip_ratio: float) -> torch.Tensor:
    """x (..., in) quantized per token to a_bits, times W(out, in)ᵀ, + bias, on the best backend for x's device."""
    if a_bits not in A_BITS:
        raise ValueError(f"activations are quantized to {A_BITS} bits, not {a_bits}")
    per_channel = w.scales.shape[1] == 1
    width = w.in_features if per_channel else w.group_size
    implemented = tuple(b for b, multiple in (("triton", 32), ("cpp", 4))
                        if width <= MAX_EXACT_GROUP and (per_channel or w.group_size % multiple == 0)
                        and w.bits in KERNEL_BITS)
    backend = backend_for(x.device, implemented)
    if backend == "torch":
        return int8_matmul_torch(x, w, bias, a_bits=a_bits, clip_ratio=clip_ratio)
    lead = x.shape[:-1]
    args = (x.reshape(-1, x.shape[-1]), w.qweight, w.scales, w.zeros, w.perm, bias, w.bits, w.group_size, a_bits,
            float(clip_ratio))
    if backend == "cpp":
        y = load_cpu().int8_matmul(*args)
    else:
        from boa_kernels.triton_int8_gemm import int8_gemm_triton

        y = int8_gemm_triton(*args)
    return y.reshape(*lead, y.shape[-1])
