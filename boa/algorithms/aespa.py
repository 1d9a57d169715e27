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
(γ = −0.1, ζ = 1.1) so that Q = s (clamp(B + h, 0, 2ᵇ − 1) − z), V starting where h equals C's fractional part (so
hard rounding at the start gives the init's codes). Adam minimises L(Q) + λ Σ (1 − |2h − 1|^β), the regulariser off
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

GAMMA, ZETA = -0.1, 1.1     # the rectified sigmoid's stretch (Louizos et al.; AdaRound)
WARMUP = 0.2                # fraction of steps before the rounding regulariser starts
BETA_START, BETA_END = 20.0, 2.0


def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h, for h in [0, 1) (inside (γ, ζ), so V is finite)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def beta_at(step: int, iters: int) -> float | None:
    """The regulariser's exponent β at `step`, or None while it is off (the first WARMUP of the steps)."""
    start = WARMUP * iters
    if step < start:
        return None
    progress = (step - start) / max(iters - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


def rounding_objective(Q: torch.Tensor, T: torch.Tensor, H: torch.Tensor, H_out: torch.Tensor | None) -> torch.Tensor:
    """L(Q) = Σ_h tr(H_out,h (Q_h − T_h) H_h (Q_h − T_h)ᵀ); Q, T (heads, d, cols), H (1|heads, cols, cols)."""
    E = Q - T
    G = E @ H
    if H_out is not None:
        G = H_out @ G
    return (E * G).sum()


class _RoundingProblem:
    """One layer's relaxed rounding problem: Q(V) = s (clamp(B + h(V), 0, maxq) − z) and its loss' gradient in V.

    The gradient is written out rather than left to autograd: L's is 2 s ⊙ H_out E H (H, H_out symmetric), one
    batched GEMM per step, which is most of a step's cost; autograd through the same expression would spend two
    more (through a Cholesky factor, ‖L_outᵀ E L‖², one more)."""

    def __init__(self, state: SolveState, scale, zero, maxq: int, H_out):
        self.T, self.H, self.H_out = state.target, state.H, H_out
        self.scale, self.zero, self.maxq = scale, zero, maxq
        floor = torch.floor(state.compensated / scale)
        self.base = floor + zero
        self.V0 = rectified_sigmoid_inverse(state.compensated / scale - floor)

    def gradient(self, V: torch.Tensor, round_weight: float, beta: float | None) -> torch.Tensor:
        """d/dV of L(Q(V)) + round_weight · Σ(1 − |2h − 1|^β) (the regulariser only when β is not None)."""
        u = torch.sigmoid(V)
        h_raw = u * (ZETA - GAMMA) + GAMMA
        h = h_raw.clamp(0, 1)
        c = self.base + h
        E = self.scale * (c.clamp(0, self.maxq) - self.zero) - self.T
        G = E @ self.H
        if self.H_out is not None:
            G = self.H_out @ G
        grad_h = (2 * self.scale) * G * ((c >= 0) & (c <= self.maxq))
        if beta is not None:
            t = 2 * h - 1
            grad_h -= (2 * beta * round_weight) * t.abs().pow(beta - 1) * t.sign()
        return grad_h * ((ZETA - GAMMA) * u * (1 - u) * ((h_raw > 0) & (h_raw < 1)))

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
    """Adam on the rounding variables V from their start; returns the hard codes (heads, d, cols).
    progress: a label for a per-layer progress bar (None: no bar)."""
    V = problem.V0.clone()
    optimizer = torch.optim.Adam([V], lr=lr)
    bar = tqdm(range(iters), desc=progress, leave=False, disable=progress is None, unit="step")
    for step in bar:
        V.grad = problem.gradient(V, round_weight, beta_at(step, iters))
        optimizer.step()
        if progress is not None and (step % 100 == 0 or step == iters - 1):
            bar.set_postfix_str(f"loss {problem.loss(problem.hard_codes(V)):.4g}")
    return problem.hard_codes(V)


def _init_solve(W: torch.Tensor, stats: LayerStats, spec: QuantSpec, config: QuantConfig):
    """The init's codes and the state learned rounding starts from (no scale refinement yet: that runs last)."""
    if config.init == "rtn":
        H = stats.H.reshape(-1, W.shape[-1], W.shape[-1])
        W3 = W.to(H.dtype).reshape(stats.heads, -1, W.shape[-1])
        return rtn(W, spec, H, heads=stats.heads), SolveState(W3, W3, H, stats.heads)
    D = stats.D * config.dx_alpha if stats.D is not None and config.dx_alpha > 0 else None
    coupled = config.init in ("boa", "turboboa")
    return obs_solve(
        W, stats.H, spec,
        H_out=stats.H_out if coupled else None,
        heads=stats.heads,
        D=D,
        rows_per_step=config.rows_per_step if config.init == "turboboa" else 1,
        block_size=config.block_size,
        act_order=config.act_order,
        row_order=config.row_order and coupled,
        static_groups=config.static_groups,
        percdamp=config.percdamp,
        keep_state=True,
    )


def aespa_solve(W: torch.Tensor, stats: LayerStats, config: QuantConfig, *, qkv: bool = False,
          progress: str | None = None) -> QuantizedWeight:
    """Quantizes W (rows, cols) by learned rounding from config.init's solution (see the module docstring).
    qkv: the layer is q/k/v_proj (its regulariser weight is round_weight_qkv)."""
    spec = QuantSpec(bits=config.bits, sym=config.sym, group_size=config.group_size, grid=config.grid)
    init, state = _init_solve(W, stats, spec, config)
    heads, cols = state.heads, W.shape[-1]
    g = init.g_idx.long()
    shape = (heads, -1, cols)
    scale = init.scale[:, g].to(state.H.dtype).reshape(shape)
    zero = init.zero[:, g].to(state.H.dtype).reshape(shape)
    H_out = None if stats.H_out is None else stats.H_out.to(state.H.dtype)

    problem = _RoundingProblem(state, scale, zero, spec.maxq, H_out)
    codes = learn_rounding(problem, iters=config.rounding_iters, lr=config.rounding_lr,
                           round_weight=config.round_weight_qkv if qkv else config.round_weight, progress=progress)
    init_codes = init.codes.to(codes.dtype).reshape(shape)
    if problem.loss(codes) > problem.loss(init_codes):
        codes = init_codes

    group_scale = init.scale.to(state.H.dtype).reshape(heads, -1, init.scale.shape[-1])
    group_zero = init.zero.to(state.H.dtype).reshape(group_scale.shape)
    if config.refine_iters:
        group_scale = refine_scales(codes - zero, group_scale, g, state.target, state.H, H_out, config.refine_iters)
    return QuantizedWeight(codes.reshape(W.shape).to(torch.uint8), group_scale.reshape(init.scale.shape),
                           group_zero.reshape(init.zero.shape), init.g_idx, spec.bits)
