"""The quantization methods. Each maps a layer's weight (and input Hessian) to integer codes and grids."""
from __future__ import annotations

import torch

from boa.algorithms.rtn import rtn
from boa.algorithms.solver import gptq
from boa.config import QuantConfig
from boa.quant.quantizer import QuantizedWeight, QuantSpec

__all__ = ["gptq", "needs_statistics", "rtn", "solve_layer"]


def needs_statistics(config: QuantConfig) -> bool:
    """Whether the method needs calibration data (RTN does only for the Hessian-weighted grid)."""
    return config.method != "rtn" or config.grid == "hessian"


def solve_layer(W: torch.Tensor, H: torch.Tensor | None, config: QuantConfig) -> QuantizedWeight:
    spec = QuantSpec(bits=config.bits, sym=config.sym, group_size=config.group_size, grid=config.grid)
    if config.method == "rtn":
        return rtn(W, spec, H)
    return gptq(
        W,
        H,
        spec,
        block_size=config.block_size,
        act_order=config.act_order,
        static_groups=config.static_groups,
        percdamp=config.percdamp,
    )
