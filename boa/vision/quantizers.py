"""Trainable fake quantizers for block reconstruction (Genie-M, ALGORITHMS.md §8).

Weights, per output channel, asymmetric, a learnable step s *and* learnable rounding (AdaRound) at once:

    Ŵ = s · (clamp(⌊W / s₀⌋ + h(α) + z, 0, 2^b − 1) − z),    h(α) = clamp(σ(α)(ζ − γ) + γ, 0, 1)

s₀ and z come from the 2.4-norm clip search and stay fixed, so Ŵ is smooth in s and α (the floor never moves);
after training h(α) is hardened to [α ≥ 0]. α starts where h(α) = W/s₀ − ⌊W/s₀⌋, so the hard rounding of an
untrained quantizer is round-to-nearest: RTN is the same quantizer with no training.

Activations, per tensor, symmetric (signed if the first batch has negatives): x̂ = s · clamp(⌊x / s⌉, qmin, qmax)
with a straight-through rounding and a learnable step s (LSQ without its gradient scale, as the public code).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from boa.core.adaround import rectified_sigmoid, rectified_sigmoid_inverse
from boa.core.quantizer import QuantSpec, dequantize, find_grid

# The activation step search: clip ratios p = 1 − i/100 scored by Σ|x̂ − x|^2.4 (as the weight grid search).
ACT_CLIP_STEPS, ACT_NORM = 100, 2.4
ACT_SEARCH_SAMPLE = 1 << 20


class LearnedWeightQuantizer(nn.Module):
    """A parametrization of a conv/linear weight: forward(W) = Ŵ (see the module docstring).

    Shapes: W is (out, ...); s, s₀ and z are (out, 1), α is W flattened to (out, fan_in).
    """

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.maxq = 2**bits - 1
        w = weight.detach().reshape(weight.shape[0], -1).float()
        scale, zero, _ = find_grid(w, QuantSpec(bits, grid="mse"))
        self.register_buffer("scale0", scale)
        self.register_buffer("zero", zero)
        self.scale = nn.Parameter(scale.clone())
        rest = w / scale - torch.floor(w / scale)
        self.alpha = nn.Parameter(rectified_sigmoid_inverse(rest))  # h(α) = rest
        self.hard = False

    def rounding(self) -> torch.Tensor:
        """h(α) in [0, 1] while learning, {0, 1} once hard."""
        return (self.alpha >= 0).to(self.alpha.dtype) if self.hard else rectified_sigmoid(self.alpha)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, 2^b − 1] as floats, (out, fan_in)."""
        w = weight.reshape(weight.shape[0], -1)
        return torch.clamp(torch.floor(w / self.scale0) + self.rounding() + self.zero, 0, self.maxq)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return dequantize(self.codes(weight), self.scale, self.zero).reshape(weight.shape)

    def regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's Σ 1 − |2h(α) − 1|^β: pushes every h(α) to 0 or 1 as β falls."""
        return (1 - (2 * rectified_sigmoid(self.alpha) - 1).abs().pow(beta)).sum()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounds forwards, passes the gradient straight through."""
    return x + (torch.round(x) - x).detach()


class ActQuantizer(nn.Module):
    """Per-tensor symmetric fake quantizer with a learnable step; `drop` is QDrop's probability of keeping an
    element in floating point (used while reconstructing only)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("ready", torch.tensor(False))
        self.drop = 0.0

    @property
    def qrange(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Signedness from x, step by the 2.4-norm search over clip ratios of max |x|."""
        self.signed.fill_(bool((x < 0).any()))
        qmin, qmax = self.qrange
        x = x.detach().float().flatten()
        top = x.abs().max().clamp(min=1e-8)
        x = x[:: max(1, x.numel() // ACT_SEARCH_SAMPLE)]  # the errors on an evenly strided sample: 100 scores
        best, best_err = top / qmax, math.inf
        for i in range(ACT_CLIP_STEPS):
            step = (1 - i / 100) * top / qmax
            err = (step * torch.clamp(torch.round(x / step), qmin, qmax) - x).abs().pow(ACT_NORM).sum().item()
            if err < best_err:
                best, best_err = step, err
        self.step.copy_(best)
        self.ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        xq = self.step * torch.clamp(round_ste(x / self.step), qmin, qmax)
        if self.drop > 0:
            return torch.where(torch.rand_like(x) < self.drop, x, xq)
        return xq
