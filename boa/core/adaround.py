"""AdaRound's learned rounding (Nagel et al., 2020), shared by aespa and Genie-M: the rectified sigmoid that relaxes
a weight's rounding, its inverse (where to start the relaxation), and the annealing schedule of the regulariser
λ Σ 1 − |2h − 1|^β.

    h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1),    γ = −0.1, ζ = 1.1
    β: off for the first WARMUP of the steps, then falling linearly from BETA_START to BETA_END

The stretch constants are defined once, beside the fused rounding kernels (boa_kernels.rounding, which imports
nothing from boa).
"""
from __future__ import annotations

import torch

from boa_kernels.rounding import GAMMA, ZETA, rectified_sigmoid

__all__ = ["BETA_END", "BETA_START", "GAMMA", "WARMUP", "ZETA", "beta_at", "rectified_sigmoid",
           "rectified_sigmoid_inverse"]

WARMUP = 0.2                # fraction of steps before the rounding regulariser starts
BETA_START, BETA_END = 20.0, 2.0


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h, for h in (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def beta_at(step: int, iters: int) -> float | None:
    """The regulariser's exponent β at `step` of `iters`, or None while it is off (the first WARMUP of the steps)."""
    start = WARMUP * iters
    if step < start:
        return None
    progress = (step - start) / max(iters - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)
