"""The quantization methods. Each maps a layer's weight (and calibration statistics) to integer codes and grids."""
from __future__ import annotations

import torch

from boa.algorithms.aespa import aespa_solve
from boa.algorithms.rtn import rtn
from boa.algorithms.solver import gptq, obs_solve
from boa.config import QuantConfig
from boa.quant.quantizer import QuantizedWeight, QuantSpec
from boa.stats.collect import LayerStats

__all__ = ["aespa_solve", "gptq", "needs_statistics", "obs_solve", "rtn", "solve_layer"]


def needs_statistics(config: QuantConfig) -> bool:
    """Whether the method needs calibration data (RTN does only for the Hessian-weighted grid)."""
    return config.method != "rtn" or config.grid == "hessian"


def solve_layer(W: torch.Tensor, stats: LayerStats | None, config: QuantConfig, *, qkv: bool = False,
                progress: str | None = None) -> QuantizedWeight:
    """GPTQ, BoA and TurboBoA are one solver: what differs is the statistics (a row factor for BoA's q/k/v) and the
    config's rows_per_step, dx_alpha and refine_iters. aespa learns the rounding from one of them (its `init`).
    qkv: the layer is q/k/v_proj; progress: a label for aespa's per-layer progress bar (None: none)."""
    spec = QuantSpec(bits=config.bits, sym=config.sym, group_size=config.group_size, grid=config.grid)
    if config.method == "rtn":
        return rtn(W, spec, stats.H if stats is not None else None)
    if config.method == "aespa":
        return aespa_solve(W, stats, config, qkv=qkv, progress=progress)
    return obs_solve(
        W,
        stats.H,
        spec,
        H_out=stats.H_out,
        D=stats.dx_term(config.dx_alpha),
        rows_per_step=config.rows_per_step,
        block_size=config.block_size,
        act_order=config.act_order,
        row_order=config.row_order,
        static_groups=config.static_groups,
        percdamp=config.percdamp,
        refine_iters=config.refine_iters,
    )
