"""GPTQ, BoA and TurboBoA: one OBS solver (solver.py), three configs. What differs is the statistics (BoA's q/k/v
row factors from the attention) and the defaults: GPTQ's paper (min-max grids), the public BoA / TurboBoA code's
(ALGORITHMS.md §4-5: H-weighted grids, searched here on a diag(H) shortlist; TurboBoA N = 16 rows a step, dX
α = 0.25, one scale-refinement sweep) and what was measured here (TurboBoA in act-order: README, issue 23)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from boa.algorithms.base import (
    H_WEIGHTED_DEFAULT, V_ROW_FACTORS, GridMethod, Needs, check_number, check_positive_int, is_int, register,
)
from boa.algorithms.solver import SolveState, obs_solve
from boa.core.errors import BoaError
from boa.core.hessian import DAMP_REFERENCES
from boa.core.quantizer import QuantizedWeight


@register
@dataclass
class GPTQ(GridMethod):
    """GPTQ: columns quantized in order, each error compensated on the later columns through the inverse input
    Hessian (lazy batches of `block_size` columns)."""

    name: ClassVar[str] = "gptq"
    row_coupled: ClassVar[bool] = False  # whether q/k/v solve with the attention's row factors
    act_order: bool = False        # quantize columns by decreasing diag(H)
    static_groups: bool | None = False  # group grids fixed from the original weights before any update (None:
                                        # when act-order meets a grouped grid, so groups stay runs of columns)
    block_size: int = 128          # lazy-batch width
    percdamp: float = 0.01         # H += percdamp · mean(diag H) · I
    damp_reference: str = "mean"   # ... or the median of diag H ("median": inputs with a few massive channels)
    dx_alpha: float = 0.0          # weight α of the earlier layers' error term D = α·2E[(X_fp − X_q)X_qᵀ]
    dx_windows: int = 0            # D from the first this many calibration windows (whole forward batches); 0: all
    refine_iters: int = 0          # coordinate-descent sweeps refining the scales after rounding

    def validate(self) -> None:
        super().validate()
        check_positive_int(self, "block_size")
        if not 0 <= self.percdamp < 1:
            raise BoaError(f"percdamp={self.percdamp!r} must be in [0, 1); 0.01 is the usual choice")
        if self.damp_reference not in DAMP_REFERENCES:
            raise BoaError(f"damp_reference={self.damp_reference!r}: use one of {', '.join(DAMP_REFERENCES)}")
        check_number(self, "dx_alpha", 0, 1, "; 0 turns the dX correction off, 0.25 is usual")
        if not is_int(self.dx_windows) or self.dx_windows < 0:
            raise BoaError(f"dx_windows={self.dx_windows!r} must be a non-negative integer (0: every calibration "
                           "window)")
        if isinstance(self.refine_iters, bool) or not isinstance(self.refine_iters, int) or self.refine_iters < 0:
            raise BoaError(f"refine_iters={self.refine_iters!r} must be a non-negative integer (0: no refinement)")

    def needs(self) -> Needs:
        return Needs(hessian=True, dx=self.dx_alpha > 0, dx_windows=self.dx_windows)

    @property
    def fixed_groups(self) -> bool:
        """Whether the group grids are fixed before the solve: static_groups, or where that is None, whether
        act-order meets a grouped grid."""
        if self.static_groups is None:
            return self.act_order and self.spec.group_size != -1
        return self.static_groups

    def _solver_knobs(self) -> dict:
        return dict(block_size=self.block_size, act_order=self.act_order, static_groups=self.fixed_groups,
                    percdamp=self.percdamp, damp_reference=self.damp_reference, rows_per_step=1, row_order=False)

    def solve(self, W, stats, *, qkv=False, progress=None) -> QuantizedWeight:
        return obs_solve(W, stats.H, self.spec, H_out=stats.H_out, D=stats.D, dx_alpha=self.dx_alpha,
                         refine_iters=self.refine_iters, **self._solver_knobs())

    def solve_state(self, W, stats) -> tuple[QuantizedWeight, SolveState]:
        """The codes before scale refinement, and the state a learned rounding starts from (aespa)."""
        return obs_solve(W, stats.H, self.spec, H_out=stats.H_out if self.row_coupled else None, heads=stats.heads,
                         D=stats.D, dx_alpha=self.dx_alpha, keep_state=True, **self._solver_knobs())


@register
@dataclass
class BoA(GPTQ):
    """BoA: q/k/v minimise the attention output's error through Kronecker Hessians H_out ⊗ H_in; each head's rows
    are solved `rows_per_step` at a time (1: the exact OBS solve), later rows updated in closed form."""

    name: ClassVar[str] = "boa"
    row_coupled: ClassVar[bool] = True
    grid: str = H_WEIGHTED_DEFAULT
    rows_per_step: int = 1         # N rows of a head quantized jointly
    row_order: bool = False        # rows of each head by decreasing diag(H_out)
    v_row_factor: str = "exact"    # v_proj row factor: W_o,hᵀW_o,h ("exact") or I ("identity", the public code)

    def validate(self) -> None:
        super().validate()
        check_positive_int(self, "rows_per_step")
        if self.v_row_factor not in V_ROW_FACTORS:
            raise BoaError(f"v_row_factor={self.v_row_factor!r}: use one of {', '.join(V_ROW_FACTORS)}")

    def needs(self) -> Needs:
        return dataclasses.replace(super().needs(), attention=True, v_row_factor=self.v_row_factor)

    def _solver_knobs(self) -> dict:
        return {**super()._solver_knobs(), "rows_per_step": self.rows_per_step, "row_order": self.row_order}


@register
@dataclass
class TurboBoA(BoA):
    """TurboBoA: BoA with N = 16 rows a step, the dX correction against the FP path (α = 0.25), and exact scale
    refinement (one sweep); columns in act-order (measured better on every calibration seed at W3), with a grouped
    grid's groups fixed before the solve (static) unless static_groups says otherwise."""

    name: ClassVar[str] = "turboboa"
    rows_per_step: int = 16
    dx_alpha: float = 0.25
    refine_iters: int = 1
    act_order: bool = True
    static_groups: bool | None = None
