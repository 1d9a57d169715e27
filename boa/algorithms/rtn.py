"""RTN: round every weight to the nearest point of its group's grid. The floor every other method must beat."""
from __future__ import annotations

import torch

from boa.quant.quantizer import QuantizedWeight, QuantSpec, grids_by_group, quantize


def rtn(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> QuantizedWeight:
    """W (rows, cols); H (cols, cols) is used only by the Hessian-weighted grid search."""
    W = W.float()
    cols = W.shape[-1]
    scale, zero = grids_by_group(W, spec, H)
    g_idx = torch.arange(cols, device=W.device) // spec.group_width(cols)
    codes = quantize(W, scale[:, g_idx], zero[:, g_idx], spec.maxq)
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, g_idx.to(torch.int32), spec.bits)
