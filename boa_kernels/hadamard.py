"""The online Hadamard rotation: y = (x · diag(signs)) · (K ⊗ S) · scale along the last axis, the math of
boa.transforms.hadamard.Rotation.apply (its core K, its signs, scale 1/√n), computed in float32.

Sizes: x (..., n) float32, bfloat16 or float16, n = m · p with p a power of two; core K (m, m), a ±1 Hadamard matrix
or an orthogonal one scaled by √m; signs (n,) of ±1 or None; y (..., n) in x's dtype. Each row is viewed as (m, p):
the unnormalised fast Walsh–Hadamard transform of each block of p as butterfly passes (Sylvester's order: pairs
(j, j + h) in runs of 2h, h = 1, 2, 4, …; boa.transforms.hadamard.fast_walsh_hadamard forms the same x · S by
products with Sylvester factors, so the two agree to fp32 rounding; boa_kernels imports nothing from boa), then
y_b = Σ_a K[a, b] · z_a, then the scale. The kernels' butterflies are the reference's additions in its order.
Backends: C++ on a CPU (csrc/cpu/hadamard.cpp), Triton on a GPU (boa_kernels/triton_hadamard.py: p ≥ 16 where
m > 1); `hadamard_transform_torch` is the reference they are tested against and the fallback everywhere else.
"""
from __future__ import annotations

import torch

from boa_kernels.dispatch import backend_for
from boa_kernels.loader import load_cpu


def walsh_hadamard_torch(x: torch.Tensor) -> torch.Tensor:
    """x @ S along the last axis (a power of two, Sylvester's order), unnormalised: log2(n) butterfly passes."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def default_scale(n: int) -> float:
    return 1 / n**0.5


def hadamard_transform_torch(x: torch.Tensor, core: torch.Tensor, signs: torch.Tensor | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """Reference, in float32: Rotation.apply's steps on x.float(), the transform as butterflies."""
    n, m = x.shape[-1], core.shape[0]
    z = x.float() if signs is None else x.float() * signs.float()
    z = walsh_hadamard_torch(z.reshape(*x.shape[:-1], m, n // m))
    if m > 1:
        z = torch.einsum("ab,...ai->...bi", core.float(), z)
    return (z.reshape(x.shape) * (default_scale(n) if scale is None else scale)).to(x.dtype)


def hadamard_transform(x: torch.Tensor, core: torch.Tensor, signs: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """x (..., n) rotated along its last axis (see the module docstring), on the best backend for x's device."""
    n, m = x.shape[-1], core.shape[0]
    p = n // m
    if m * p != n or p & (p - 1):
        raise ValueError(f"rows of {n} columns are not {m} blocks of a power of two")
    backend = backend_for(x.device, ("triton", "cpp") if m == 1 or p >= 16 else ("cpp",))
    if backend == "torch":
        return hadamard_transform_torch(x, core, signs, scale)
    args = (x.reshape(-1, n), None if signs is None else signs.float().contiguous(), core.float().contiguous(),
            default_scale(n) if scale is None else float(scale))
    if backend == "cpp":
        y = load_cpu().hadamard_transform(*args)
    else:
        from boa_kernels.triton_hadamard import hadamard_triton

        y = hadamard_triton(*args)
    return y.reshape(x.shape)
