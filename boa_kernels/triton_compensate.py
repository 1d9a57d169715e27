"""Triton kernel of the fused column compensation (the op in boa_kernels/compensate.py; its reference is
`compensate_block_torch` there).

Sizes and layout (contiguous; float32 or float64):
    W1, E1, codes  (b, R, B)    block weights (in place), errors, integer codes
    U1             (1|b, B, B)  chol(H_in⁻¹) block, upper; shared by all b or one each
    scale, zero    (b, R, G)    grids; group_of (B,) int64
Mapping: one program per BLOCK_R rows (rows are independent); the program keeps its rows' B weights in registers
(BLOCK_B = next power of two ≥ B) and walks columns start..stop−1 in order: pick column j out of the tile, quantize,
error, then the rank-1 update of columns k ≥ j with row j of U1 (zeros masked in for k < j, so w − e·0 = w).
Runs on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (how the tests check it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """torch.round: floor, then up above .5, and on a tie to the even neighbour (x − floor(x) is exact)."""
    f = tl.floor(x)
    frac = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))


@triton.jit
def _compensate_kernel(W, E, C, U, S, Z, GROUP, maxq, start, stop, n_rows, R, B, G, u_matrix_stride,
                       BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols < B)[None, :]
    w = tl.load(W + rows[:, None] * B + cols[None, :], mask=tile_ok, other=0.0)
    u_rows = U + (rows // R) * u_matrix_stride  # each row's U1 matrix (stride 0 when shared)
    for j in range(start, stop):
        g = tl.load(GROUP + j)
        s = tl.load(S + rows * G + g, mask=row_ok, other=1.0)
        z = tl.load(Z + rows * G + g, mask=row_ok, other=0.0)
        w_j = tl.sum(tl.where(cols[None, :] == j, w, 0.0), axis=1)
        # IEEE divisions (Triton's default fp32 division may be approximate): codes as torch rounds them
        c = tl.minimum(tl.maximum(round_half_even(tl.fdiv(w_j, s, ieee_rounding=True)) + z, 0.0), maxq)
        u_jj = tl.load(u_rows + j * B + j, mask=row_ok, other=1.0)
        e = tl.fdiv(w_j - s * (c - z), u_jj, ieee_rounding=True)
        tl.store(C + rows * B + j, c, mask=row_ok)
        tl.store(E + rows * B + j, e, mask=row_ok)
        u_j = tl.load(u_rows[:, None] + j * B + cols[None, :], mask=tile_ok & (cols >= j)[None, :], other=0.0)
        w = w - e[:, None] * u_j
    tl.store(W + rows[:, None] * B + cols[None, :], w, mask=tile_ok)


def compensate_block_triton(W1, E1, codes, U1, scale, zero, group_of, maxq: float, start: int, stop: int) -> None:
    """Launcher: same arguments and effect as `compensate_block_torch`."""
    b, R, B = W1.shape
    for name, t in (("W1", W1), ("E1", E1), ("codes", codes), ("U1", U1), ("scale", scale), ("zero", zero),
                    ("group_of", group_of)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if group_of.dtype != torch.int64 or group_of.numel() != B or U1.shape[-2:] != (B, B):
        raise ValueError("group_of must be int64 with B entries and U1 (1|b, B, B)")
    block_b = triton.next_power_of_2(B)
    block_r = max(1, min(16, 4096 // block_b))  # keep the register tile at ≤ 4096 elements
    n_rows = b * R
    grid = (triton.cdiv(n_rows, block_r),)
    _compensate_kernel[grid](
        W1, E1, codes, U1, scale, zero, group_of, maxq, start, stop, n_rows, R, B, scale.shape[-1],
        0 if U1.shape[0] == 1 else B * B, BLOCK_R=block_r, BLOCK_B=block_b,
    )
