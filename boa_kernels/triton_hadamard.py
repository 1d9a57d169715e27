"""Triton kernel of the online Hadamard rotation (the op in boa_kernels/hadamard.py; its reference is
`hadamard_transform_torch` there, its CPU twin csrc/cpu/hadamard.cpp).

Sizes and layout: x (rows, n) float32, float16 or bfloat16, rows contiguous, n = m · p with p a power of two, at
least 16 where m > 1 (the core's product is a dot); signs float32 (n,) or None; core K float32 (m, m); y (rows, n)
in x's dtype, computed in float32.
Mapping: a program per row, held as one (M_PAD, P) tile (M_PAD: m rounded up to a power of two, at least 16 where
m > 1; the rows past m are zero): the signs, then log2(P) butterfly passes along P — the tile viewed as
(M_PAD, P / 2h, 2, h), the pair axis split off and (a + b, a − b) joined back, the reference's additions in its
order, so bit-identical — then Kᵀ (zero-padded) times the tile as one IEEE fp32 dot, then the scale.
Runs on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (how the tests check it). A whole row per program suits
the widths rotated online (14336 = 28 · 512 is a 32 × 512 tile); not tuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hadamard_kernel(X, SIGNS, K, Y, n, m, scale, HAS_SIGNS: tl.constexpr, MIX: tl.constexpr, M_PAD: tl.constexpr,
                     P: tl.constexpr, LOG_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.arange(0, M_PAD)[:, None]
    offs = block * P + tl.arange(0, P)[None, :]
    ok = block < m
    z = tl.load(X + row * n + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_SIGNS:
        z = z * tl.load(SIGNS + offs, mask=ok, other=0.0)
    for level in tl.static_range(LOG_P):
        h: tl.constexpr = 1 << level
        lo, hi = tl.split(tl.permute(tl.reshape(z, (M_PAD, P // (2 * h), 2, h)), (0, 1, 3, 2)))
        z = tl.reshape(tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2)), (M_PAD, P))
    if MIX:
        b = tl.arange(0, M_PAD)
        core_t = tl.load(K + b[None, :] * m + b[:, None], mask=(b[:, None] < m) & (b[None, :] < m), other=0.0)
        z = tl.dot(core_t, z, input_precision="ieee")  # y_b = Σ_a K[a, b] · z_a
    tl.store(Y + row * n + offs, (z * scale).to(Y.dtype.element_ty), mask=ok)


def hadamard_triton(x: torch.Tensor, signs: torch.Tensor | None, core: torch.Tensor, scale: float) -> torch.Tensor:
    """Launcher: the arguments and result of the CPU op `hadamard_transform` (x (rows, n) → y (rows, n))."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError("x must be a 2-D float tensor (rows, n); flatten it first")
    rows, n = x.shape
    m = core.shape[0]
    p = n // m
    if core.shape != (m, m) or core.dtype != torch.float32 or m * p != n or p & (p - 1):
        raise ValueError(f"core must be float32 (m, m) and rows of {n} columns m blocks of a power of two")
    if m > 1 and p < 16:
        raise ValueError(f"blocks of {p} columns: the Triton kernel needs at least 16 where the core is mixed in")
    if signs is not None and (signs.dtype != torch.float32 or signs.numel() != n):
        raise ValueError("signs must be a float32 tensor of n entries")
    if any(t.device != x.device for t in (core, *(() if signs is None else (signs,)))):
        raise ValueError("all tensors must be on x's device")
    x = x.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32,
                    device=x.device)
    if rows == 0:
        return y.to(x.dtype)
    _hadamard_kernel[(rows,)](
        x, signs if signs is not None else core, core.contiguous(), y, n, m, scale, HAS_SIGNS=signs is not None,
        MIX=m > 1, M_PAD=1 if m == 1 else max(16, triton.next_power_of_2(m)), P=p, LOG_P=p.bit_length() - 1,
    )
    return y.to(x.dtype)
