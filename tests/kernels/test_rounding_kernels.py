"""aespa's fused learned-rounding step: the torch reference's gradient against autograd and its Adam against
torch.optim.Adam; the C++ kernel against the torch reference (fp64 tight, fp32 close), over many steps, with codes at
the grid's edges and the regulariser on and off."""
import pytest
import torch

from boa_kernels.loader import load_cpu
from boa_kernels.rounding import (
    adam_update_torch_,
    relaxed_error_torch,
    relaxed_gradient_torch,
    rectified_sigmoid,
    rounding_adam_step_torch_,
)

MAXQ = 3.0


def problem(shape=(3, 5, 40), dtype=torch.float64, seed=0):
    """Rounding variables across the sigmoid's range, floors from below the grid to its top, and a G to match."""
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, dtype=dtype, generator=g)

    V = 3 * rand(*shape)
    base = torch.randint(-1, int(MAXQ) + 2, shape, generator=g).to(dtype)   # -1 .. maxq+1: clamped both ways
    scale = 0.1 + rand(*shape).abs()
    offset = rand(*shape)
    G = rand(*shape)
    return V, base, scale, offset, G


@pytest.mark.parametrize("beta", [None, 2.0, 7.5, 20.0])
def test_reference_gradient_equals_autograd(beta):
    V, base, scale, offset, G = problem()
    H = torch.eye(V.shape[-1], dtype=V.dtype)
    weight = 0.7
    V_auto = V.clone().requires_grad_()
    E = relaxed_error_torch(V_auto, base, scale, offset, MAXQ)
    # with H = I and no row factor, L = Σ E² + 2⟨G0, E⟩... use a quadratic whose ∂L/∂E is 2(E H) = 2G_total
    loss = (E * (E @ H)).sum()
    h = rectified_sigmoid(V_auto)
    if beta is not None:
        loss = loss + weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
    loss.backward()
    G_total = (E @ H).detach()
    torch.testing.assert_close(relaxed_gradient_torch(V, G_total, base, scale, MAXQ, beta, weight), V_auto.grad,
                               rtol=1e-10, atol=1e-12)


def test_reference_adam_equals_torch_optim_adam():
    V, *_ = problem()
    ours, theirs = V.clone(), V.clone()
    m, v = torch.zeros_like(V), torch.zeros_like(V)
    optimizer = torch.optim.Adam([theirs], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 8):
        grad = torch.randn(V.shape, dtype=V.dtype, generator=g)
        adam_update_torch_(ours, grad, m, v, 0.1, step)
        theirs.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


cpp = pytest.mark.skipif(load_cpu() is None, reason="the C++ extension did not build")


@cpp
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_cpp_error_equals_reference(dtype, tol):
    V, base, scale, offset, _ = problem(dtype=dtype)
    torch.testing.assert_close(load_cpu().relaxed_error(V, base, scale, offset, MAXQ),
                               relaxed_error_torch(V, base, scale, offset, MAXQ), rtol=tol, atol=tol)


@cpp
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_cpp_adam_steps_equal_reference(dtype, tol):
    """Ten steps (warm-up then β falling) from the same start: V, m and v agree; G is recomputed from each side's
    own E, as in learn_rounding."""
    V, base, scale, offset, _ = problem(shape=(2, 7, 300), dtype=dtype)
    H = torch.randn(300, 300, dtype=dtype, generator=torch.Generator().manual_seed(3))
    H = H @ H.T / 300
    states = {name: (V.clone(), torch.zeros_like(V), torch.zeros_like(V)) for name in ("cpp", "torch")}
    for step in range(1, 11):
        beta = None if step <= 3 else 20.0 - step
        for name, (V_, m, v) in states.items():
            if name == "cpp":
                G = load_cpu().relaxed_error(V_, base, scale, offset, MAXQ) @ H
                load_cpu().rounding_adam_step_(V_, G.contiguous(), base, scale, m, v, MAXQ,
                                               -1.0 if beta is None else beta, 1.5, 0.1, 0.9, 0.999, 1e-8, step)
            else:
                G = relaxed_error_torch(V_, base, scale, offset, MAXQ) @ H
                rounding_adam_step_torch_(V_, G, base, scale, m, v, MAXQ, beta, 1.5, 0.1, step)
    for a, b in zip(states["cpp"], states["torch"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@cpp
def test_cpp_rejects_bad_layouts():
    V, base, scale, offset, G = problem(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        load_cpu().relaxed_error(V.transpose(1, 2), base, scale, offset, MAXQ)
    with pytest.raises(RuntimeError, match="same dtype"):
        load_cpu().relaxed_error(V, base.double(), scale, offset, MAXQ)
    with pytest.raises(RuntimeError, match="same shape"):
        load_cpu().rounding_adam_step_(V, G[:1], base, scale, V.clone(), V.clone(), MAXQ, -1.0, 1.0, 0.1, 0.9,
                                       0.999, 1e-8, 1)
    with pytest.raises(RuntimeError, match="step counts from 1"):
        load_cpu().rounding_adam_step_(V, G, base, scale, V.clone(), V.clone(), MAXQ, -1.0, 1.0, 0.1, 0.9, 0.999,
                                       1e-8, 0)
