"""RTN: round every weight to the nearest point of its group's grid. The floor every other method must beat."""
from __future__ import annotations

import torch

from boa.quant.quantizer import QuantizedWeight, QuantSpec, grids_by_group, quantize


def rtn(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, heads: int = 1) -> QuantizedWeight:
    """W (rows, cols) = `heads` stacked blocks of rows; H (cols, cols), or (heads, cols, cols) one per block, is used
    only by the Hessian-weighted grid search."""
    rows, cols = W.shape
    W = W.float().reshape(heads, -1, cols)
    if H is not None:
        H = H.to(W.dtype).reshape(-1, cols, cols)
    scale, zero = grids_by_group(W, spec, H)
    g_idx = torch.arange(cols, device=W.device) // spec.group_width(cols)
    codes = quantize(W, scale[..., g_idx], zero[..., g_idx], spec.maxq)
    return QuantizedWeight(codes.reshape(rows, cols).to(torch.uint8), scale.reshape(rows, -1),
                           zero.reshape(rows, -1), g_idx.to(torch.int32), spec.bits)
