"""Triton kernels of the low-bit activation matmul, for any batch (the op in boa_kernels/int8_matmul.py; its
reference is `int8_matmul_torch` there, its CPU twin csrc/cpu/int8_matmul.cpp).

Sizes and layout:
    x        (M, K) float32, float16 or bfloat16, rows contiguous; y (M, N) in x's dtype
    qweight, scales, zeros, perm: boa's packed layout (boa/core/packed.py; the bit planes are spelled out in
             boa_kernels/triton_packed_gemm.py), groups of a multiple of 32 columns (an int8 dot's K is at least
             32 on NVIDIA GPUs) or per-channel; bias (N,) any float dtype or None
_quantize_rows_kernel: a program per token: max|x| over the row, the scale s_a = max(amax · f, FLT_MIN) (f the
    float32 factor clip / (2^(b−1) − 1)), then the codes round_half_even(x / s_a) (an IEEE division) clamped to
    [−2^(b−1), 2^(b−1) − 1], as int8 in packed column order (gathered by perm; padding 0): A (M, K_pad).
_int8_gemm_kernel: a program per BLOCK_M × BLOCK_N tile of y, walking each group in runs of 32 columns:
    isum += dot(A[:, run], codes[run, :]) (int8 × int8 → int32) and asum += Σ_run A; 8-bit codes do not fit int8,
    c − 128 does, and Σ c·a = Σ (c − 128)·a + 128 · Σ a. At the group's end acc += float(isum − (z − bias_c)·asum) ·
    s_w, exact integers until then; y = s_a · acc + bias.
Runs on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (how the tests check it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from boa_kernels.int8_matmul import MAX_EXACT_GROUP
from boa_kernels.triton_compensate import round_half_even
from boa_kernels.triton_packed_gemm import check_packed_operands, tile_codes

RUN = 32
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal number


@triton.jit
def _quantize_rows_kernel(X, PERM, A, SA, K, K_pad, stride_x, factor, A_BITS: tl.constexpr, HAS_PERM: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) * factor, FLT_MIN)
    maxq = 2 ** (A_BITS - 1) - 1
    for k0 in range(0, K_pad, BLOCK_K):
        j = k0 + cols
        ok = j < K
        src = tl.load(PERM + j, mask=ok, other=0) if HAS_PERM else j
        x = tl.load(x_row + src, mask=ok, other=0.0).to(tl.float32)
        code = tl.minimum(tl.maximum(round_half_even(tl.fdiv(x, scale, ieee_rounding=True)), -maxq - 1.0), maxq)
        tl.store(A + row.to(tl.int64) * K_pad + j, code.to(tl.int8), mask=j < K_pad)
    tl.store(SA + row, scale)


@triton.jit
def _int8_gemm_kernel(A, SA, QW, S, Z, BIAS, Y, M, N, K, K_pad, G, group_size, row_bytes,
                      BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    i = tl.arange(0, 32)  # a run's columns
    a_rows = A + rm.to(tl.int64)[:, None] * K_pad
    w_rows = QW + rn.to(tl.int64)[None, :] * row_bytes
    code_bias = 128 if BITS == 8 else 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        start = g * group_size
        isum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        asum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for col0 in range(start, tl.minimum(start + group_size, K), 32):
            a = tl.load(a_rows + col0 + i[None, :], mask=m_ok[:, None], other=0)
            codes = tile_codes(w_rows + (col0 // 64) * (8 * BITS), (col0 % 64 + i)[:, None], n_ok[None, :], BITS)
            isum += tl.dot(a, (codes - code_bias).to(tl.int8), out_dtype=tl.int32)
            asum += tl.sum(a.to(tl.int32), axis=1)
        scale = tl.load(S + rn * G + g, mask=n_ok, other=0.0)
        zero = tl.load(Z + rn * G + g, mask=n_ok, other=0).to(tl.int32)
        exact = isum - (zero - code_bias)[None, :] * asum[:, None]
        acc += exact.to(tl.float32) * scale[None, :]

    acc = acc * tl.load(SA + rm, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = Y + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, a_bits: int,
                     clip_ratio: float) -> torch.Tensor:
    """Launcher: the arguments and result of the CPU op `int8_matmul` (x (M, K) → y (M, N) in x's dtype)."""
    if a_bits not in (4, 8):
        raise ValueError(f"activations are quantized to 4 or 8 bits, not {a_bits}")
    M, K, N, k_pad, G = check_packed_operands(x, qweight, scales, zeros, perm, bias, bits, group_size, RUN,
                                              "the Triton int8 kernel")
    if (K if G == 1 else group_size) > MAX_EXACT_GROUP:
        raise ValueError(f"groups wider than {MAX_EXACT_GROUP} columns could overflow the int32 sums")

    out_dtype = x.dtype
    x = x if x.stride(-1) == 1 else x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    bias = None if bias is None else bias.reshape(-1).contiguous()
    y = torch.empty(M, N, dtype=out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.float32,
                    device=x.device)
    if M == 0 or N == 0:
        return y.to(out_dtype)

    codes = torch.empty(M, k_pad, dtype=torch.int8, device=x.device)
    token_scales = torch.empty(M, dtype=torch.float32, device=x.device)
    factor = clip_ratio / (2 ** (a_bits - 1) - 1)  # passed as float32, as torch rounds a Python factor
    _quantize_rows_kernel[(M,)](
        x, perm.contiguous() if perm is not None else codes, codes, token_scales, K, k_pad, x.stride(0), factor,
        A_BITS=a_bits, HAS_PERM=perm is not None, BLOCK_K=min(1024, triton.next_power_of_2(k_pad)),
    )
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int8_gemm_kernel[grid](
        codes, token_scales, qweight, scales, zeros, bias if bias is not None else scales, y,
        M, N, K, k_pad, G, group_size if G > 1 else k_pad, qweight.shape[1],
        BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y.to(out_dtype)
