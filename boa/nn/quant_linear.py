"""QuantLinear: a linear layer that keeps its integer codes and grids and dequantizes them when it runs.

This is the plain-torch path (dequantize, then matmul); packed low-bit kernels plug in behind the same module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from boa.quant.quantizer import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits = q.bits
        self.out_features, self.in_features = q.codes.shape
        self.register_buffer("codes", q.codes)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        self.register_buffer("g_idx", q.g_idx)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.zero, self.g_idx, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
