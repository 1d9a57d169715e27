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

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from boa.algorithms.base import (
    H_WEIGHTED_DEFAULT, REGISTRY, Method, Needs, check_number, check_positive_int, register,
)
from boa.algorithms.obs import TurboBoA
from boa.algorithms.solver import SolveState, refine_scales
from boa.core.adaround import beta_at, rectified_sigmoid_inverse
from boa.core.errors import BoaError
from boa.core.gguf_grids import representable_scales
from boa.core.quantizer import QuantizedWeight, QuantSpec
from boa_kernels.rounding import relaxed_error, rounding_adam_step_

START = 0.9                 # h starts at 0.5 ± START/2 on the side of the init's code
INITS = ("rtn", "gptq", "boa", "turboboa")  # what the learned rounding can start from


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


def rounding_problem(init: QuantizedWeight, state: SolveState, H_out: torch.Tensor | None) -> _RoundingProblem:
    """The relaxed problem on init's grid, split by head like state, starting at init's codes."""
    g = init.g_idx.long()
    shape = (state.heads, -1, init.codes.shape[-1])

    def expand(x):  # (rows, groups) -> (heads, d, cols)
        return x[:, g].to(state.H.dtype).reshape(shape)

    H_out = None if H_out is None else H_out.to(state.H.dtype)
    return _RoundingProblem(state, expand(init.scale), expand(init.zero), 2**init.bits - 1, H_out,
                            init.codes.to(state.H.dtype).reshape(shape))


@register
@dataclass
class Aespa(Method):
    """aespa: learned rounding (module docstring) from the codes and grids of `init` (RTN, GPTQ, BoA or TurboBoA;
    TurboBoA with the H-weighted grid by default), on the attention-aware objectives of every layer."""

    name: ClassVar[str] = "aespa"
    init: Method = field(default_factory=TurboBoA)
    rounding_iters: int = 500          # Adam steps per layer
    rounding_lr: float = 0.1
    round_weight: float = 1.0          # weight of the rounding regulariser Σ(1 − |2h − 1|^β)
    round_weight_qkv: float = 1.5      # ... for q/k/v

    @property
    def spec(self) -> QuantSpec:
        return self.init.spec

    def with_width(self, bits: int, group_size: int) -> Aespa:
        return dataclasses.replace(self, init=self.init.with_width(bits, group_size))

    def validate(self) -> None:
        if self.init.name not in INITS:
            raise BoaError(f"init={self.init.name!r} is not supported; aespa starts from one of {', '.join(INITS)}")
        kind = self.init.spec.gguf_type
        if kind is not None and kind.minimums:
            raise BoaError(f"aespa does not learn rounding on {kind.name}'s grids with block minimums yet; use "
                           "--method turboboa (or a GGUF type without minimums: Q3_K, Q4_1, Q5_1, Q6_K)")
        check_positive_int(self, "rounding_iters")
        for name in ("rounding_lr", "round_weight", "round_weight_qkv"):
            check_number(self, name, 0)

    def needs(self) -> Needs:
        return dataclasses.replace(self.init.needs(), hessian=True, attention=True)

    def to_dict(self) -> dict:
        return {"method": self.name, "init": self.init.to_dict(), "rounding_iters": self.rounding_iters,
                "rounding_lr": self.rounding_lr, "round_weight": self.round_weight,
                "round_weight_qkv": self.round_weight_qkv}

    @classmethod
    def from_dict(cls, data: dict) -> "Aespa":
        """From {"init": {method record}, ...}, or from one flat record with "init" a method name (the CLI's flags, a
        manifest of boa ≤ 0.1): the init takes the record's grid settings, with the H-weighted grid unless given."""
        init = data.get("init") or "turboboa"
        if isinstance(init, str):
            if init not in REGISTRY or init not in INITS:
                raise BoaError(f"init={init!r} is not supported; aespa starts from one of {', '.join(INITS)}")
            init = {**data, "method": init, "grid": data.get("grid") or H_WEIGHTED_DEFAULT}
        knobs = ("rounding_iters", "rounding_lr", "round_weight", "round_weight_qkv")
        return cls(init=REGISTRY[init["method"]].from_dict(init),
                   **{k: data[k] for k in knobs if data.get(k) is not None})

    def solve(self, W, stats, *, qkv=False, progress=None) -> QuantizedWeight:
        """Quantizes W (rows, cols) by learned rounding from the init's solution (see the module docstring)."""
        init, state = self.init.solve_state(W, stats)
        problem = rounding_problem(init, state, stats.H_out)
        V = learn_rounding(problem, iters=self.rounding_iters, lr=self.rounding_lr,
                           round_weight=self.round_weight_qkv if qkv else self.round_weight, progress=progress)
        codes = problem.hard_codes(V)
        if problem.loss(codes) > problem.loss(problem.start_codes):
            codes = problem.start_codes

        scale = init.scale.to(state.H.dtype).reshape(state.heads, -1, init.scale.shape[-1])
        if self.init.refine_iters:
            refined = refine_scales(codes - problem.zero, scale, init.g_idx.long(), state.target, state.H,
                                    problem.H_out, self.init.refine_iters)
            kind = self.spec.gguf_type  # GGUF grids: the refined scales put back on representable ones
            scale = refined if kind is None else representable_scales(
                kind, refined, init.zero.to(refined.dtype).reshape(refined.shape), scale)
        return QuantizedWeight(codes.reshape(W.shape).to(torch.uint8), scale.reshape(init.scale.shape), init.zero,
                               init.g_idx, init.bits)
