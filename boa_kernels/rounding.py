"""aespa's learned-rounding step (boa/algorithms/aespa.py), fused per element around the caller's GEMM.

Sizes and layout: V, base, scale, offset, G, m, v all the same shape (heads, d, cols), contiguous, float32 or float64.
    relaxed_error(V, base, scale, offset, maxq) -> E = s · clamp(base + h(V), 0, maxq) − offset
    (the caller forms G = H_out E H)
    rounding_adam_step_(V, G, base, scale, m, v, ..., step): the gradient of L + λ Σ(1 − |2h − 1|^β) in V, then one
    Adam update of V, m, v in place (β = None: the regulariser is off).
Formulas: csrc/include/boa/rounding_math.h. Backends: C++ (csrc/cpu/rounding.cpp) on a CPU; elsewhere the torch
reference below, which the C++ kernel is tested against (and whose Adam is tested against torch.optim.Adam).
"""
from __future__ import annotations

import math

import torch

from boa_kernels.dispatch import backend_for
from boa_kernels.loader import load_cpu

GAMMA, ZETA = -0.1, 1.1   # the rectified sigmoid's stretch (Louizos et al.; AdaRound)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8   # torch.optim.Adam's defaults


def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


def relaxed_error_torch(V, base, scale, offset, maxq: float) -> torch.Tensor:
    return scale * torch.clamp(base + rectified_sigmoid(V), 0, maxq) - offset


def relaxed_gradient_torch(V, G, base, scale, maxq: float, beta: float | None, round_weight: float) -> torch.Tensor:
    """∂/∂V of L + round_weight · Σ(1 − |2h − 1|^β), given G = H_out E H (∂L/∂Q = 2G)."""
    u = torch.sigmoid(V)
    h = u * (ZETA - GAMMA) + GAMMA
    c = base + h
    grad_h = 2 * scale * G * ((c >= 0) & (c <= maxq))
    if beta is not None:
        t = 2 * h - 1
        grad_h = grad_h - (2 * beta * round_weight) * t.abs().pow(beta - 1) * t.sign()
    return grad_h * ((ZETA - GAMMA) * u * (1 - u) * ((h > 0) & (h < 1)))


def adam_update_torch_(V, grad, m, v, lr: float, step: int) -> None:
    """torch.optim.Adam's update (default betas and eps, no weight decay), in place."""
    beta1, beta2 = ADAM_BETAS
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
    V.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


def rounding_adam_step_torch_(V, G, base, scale, m, v, maxq, beta, round_weight, lr, step) -> None:
    adam_update_torch_(V, relaxed_gradient_torch(V, G, base, scale, maxq, beta, round_weight), m, v, lr, step)


def relaxed_error(V, base, scale, offset, maxq: float) -> torch.Tensor:
    if backend_for(V.device, ("cpp",)) == "cpp":
        return load_cpu().relaxed_error(V, base, scale, offset, float(maxq))
    return relaxed_error_torch(V, base, scale, offset, maxq)


def rounding_adam_step_(V, G, base, scale, m, v, maxq: float, beta: float | None, round_weight: float, lr: float,
                        step: int) -> None:
    """One learned-rounding step on V (and Adam's m, v) in place; step counts from 1."""
    if backend_for(V.device, ("cpp",)) == "cpp":
        load_cpu().rounding_adam_step_(V, G.contiguous(), base, scale, m, v, float(maxq),
                                       -1.0 if beta is None else float(beta), float(round_weight), float(lr),
                                       ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS, int(step))
    else:
        rounding_adam_step_torch_(V, G, base, scale, m, v, maxq, beta, round_weight, lr, step)
