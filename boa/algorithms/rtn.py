"""RTN: round every weight to the nearest point of its group's grid. The floor every other method must beat."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from boa.algorithms.base import GridMethod, Needs, register
from boa.algorithms.solver import SolveState
from boa.core.quantizer import QuantizedWeight, QuantSpec, grids_by_group, quantize


def rtn(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, heads: int = 1) -> QuantizedWeight:
    """W (rows, cols) = `heads` stacked blocks of rows; H (cols, cols), or (heads, cols, cols) one per block, is used
    only by the Hessian-weighted grid search."""
    rows, cols = W.shape
    W = W.float().reshape(heads, -1, cols)
    if H is not None:
        H = H.to(W.dtype).reshape(-1, cols, cols)
    scale, zero, offset = grids_by_group(W, spec, H)
    g_idx = torch.arange(cols, device=W.device) // spec.group_width(cols)
    codes = quantize(W, scale[..., g_idx], zero[..., g_idx], spec.maxq, None if offset is None else offset[..., g_idx])
    return QuantizedWeight(codes.reshape(rows, cols).to(torch.uint8), scale.reshape(rows, -1),
                           zero.reshape(rows, -1), g_idx.to(torch.int32), spec.bits,
                           None if offset is None else offset.reshape(rows, -1))


@register
@dataclass
class RTN(GridMethod):
    """Round to nearest on each group's grid; calibration data only for the H-weighted grid search."""

    name: ClassVar[str] = "rtn"
    refine_iters: ClassVar[int] = 0  # no scale refinement (what aespa reads from the method it starts from)

    def needs(self) -> Needs:
        return Needs(hessian=self.spec.h_weighted)

    def solve(self, W, stats, *, qkv=False, progress=None) -> QuantizedWeight:
        return rtn(W, self.spec, stats.H if stats is not None else None)

    def solve_state(self, W, stats) -> tuple[QuantizedWeight, SolveState]:
        """The codes, and the state a learned rounding starts from (aespa)."""
        H = stats.H.reshape(-1, W.shape[-1], W.shape[-1])
        W3 = W.to(H.dtype).reshape(stats.heads, -1, W.shape[-1])
        return rtn(W, self.spec, H, heads=stats.heads), SolveState(W3, W3, H, stats.heads)
