"""Input Hessians H = 2 E[x xᵀ] from calibration activations, damping and inverse Cholesky factors."""
from __future__ import annotations

import torch

from boa.core.errors import BoaError

# Extra damping per failed Cholesky, as a fraction of the mean diagonal (the public GPTQ/BoA code's retry).
RETRY_DAMP = 0.01
MAX_RETRIES = 50


class HessianAccumulator:
    """Streaming means of 2·x xᵀ over tokens and, over the tokens given with reference (FP-path) inputs, of the dX
    term 2·(x_ref − x) xᵀ (TurboBoA); fp32 (or fp64) whatever the activations' dtype."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device=None):
        self.H = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.D: torch.Tensor | None = None
        self.n = 0      # tokens in H
        self.n_dx = 0   # tokens in D (those that came with x_ref)

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None, x_gap: torch.Tensor | None = None) -> None:
        """x: the layer's inputs; x_ref: the FP path's; x_gap: what the gap x_ref − · is measured from, when not x
        itself (the input before a run-time activation quantizer rounded it)."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        if not torch.isfinite(x).all():
            raise BoaError(
                "calibration activations contain NaN/Inf; the model's weights or inputs are broken "
                "(check the model in full precision first)"
            )
        n_new = self.n + x.shape[0]
        self.H.mul_(self.n / n_new).addmm_(x.T, x, alpha=2 / n_new)
        self.n = n_new
        if x_ref is not None:
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            gap = x_ref.reshape(x.shape).to(x.dtype) - (x if x_gap is None else x_gap.reshape(x.shape).to(x.dtype))
            n_new = self.n_dx + x.shape[0]
            self.D.mul_(self.n_dx / n_new).addmm_(gap.T, x, alpha=2 / n_new)
            self.n_dx = n_new


def remove_dead_inputs(H: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Inputs that never fire (diag H = 0) carry no information: zero their weight column, make H invertible there."""
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    if dead.any():
        H = H.clone()
        torch.diagonal(H, dim1=-2, dim2=-1)[dead] = 1.0
        W.masked_fill_(dead.unsqueeze(-2), 0)
    return H


def layer_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ), ΔW = Q − W: the layer's output error ‖ΔW X‖² (times 2/n) that GPTQ minimises."""
    dW = (Q - W).to(H.dtype)
    return float(((dW @ H) * dW).sum())


DAMP_REFERENCES = ("mean", "median")


def damp(H: torch.Tensor, percdamp: float, reference: str = "mean") -> torch.Tensor:
    """H + percdamp · r · I, per matrix of a batch, r the mean (GPTQ's) or the median of diag H. The median is for
    inputs with a few massive channels (SmolLM2: diag max 32686, mean 24, median 0.04), whose mean-relative damping
    swamps the curvature of every other channel."""
    damped = H.clone()  # one copy: adding a multiple of torch.eye would make two Hessian-sized temporaries
    diag = torch.diagonal(damped, dim1=-2, dim2=-1)
    level = diag.mean(-1) if reference == "mean" else diag.median(-1).values
    diag.add_((percdamp * level).unsqueeze(-1))
    return damped


def _cholesky_with_retry(H: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky of each matrix of a batch, adding RETRY_DAMP · mean diag only to the matrices that fail (never to
    the whole batch)."""
    for _ in range(MAX_RETRIES):
        L, info = torch.linalg.cholesky_ex(H, upper=upper)
        failed = info != 0
        if not failed.any():
            return L
        H = torch.where(failed[..., None, None], damp(H, RETRY_DAMP), H)
    raise BoaError(
        f"the Hessian is not positive definite even after {MAX_RETRIES} damping retries; it likely holds NaN/Inf "
        "(check the calibration data and the model's weights) or use more calibration samples"
    )


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float = 0.01, damp_reference: str = "mean") -> torch.Tensor:
    """U = chol(H⁻¹), upper triangular (H⁻¹ = Uᵀ U), of damped H; batched over leading dims, each matrix damped
    further only if its own Cholesky fails.

    torch.linalg's batched LAPACK/cuSOLVER calls beat a per-matrix loop down to 64 × 64 head factors, so there is
    no custom kernel. One Cholesky of the reversed matrix plus a triangular solve (U = J L⁻¹ J for J H J = L Lᵀ)
    measured 0–13% faster in fp32 on a quiet CPU and slower on a busy one (bench/solver_kernels.py, op inverse_cholesky):
    milliseconds per layer either way, so the plain form stays until a GPU run at d = 14336 says otherwise.
    """
    if not torch.isfinite(H).all():
        raise BoaError("the Hessian holds NaN/Inf; check the model's weights and calibration data")
    H_inv = torch.cholesky_inverse(_cholesky_with_retry(damp(H, percdamp, damp_reference)))  # the factor is freed before the next
    return _cholesky_with_retry(H_inv, upper=True)
