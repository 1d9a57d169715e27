"""The OBS-family solver: GPTQ today; BoA / TurboBoA reuse its column pass with a row factor (ALGORITHMS.md §2, §4-5).

GPTQ minimises tr(ΔW H ΔWᵀ), H = 2E[XXᵀ], one column at a time with U = chol(H⁻¹) (upper):

    q_j = Q(w_j),   e_j = (w_j − q_j) / U_jj,   W[:, j+1:] −= e_j · U_j,j+1:

Lazy batch updates: inside a block of B columns the update touches the block only; the block's errors E then reach
the remaining columns through one GEMM, W[:, end:] −= E · U[blk, end:].

`_ColumnPass` is that loop over the columns of a set of rows. GPTQ runs it once over all rows; BoA (next) runs it
over one row block at a time and then compensates the later rows through the row factor H_out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from boa.quant.hessian import inverse_cholesky_upper, remove_dead_inputs
from boa.quant.quantizer import QuantizedWeight, QuantSpec, dequantize, find_grid, grids_by_group, quantize


@dataclass
class _ColumnPass:
    """Quantizes W's columns in processing order with lazy-batch error compensation.

    W (rows, cols) and U (cols, cols) are in processing order; H (processing order) serves the Hessian-weighted
    grid search. With `static` grids, scale/zero are given and group_of[j] names column j's group; otherwise a
    group's grid is chosen from the compensated weights when the pass reaches its first column.
    """

    spec: QuantSpec
    H: torch.Tensor
    U: torch.Tensor
    group_of: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    static: bool
    block_size: int

    def _block_width(self, cols: int) -> int:
        """A multiple of the group width (or the group width itself), so no group straddles two blocks and each
        dynamic grid is found on fully compensated columns."""
        if self.spec.group_size == -1:
            return self.block_size
        g = self.spec.group_size
        return g * max(1, self.block_size // g) if g <= cols else cols

    def run(self, W: torch.Tensor) -> torch.Tensor:
        """Quantizes W in place (left holding the compensated, then quantized, values); returns the codes."""
        rows, cols = W.shape
        width = self.spec.group_width(cols)
        codes = torch.empty_like(W)
        step = self._block_width(cols)
        for i1 in range(0, cols, step):
            i2 = min(i1 + step, cols)
            W1 = W[:, i1:i2].clone()
            E1 = torch.zeros_like(W1)
            U1 = self.U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                g = int(self.group_of[j])
                if not self.static and j % width == 0:
                    H_g = self.H[j : j + width, j : j + width]
                    s, z = find_grid(W1[:, i : i + width], self.spec, H_g)
                    self.scale[:, g : g + 1], self.zero[:, g : g + 1] = s, z
                w = W1[:, i]
                s, z = self.scale[:, g], self.zero[:, g]
                c = quantize(w, s, z, self.spec.maxq)
                codes[:, j] = c
                e = (w - dequantize(c, s, z)) / U1[i, i]
                W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
                E1[:, i] = e
            W[:, i1:i2] = W1
            W[:, i2:] -= E1 @ self.U[i1:i2, i2:]
        return codes


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
) -> QuantizedWeight:
    """GPTQ on W (rows, cols) with input Hessian H (cols, cols). Returns codes and grids in the original column order.

    act_order: columns by decreasing diag(H). static_groups: group grids from the original W before any update
    (per-channel grids are always static). A group size that does not divide cols leaves a narrower last group.
    """
    W = W.detach().to(H.dtype).clone()
    rows, cols = W.shape
    H = remove_dead_inputs(H, W)
    width = spec.group_width(cols)
    n_groups = spec.n_groups(cols)
    static = spec.group_size == -1 or static_groups

    if static:
        scale, zero = grids_by_group(W, spec, H)
    else:
        scale = torch.empty(rows, n_groups, dtype=W.dtype, device=W.device)
        zero = torch.empty_like(scale)

    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    else:
        perm = torch.arange(cols, device=W.device)
    H_perm = H[perm][:, perm]
    position = torch.arange(cols, device=W.device)
    # group of the column processed j-th: fixed by its original index for static grids, by processing order else.
    group_of = (perm if static else position) // width

    column_pass = _ColumnPass(
        spec,
        H_perm,
        inverse_cholesky_upper(H_perm, percdamp),
        group_of,
        scale,
        zero,
        static,
        block_size,
    )
    codes_perm = column_pass.run(W[:, perm].contiguous())

    codes = torch.empty_like(codes_perm)
    codes[:, perm] = codes_perm
    g_idx = torch.empty_like(group_of)
    g_idx[perm] = group_of
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, g_idx.to(torch.int32), spec.bits)
