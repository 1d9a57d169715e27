"""Dynamic per-token quantization of the inputs of every quantized linear (QuaRot's W·A·: ALGORITHMS.md §7).

Each token's input row x gets its own symmetric grid at run time: s = clip · max|x| / (2^(b−1) − 1), codes
round(x / s) clamped to [−2^(b−1), 2^(b−1) − 1]; the layer computes with s · codes (fake quantization here; the
int8 kernels compute on the codes). Applied by forward pre-hooks, so statistics gathered after `attach` see the
quantized inputs the layer will see at inference (GPTQ then minimises ‖(W − Q) X̂‖ for X̂ what it will be fed).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch

from boa.transforms.base import Transform, check_quantizer, register_transform

A_BITS = (4, 8)


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """x fake-quantized with a symmetric grid per row (last axis), computed in float32, returned in x's dtype."""
    maxq = 2 ** (bits - 1) - 1
    x32 = x.float()
    scale = (x32.abs().amax(-1, keepdim=True) * (clip_ratio / maxq)).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.clamp(torch.round(x32 / scale), -maxq - 1, maxq) * scale).to(x.dtype)


class _QuantizeInputs:
    """A forward pre-hook shared by a block's linears: inputs quantized per token; a tensor fed to several layers
    (q/k/v, gate/up) is quantized once and the same result handed to each, so they still share one input."""

    lossy = True  # not part of the float model: TurboBoA's FP path runs without it

    def __init__(self, bits: int, clip_ratio: float):
        self.bits, self.clip_ratio = bits, clip_ratio
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def __call__(self, module, args):
        x = args[0]
        if self._last is not None and self._last[0]() is x:
            return (self._last[1], *args[1:])
        xq = quantize_per_token(x, self.bits, self.clip_ratio)
        self._last = (weakref.ref(x), xq)
        return (xq, *args[1:])


@register_transform
@dataclass
class ActivationQuant(Transform):
    """Every quantized linear of the blocks reads its input quantized per token to `bits` (the head stays float)."""

    name: ClassVar[str] = "activations"
    bits: int = 8
    clip_ratio: float = 0.9

    def validate(self) -> None:
        check_quantizer("activation", self.bits, A_BITS, self.clip_ratio, 0.9)

    def attach(self, model, adapter) -> list:
        handles = []
        for block in adapter.blocks(model):
            hook = _QuantizeInputs(self.bits, self.clip_ratio)
            for name in adapter.linear_names():
                handles.append(attrgetter(name)(block).register_forward_pre_hook(hook))
        return handles
