"""Triton GEMM of the packed low-bit matmul, for any batch (the op in boa_kernels/packed_matmul.py; its reference is
`packed_matmul_torch` there, its CPU twin csrc/cpu/packed_matmul.cpp).

Sizes and layout (boa/core/packed.py):
    x        (M, K)               float32, float16 or bfloat16, rows contiguous; y (M, N) in x's dtype
    qweight  uint8 (N, K_pad·b/8)  a row = K_pad / 64 tiles of 8·b bytes, bit planes low bits first:
                                   8-bit byte i = c_i; 4-bit byte i = c_i | c_{i+32} << 4;
                                   2-bit byte i = c_i | c_{i+16} << 2 | c_{i+32} << 4 | c_{i+48} << 6;
                                   3 bits = that 2-bit plane, then a 1-bit plane (bit i of its 8 bytes = bit 2 of c_i)
    scales   float32 (N, G), zeros uint8 (N, G): packed column j is in group min(j // group_size, G − 1)
    perm     int32 (K,) or None: packed column j multiplies x[:, perm[j]]; bias (N,) any float dtype or None
Mapping: one program per BLOCK_M × BLOCK_N tile of y; the K loop walks the 64-code tiles, each as 4 runs of 16
consecutive columns. A run lies in one group (group sizes are multiples of 16), so its codes minus the zero, exact
small integers, are the dot's right operand as they stand (16 × BLOCK_N, in x's dtype: exact in fp16 and bf16 too),
x's 16 columns gathered by perm the left one, and the group's scale multiplies the fp32 product once per run:
    acc += dot(x[:, run], (codes − zero)[run, :]) · scale
fp32 x runs an IEEE fp32 dot (no TF32). Padding columns (K ≤ j < K_pad) read x as 0, never out of bounds.
Runs on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (how the tests check it), where bf16 x takes an fp32 dot:
the interpreter cannot multiply bf16 matrices.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from boa_kernels.dispatch import triton_interpreted

_DOT_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def tile_codes(tile, col, n_ok, BITS: tl.constexpr):
    """Codes int32 of the tile's columns `col` (values 0–63, shape (R, 1)) for the rows whose tiles start at `tile`
    ((1, BLOCK_N) pointers): boa/packed_math.h's unpack_code, one column per element."""
    if BITS == 8:
        codes = tl.load(tile + col, mask=n_ok, other=0).to(tl.int32)
    elif BITS == 4:
        codes = (tl.load(tile + col % 32, mask=n_ok, other=0).to(tl.int32) >> (4 * (col // 32))) & 15
    else:
        codes = (tl.load(tile + col % 16, mask=n_ok, other=0).to(tl.int32) >> (2 * (col // 16))) & 3
        if BITS == 3:  # bit col of the 1-bit plane: byte 16 + col // 8, bit col % 8
            high = tl.load(tile + 16 + col // 8, mask=n_ok, other=0).to(tl.int32)
            codes = codes | (((high >> (col % 8)) & 1) << 2)
    return codes


@triton.jit
def _packed_gemm_kernel(X, QW, S, Z, PERM, BIAS, Y, M, N, K, G, group_size, row_bytes, stride_xm,
                        BITS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                        DOT_TYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    i = tl.arange(0, 16)  # a run's columns
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = QW + rn.to(tl.int64)[None, :] * row_bytes  # (1, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, 64)):
        tile = w_rows + t * (8 * BITS)
        for r in tl.static_range(4):
            col0 = t * 64 + 16 * r
            cols = col0 + i
            col_ok = cols < K
            if HAS_PERM:
                src = tl.load(PERM + cols, mask=col_ok, other=0)
            else:
                src = cols
            xs = tl.load(x_rows + src[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)

            codes = tile_codes(tile, (16 * r + i)[:, None], n_ok[None, :], BITS)  # (16, BLOCK_N): run r of the tile
            g = tl.minimum(col0 // group_size, G - 1)
            scale = tl.load(S + rn * G + g, mask=n_ok, other=0.0)
            zero = tl.load(Z + rn * G + g, mask=n_ok, other=0).to(tl.float32)
            centred = (codes.to(tl.float32) - zero[None, :]).to(DOT_TYPE)  # integers |·| < 256: exact
            if DOT_TYPE == tl.float32:
                part = tl.dot(xs.to(tl.float32), centred, input_precision="ieee")
            else:
                part = tl.dot(xs.to(DOT_TYPE), centred)
            acc += part * scale[None, :]

    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = Y + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def check_packed_operands(x, qweight, scales, zeros, perm, bias, bits: int, group_size: int, group_multiple: int,
                          kernel: str) -> tuple[int, int, int, int, int]:
    """The checks every launcher over boa's packed layout makes; returns (M, K, N, k_pad, G)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"packed weights have 2, 3, 4 or 8 bits, not {bits}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError("x must be a 2-D float tensor (batch, in); flatten it first")
    M, K = x.shape
    N = qweight.shape[0]
    k_pad = -(-K // 64) * 64
    G = scales.shape[1] if scales.dim() == 2 else 0
    if any(t.device != x.device for t in (qweight, scales, zeros, *(t for t in (perm, bias) if t is not None))):
        raise ValueError("all tensors must be on x's device")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 8 != k_pad * bits:
        raise ValueError(f"qweight must be uint8 (out, {k_pad * bits // 8}) for {K} input columns at {bits} bits")
    if scales.dtype != torch.float32 or zeros.dtype != torch.uint8 or scales.shape != (N, G) or zeros.shape != (N, G):
        raise ValueError("scales (float32) and zeros (uint8) must be (out, groups)")
    if G < 1:
        raise ValueError("scales and zeros need at least one group")
    if G > 1 and (group_size <= 0 or group_size % group_multiple):
        raise ValueError(f"{kernel}: groups must span a multiple of {group_multiple} columns (or per-channel "
                         "grids)")
    if G > 1 and not (G - 1) * group_size < K <= G * group_size:
        raise ValueError(f"{G} groups of {group_size} columns do not cover {K} input columns")
    if perm is not None and (perm.dtype != torch.int32 or perm.numel() != K):
        raise ValueError("perm must be an int32 tensor of in entries")
    if bias is not None and bias.numel() != N:
        raise ValueError("bias must hold out entries")

    return M, K, N, k_pad, G


def packed_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                       group_size: int) -> torch.Tensor:
    """Launcher: the arguments and result of the CPU op `packed_matmul` (x (M, K) → y (M, N) in x's dtype)."""
    M, K, N, k_pad, G = check_packed_operands(x, qweight, scales, zeros, perm, bias, bits, group_size, 16,
                                              "the packed kernels")

    out_dtype = x.dtype
    if out_dtype not in _DOT_TYPES:  # float64 and others run as float32, like the CUDA binding
        x = x.float()
    dot_type = _DOT_TYPES[x.dtype]
    if dot_type == tl.bfloat16 and x.device.type == "cpu" and triton_interpreted():
        dot_type = tl.float32
    x = x if x.stride(-1) == 1 else x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    perm = None if perm is None else perm.contiguous()
    bias = None if bias is None else bias.reshape(-1).contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.to(out_dtype)

    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _packed_gemm_kernel[grid](
        x, qweight, scales, zeros, perm if perm is not None else qweight, bias if bias is not None else scales, y,
        M, N, K, G, group_size if G > 1 else max(k_pad, 1), qweight.shape[1], x.stride(0),
        BITS=bits, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, DOT_TYPE=dot_type,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y.to(out_dtype)
