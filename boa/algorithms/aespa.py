"""aespa (ALGORITHMS.md §6): AdaRound-style learned rounding on the attention-aware objectives, from precomputed
statistics only.

Each layer's objective is the one its solve minimises, summed over heads h:

    L(Q) = Σ_h tr(H_out,h (Q_h − T_h) H_h (Q_h − T_h)ᵀ)

with the statistics the BoA/TurboBoA pass already gathers (boa.stats): q_proj H_out = E[KᵀK] (back-rotated through
RoPE), k_proj H_out = E[QᵀQ], v_proj per-head H_h = E[X Aᵀ A Xᵀ] with the row factor W_o,hᵀW_o,h (or none), o_proj
and the MLP their input Hessians; T the weights (plus TurboBoA's dX fold W D H⁻¹ when dx_alpha > 0). Nothing here
runs the model: a step costs one batched product with the precomputed H.

Rounding. The grid (s, z) and the floor B = ⌊C/s⌋ + z come from the init's solve (C: the weights each code was
rounded from, already compensated by GPTQ/BoA/TurboBoA); each weight learns h = clip(σ(V)(ζ − γ) + γ, 0, 1) ∈ [0, 1]
(γ = −0.1, ζ = 1.1) so that Q = s (clamp(B + h, 0, 2ᵇ − 1) − z). V starts beside the init's codes, h = 0.05 or 0.95
on the side the init rounded to, so hard rounding at the start gives them back. (The public code starts h at C's
fractional part; since C holds each column compensated for the *rounded* earlier columns, that soft start is a poor
point, and on real blocks 100-200 steps from it end worse than the init, 500 steps still worse for v/o_proj: see
bench/aespa_iters.py.) Adam minimises L(Q) + λ Σ (1 − |2h − 1|^β), the regulariser off
for the first 20% of steps and β falling linearly 20 → 2 after; the final codes are B + 1[V ≥ 0]. Should those
score worse on L than the init (possible: the relaxation is not the hard problem), the init's codes are kept. Then
`refine_iters` sweeps of TurboBoA's exact scale refinement run on the learned codes.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from boa.algorithms.rtn import rtn
from boa.algorithms.solver import SolveState, obs_solve, refine_scales
from boa.config import QuantConfig
from boa.quant.quantizer import QuantizedWeight, QuantSpec
from boa.stats.collect import LayerStats
from boa_kernels.rounding import GAMMA, ZETA, relaxed_error, rounding_adam_step_

START = 0.9                 # h starts at 0.5 ± START/2 on the side of the init's code
WARMUP = 0.2                # fraction of steps before the rounding regulariser starts
BETA_START, BETA_END = 20.0, 2.0


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h, for h in (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def beta_at(step: int, iters: int) -> float | None:
    """The regulariser's exponent β at `step`, or None while it is off (the first WARMUP of the steps)."""
    start = WARMUP * iters
    if step < start:
        return None
    progress = (step - start) / max(iters - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


def curvature(E: torch.Tensor, H: torch.Tensor, H_out: torch.Tensor | None) -> torch.Tensor:
    """G = H_out,h E_h H_h per head: E (heads, d, cols), H (1|heads, cols, cols), H_out (heads, d, d) or None."""
    G = E @ H if H.shape[0] > 1 else (E.reshape(1, -1, E.shape[-1]) @ H).reshape(E.shape)  # shared H: one GEMM
    return G if H_out is None else H_out @ G


def rounding_objective(Q: torch.Tensor, T: torch.Tensor, H: torch.Tensor, H_out: torch.Tensor | None) -> torch.Tensor:
    """L(Q) = Σ_h tr(H_out,h (Q_h − T_h) H_h (Q_h − T_h)ᵀ); Q, T (heads, d, cols)."""
    E = Q - T
    return (E * curvature(E, H, H_out)).sum()


class _RoundingProblem:
    """One layer's relaxed rounding problem: Q(V) = s (clamp(B + h(V), 0, maxq) − z), its loss and Adam steps.

    A step is two fused element passes (boa_kernels.rounding: the error E, then gradient + Adam) around one batched
    GEMM, G = H_out E H; the gradient of L is 2 s ⊙ G (H, H_out symmetric). Autograd through the same expression
    would spend two more GEMMs a step (through a Cholesky factor, ‖L_outᵀ E L‖², one more)."""

    def __init__(self, state: SolveState, scale, zero, maxq: int, H_out, start_codes: torch.Tensor):
        self.T, self.H, self.H_out = state.target, state.H, H_out
        self.scale, self.zero, self.maxq = scale.contiguous(), zero.contiguous(), maxq
        self.base = (torch.floor(state.compensated / scale) + zero).contiguous()
        self.offset = (scale * zero + state.target).contiguous()
        self.start_codes = start_codes
        up = (start_codes - self.base).clamp(0, 1)  # the init rounded up (1) or down (0) from the floor
        self.V0 = rectified_sigmoid_inverse(0.5 + START * (up - 0.5)).contiguous()

    def step_(self, V, m, v, step: int, lr: float, round_weight: float, beta: float | None) -> None:
        """Adam step `step` (from 1) on V, m, v in place."""
        G = curvature(relaxed_error(V, self.base, self.scale, self.offset, self.maxq), self.H, self.H_out)
        rounding_adam_step_(V, G, self.base, self.scale, m, v, self.maxq, beta, round_weight, lr, step)

    def hard_codes(self, V: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.base + (V >= 0).to(self.base.dtype), 0, self.maxq)

    def loss(self, codes: torch.Tensor) -> float:
        return float(rounding_objective(self.scale * (codes - self.zero), self.T, self.H, self.H_out))


def learn_rounding(
    problem: _RoundingProblem,
    *,
    iters: int,
    lr: float,
    round_weight: float,
    progress: str | None = None,
) -> torch.Tensor:
    """Adam on the rounding variables V from their start; returns the final V (problem.hard_codes(V): the codes).
    progress: a label for a per-layer progress bar (None: no bar)."""
    V = problem.V0.clone()
    m, v = torch.zeros_like(V), torch.zeros_like(V)
    bar = tqdm(range(iters), desc=progress, leave=False, disable=progress is None, unit="step")
    for step in bar:
        problem.step_(V, m, v, step + 1, lr, round_weight, beta_at(step, iters))
        if progress is not None and (step % 100 == 0 or step == iters - 1):
            bar.set_postfix_str(f"loss {problem.loss(problem.hard_codes(V)):.4g}")
    return V


def _init_solve(W: torch.Tensor, stats: LayerStats, spec: QuantSpec, config: QuantConfig):
    """The init's codes and the state learned rounding starts from (no scale refinement yet: that runs last)."""
    if config.init == "rtn":
        H = stats.H.reshape(-1, W.shape[-1], W.shape[-1])
        W3 = W.to(H.dtype).reshape(stats.heads, -1, W.shape[-1])
        return rtn(W, spec, H, heads=stats.heads), SolveState(W3, W3, H, stats.heads)
    coupled = config.init in ("boa", "turboboa")
    return obs_solve(
        W, stats.H, spec,
        H_out=stats.H_out if coupled else None,
        heads=stats.heads,
        D=stats.dx_term(config.dx_alpha),
        rows_per_step=config.rows_per_step,  # the init's default (gptq/boa 1, turboboa 16) unless set
        block_size=config.block_size,
        act_order=config.act_order,
        row_order=config.row_order and coupled,
        static_groups=config.static_groups,
        percdamp=config.percdamp,
        keep_state=True,
    )


def rounding_problem(init: QuantizedWeight, state: SolveState, H_out: torch.Tensor | None) -> _RoundingProblem:
    """The relaxed problem on init's grid, split by head like state, starting at init's codes."""
    g = init.g_idx.long()
    shape = (state.heads, -1, init.codes.shape[-1])

    def expand(x):  # (rows, groups) -> (heads, d, cols)
        return x[:, g].to(state.H.dtype).reshape(shape)

    H_out = None if H_out is None else H_out.to(state.H.dtype)
    return _RoundingProblem(state, expand(init.scale), expand(init.zero), 2**init.bits - 1, H_out,
                            init.codes.to(state.H.dtype).reshape(shape))


def aespa_solve(W: torch.Tensor, stats: LayerStats, config: QuantConfig, *, qkv: bool = False,
                progress: str | None = None) -> QuantizedWeight:
    """Quantizes W (rows, cols) by learned rounding from config.init's solution (see the module docstring).
    qkv: the layer is q/k/v_proj (its regulariser weight is round_weight_qkv)."""
    spec = QuantSpec(bits=config.bits, sym=config.sym, group_size=config.group_size, grid=config.grid)
    init, state = _init_solve(W, stats, spec, config)
    problem = rounding_problem(init, state, stats.H_out)
    V = learn_rounding(problem, iters=config.rounding_iters, lr=config.rounding_lr,
                       round_weight=config.round_weight_qkv if qkv else config.round_weight, progress=progress)
    codes = problem.hard_codes(V)
    if problem.loss(codes) > problem.loss(problem.start_codes):
        codes = problem.start_codes

    scale = init.scale.to(state.H.dtype).reshape(state.heads, -1, init.scale.shape[-1])
    if config.refine_iters:
        scale = refine_scales(codes - problem.zero, scale, init.g_idx.long(), state.target, state.H, problem.H_out,
                              config.refine_iters)
    return QuantizedWeight(codes.reshape(W.shape).to(torch.uint8), scale.reshape(init.scale.shape), init.zero,
                           init.g_idx, spec.bits)
